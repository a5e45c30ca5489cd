"""Which tritonserver to run, and the environment it needs.

NVIDIA's containers put `tritonserver` on PATH (with the tensorrtllm and python backends in
/opt/tritonserver/backends). On a plain CPU host the nvidia-pytriton wheel bundles the same
server (2.51) but ships its python-backend stub per Python version, so we assemble a backend
directory (library + matching stub + utils) the way pytriton itself does.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from export.errors import ExportError

EXPORT_ROOT = Path(__file__).resolve().parent.parent.parent  # the directory holding `export/`


@dataclass(frozen=True)
class ServerBinary:
    """A tritonserver executable plus the flags and environment it must be started with."""

    path: Path
    bundled: bool
    backend_dir: Path | None = None          # --backend-directory, only for the bundled server
    env: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.path} ({'nvidia-pytriton bundle' if self.bundled else 'system'})"


def _pytriton_root() -> Path | None:
    try:
        import pytriton
    except ImportError:
        return None
    return Path(pytriton.__file__).resolve().parent


def find_tritonserver(work_dir: Path) -> ServerBinary:
    """$TRITONSERVER, else `tritonserver` on PATH, else the pytriton bundle (backends set up in work_dir)."""
    explicit = os.environ.get("TRITONSERVER")
    if explicit:
        if not Path(explicit).is_file():
            raise ExportError(f"$TRITONSERVER={explicit} is not a file")
        return ServerBinary(Path(explicit), bundled=False, env=_model_env())
    on_path = shutil.which("tritonserver")
    if on_path:
        return ServerBinary(Path(on_path), bundled=False, env=_model_env())
    root = _pytriton_root()
    if root is None or not (root / "tritonserver/bin/tritonserver").is_file():
        raise ExportError("no tritonserver found: set $TRITONSERVER, put tritonserver on PATH, "
                          "or `pip install nvidia-pytriton` (the `triton` extra) for the bundled one")
    return _bundled(root, work_dir)


def _bundled(root: Path, work_dir: Path) -> ServerBinary:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "tritonserver/python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ExportError(f"nvidia-pytriton has no python-backend stub for Python {version} ({stub})")
    src = root / "tritonserver/backends/python"
    backend_dir = work_dir / "backends"
    py = backend_dir / "python"
    py.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        _link(src / name, py / name)
    _link(stub, py / "triton_python_backend_stub")
    libs = root.parent / "nvidia_pytriton.libs"
    env = _model_env()
    paths = (str(libs), _own_libpython_dir(), os.environ.get("LD_LIBRARY_PATH"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in paths if p)
    return ServerBinary(root / "tritonserver/bin/tritonserver", bundled=True, backend_dir=backend_dir, env=env)


def _own_libpython_dir() -> str | None:
    """The directory of this interpreter's own libpython, so the stub embeds the Python whose
    standard library and site-packages it then imports.

    The bundled stub links `libpython3.X.so.1.0` by name. Left to the loader it picks up the
    system's (Debian's 3.11.2 here) while its stdlib and site-packages come from this interpreter
    (3.11.7, found through PATH), so the stdlib's C modules built for one patch release run on
    another's interpreter. With that mix, `tests/test_serving_load.py` lost a stub to a segfault
    inside libpython's allocator (dmesg) in about 1 run in 6 (docs/serving.md). None when this
    interpreter has no shared libpython (nothing to match).
    """
    import sysconfig

    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).is_file() and sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return str(libdir)
    return None


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(src)


def _model_env() -> dict[str, str]:
    """The python stub picks its interpreter (and so its site-packages) from PATH: put ours first.

    The stub ignores PYTHONPATH, which is why model.py files add `export_root` to sys.path themselves.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
