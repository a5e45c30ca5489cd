"""`clean PATH [--dry-run]`: remove the temp dirs that killed runs of this toolkit left under PATH."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from export.commands.registry import command, with_args


def _clean_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="directory to search (recursively), e.g. engines/ or out/")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")


@command("clean", "remove stale temp dirs (.NAME.tmp-*) of killed runs under PATH; only ours, only if their process "
                  "is gone")
@with_args(_clean_args)
def _cmd_clean(args: argparse.Namespace) -> int:
    from export.errors import ExportError
    from export.io.output import find_temp_dirs, human_bytes

    if not args.path.is_dir():
        raise ExportError(f"{args.path}: not a directory")
    found = find_temp_dirs(args.path)
    freed = 0
    for t in found:
        if not t.stale:
            print(f"kept {t.path} ({human_bytes(t.nbytes)}): {t.reason}")
            continue
        if not args.dry_run:
            shutil.rmtree(t.path, ignore_errors=True)
        freed += t.nbytes
        print(f"{'would remove' if args.dry_run else 'removed'} {t.path} ({human_bytes(t.nbytes)}): {t.reason}")
    stale = sum(t.stale for t in found)
    verb = "would free" if args.dry_run else "freed"
    print(f"{stale} stale temp dir(s) under {args.path}, {verb} {human_bytes(freed)}; {len(found) - stale} kept")
    return 0
