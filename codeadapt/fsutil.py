"""Publishing directories and files atomically, under a per-output lock.

A directory is built beside its target, fsynced, then swapped in with one
`renameat2(RENAME_EXCHANGE)` where the kernel has it (no moment without a target), else by
moving the old one aside first; a swap a kill interrupted is repaired by the next one. An
output is published under an exclusive `flock` on `.locks/<name>.lock` beside it, so two runs
writing the same output take turns instead of colliding. Files that a later run reads back
(JSON state, caches) are written to a temp file, fsynced and renamed; one that is truncated or
corrupt anyway reads as missing (`read_json`), never as an error on every later run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` to disk (before it is renamed into place)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_held = threading.local()  # lock files this thread holds: taking one again is a no-op


@contextlib.contextmanager
def locked(target: Path) -> Iterator[None]:
    """Hold the exclusive lock of output `target` (`.locks/<name>.lock` beside it), waiting
    for another process or thread that holds it; re-entrant within one thread."""
    target = Path(target)
    (target.parent / ".locks").mkdir(parents=True, exist_ok=True)
    lock = str(target.parent.resolve() / ".locks" / f"{target.name}.lock")
    held: set[str] = getattr(_held, "paths", None) or set()
    _held.paths = held
    if lock in held:
        yield
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.add(lock)
        yield
    finally:
        held.discard(lock)
        os.close(fd)  # releases the lock


def recover(target: Path) -> None:
    """Finish a swap that a kill interrupted: the old directory moved aside but nothing put in
    its place comes back; a leftover beside a complete target is deleted."""
    old = target.with_name(f".{target.name}.old")
    if old.exists() and not target.exists():
        os.replace(old, target)
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)


def recover_all(parent: Path) -> list[str]:
    """`recover` every output under `parent` a kill left mid-swap; the names repaired."""
    repaired = []
    if Path(parent).is_dir():
        for old in sorted(Path(parent).glob(".*.old")):
            target = old.with_name(old.name[1:].removesuffix(".old"))
            if not target.exists():
                with locked(target):
                    recover(target)
                repaired.append(target.name)
    return repaired


def _swap(new: Path, target: Path) -> Path:
    Path(new).chmod(0o755)  # mkdtemp makes directories private; published ones are not
    fsync_tree(Path(new))
    recover(target)
    old = target.with_name(f".{target.name}.old")
    if target.exists() and _exchange(Path(new), target):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old directory
    else:
        if target.exists():
            os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)
    return target


def replace_dir(new: Path, target: Path) -> Path:
    """Swap `new` in as `target` under the target's lock: readers see the old or the new
    directory, never a half-written one, and never none where the kernel can exchange."""
    with locked(Path(target)):
        return _swap(Path(new), Path(target))


TEMP_SUFFIX = ".tmp"


def _remove_stale_temps(out_dir: Path) -> None:
    """Half-written directories of `out_dir` that a killed writer left. Only a holder of the
    output's lock writes one, and the caller holds it: none of them is in use. Matched
    exactly (`.<name>.<8 random>.tmp`), so `phase7.candidate`'s are not `phase7`'s."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.[a-z0-9_]{{8}}{re.escape(TEMP_SUFFIX)}")
    for p in out_dir.parent.iterdir():
        if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def publish_dir(out_dir: Path, fill: Callable[[Path], None]) -> Path:
    """Have `fill` write a fresh directory beside `out_dir`, then swap it in, all under the
    output's lock; on any error the half-written directory is removed and `out_dir` is left
    as it was."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with locked(out_dir):
        _remove_stale_temps(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=TEMP_SUFFIX, dir=out_dir.parent))
        try:
            fill(tmp)
            return _swap(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Write JSON to a temp file beside `path`, fsync, rename: never half a file."""
    write_bytes(path, (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode())


def write_bytes(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write `data` to a temp file beside `path` (fsync unless told not to: a cache file that
    can be recomputed), then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> Any | None:
    """The JSON at `path`, or None when it is missing, unreadable or corrupt (a cache miss)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def private_dir(path: Path, what: str) -> Path:
    """`path` as a directory only this user can write (made 0700 when missing). Prefect loads
    cached task results from it with pickle, so whoever can write there runs code in the next
    run: a directory another user owns, or group/world-writable, is refused, named."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise PermissionError(
            f"{what} {path} is writable by others (mode {st.st_mode & 0o777:o}, owner uid "
            f"{st.st_uid}); cached results there are unpickled on load. `chmod go-w {path}` "
            "if it is yours, or point PREFECT_RESULTS_LOCAL_STORAGE_PATH elsewhere")
    return path
