"""The transformers remote code a DeciLM (`nemotron-nas`) checkpoint carries, and its installer.

transformers has no built-in `nemotron-nas` model: `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` needs `auto_map` in config.json naming code files beside it. The two
files here are the toolkit's own implementation; they import only torch and transformers, since
they travel inside checkpoints and run wherever those are loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from export.spec import DECILM, read_config_json

HF_CODE_DIR = Path(__file__).resolve().parent
CODE_FILES = ("configuration_decilm.py", "modeling_decilm.py")
AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}


def is_decilm_config(cfg: dict) -> bool:
    arch = cfg.get("architectures")
    return cfg.get("model_type") in ("nemotron-nas", "deci") or (isinstance(arch, list) and DECILM in arch)


def install_remote_code(directory: str | Path) -> bool:
    """Give a DeciLM checkpoint our code files and `auto_map`; True when it did.

    A checkpoint whose config already has an `auto_map` keeps it and its own code (a released
    checkpoint's remote code is what its users expect); a non-DeciLM config (plain Llama, which
    transformers loads natively) is left alone.
    """
    directory = Path(directory)
    cfg = read_config_json(directory / "config.json")
    if "auto_map" in cfg or not is_decilm_config(cfg):
        return False
    for name in CODE_FILES:
        shutil.copyfile(HF_CODE_DIR / name, directory / name)
    cfg["auto_map"] = dict(AUTO_MAP)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return True
