"""Publishing directories atomically: build beside the target, then rename into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def replace_dir(new: Path, target: Path) -> Path:
    """Rename `new` onto `target`. An old `target` is moved aside first and deleted after, so
    readers see the old or the new directory, never a half-written one."""
    Path(new).chmod(0o755)  # mkdtemp makes directories private; published ones are not
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def publish_dir(out_dir: Path, fill: Callable[[Path], None]) -> Path:
    """Have `fill` write a fresh directory beside `out_dir`, then swap it in (`replace_dir`);
    on any error the half-written directory is removed and `out_dir` is left as it was."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        fill(tmp)
        return replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
