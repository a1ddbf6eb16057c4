"""Publishing directories atomically: build beside the target, then rename into place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


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
