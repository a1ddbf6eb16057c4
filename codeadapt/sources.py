"""Bring each source to a local Git checkout pinned at a commit.

`git` sources are fetched shallowly (no submodules, no hooks); `installed` distributions and
local `path` directories are snapshotted into a Git repo whose commit is content-addressed
(fixed author and date), so an unchanged source keeps its SHA across runs and machines.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata as md
import os
import shutil
from pathlib import Path, PurePosixPath

import git

from codeadapt.config import SourceSpec, check_name, check_ref, check_url
from codeadapt.fsutil import locked
from codeadapt.records import Checkout
from codeadapt.secrets import redact_url

SNAPSHOT_DATE = "2000-01-01T00:00:00+0000"
SNAPSHOT_IDENTITY = {"name": "codeadapt", "email": "codeadapt@localhost"}
# No hooks, no submodule recursion, no filters (LFS included), no command-running transports,
# no credential prompts, none of the user's or the system's git config: a fetch of an untrusted
# repository must never run code, download more than asked, or wait for a person.
SAFE_GIT_CONFIG = ["-c", "core.hooksPath=/dev/null", "-c", "submodule.recurse=false",
                   "-c", "protocol.allow=never", *(x for p in ("https", "http", "ssh", "git", "file")
                                                    for x in ("-c", f"protocol.{p}.allow=always")),
                   "-c", "core.fsmonitor=false", "-c", "filter.lfs.smudge=", "-c",
                   "filter.lfs.process=", "-c", "filter.lfs.required=false",
                   "-c", "core.symlinks=true", "-c", "uploadpack.packObjectsHook="]
GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "echo", "SSH_ASKPASS": "echo",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_LFS_SKIP_SMUDGE": "1",
           "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o ConnectTimeout=30"}
GIT_TIMEOUT_S = 600  # a network fetch; local commands finish far sooner


class SourceError(ValueError):
    """A source that cannot be synced (bad URL, missing ref, empty repo); not worth a retry."""


def sync_source(name: str, spec: SourceSpec, repos_dir: Path, project_root: Path) -> Checkout:
    """Fetch or snapshot one source into `repos_dir/<name>` and return its pinned checkout;
    under the checkout's lock, so two runs syncing one source take turns."""
    check_name(name)
    with locked(Path(repos_dir) / name):
        return _sync_source(name, spec, Path(repos_dir) / name, project_root)


def _sync_source(name: str, spec: SourceSpec, dest: Path, project_root: Path) -> Checkout:
    if spec.kind == "git":
        commit = _sync_git(name, spec.url or "", spec.ref, dest)
        origin = redact_url(spec.url or "")  # never a token in manifests, cards or logs
    elif spec.kind == "installed":
        files, version = _installed_files(name, spec.dist or "")
        commit = _snapshot(dest, files, f"snapshot of {spec.dist} {version}")
        origin = f"{spec.dist}=={version}"
    else:
        src = (project_root / (spec.path or "")).resolve()
        if not src.is_dir():
            raise SourceError(f"source {name!r}: directory {src} does not exist")
        commit = _snapshot(dest, _dir_files(src), f"snapshot of {spec.path}")
        origin = spec.path or ""
    return Checkout(
        name=name,
        kind=spec.kind,
        origin=origin,
        ref=spec.ref if spec.kind == "git" else "snapshot",
        commit=commit,
        path=str(dest.resolve()),
        group=spec.group,
        generator=spec.generator,
    )


def checkout_state(dest: Path) -> tuple[str | None, bool]:
    """(HEAD commit, whether the work tree matches it) of a checkout; (None, False) when
    `dest` is not a git work tree."""
    try:
        repo = git.Repo(dest)
        head = _git(repo, "rev-parse", "--verify", "--quiet", "HEAD^{commit}").strip()
        return head or None, not _git(repo, "status", "--porcelain", "--untracked-files=all").strip()
    except (git.InvalidGitRepositoryError, git.NoSuchPathError, git.GitCommandError):
        return None, False


def _git(repo: git.Repo, *args: str) -> str:
    return repo.git.execute(["git", *SAFE_GIT_CONFIG, *args], env=GIT_ENV,
                            kill_after_timeout=GIT_TIMEOUT_S)


def _sync_git(name: str, url: str, ref: str, dest: Path) -> str:
    """Shallow-fetch `ref` from `url`; check out again only when it moved."""
    try:
        check_ref(ref)
        check_url(url)
    except ValueError as exc:
        raise SourceError(f"source {name!r}: {exc}") from None
    if dest.is_symlink():
        raise SourceError(f"source {name!r}: {dest} is a symlink; refusing to write through it")
    if dest.exists() and not (dest / ".git").is_dir():
        raise SourceError(f"source {name!r}: {dest} exists and is not a Git repository")
    repo = git.Repo(dest) if dest.exists() else git.Repo.init(dest)
    with repo.config_writer() as cw:
        cw.set_value("core", "hooksPath", "/dev/null")
    if "origin" in [r.name for r in repo.remotes]:
        repo.remotes.origin.set_url(url)
    else:
        repo.create_remote("origin", url)
    try:
        heads = _git(repo, "ls-remote", "origin")
    except git.GitCommandError as exc:
        raise SourceError(f"source {name!r}: cannot reach {url}: {_stderr(exc)}") from None
    if not heads.strip():
        raise SourceError(f"source {name!r}: repository {url} is empty (no commits)")
    try:
        _git(repo, "fetch", "--depth=1", "--no-tags", "--no-recurse-submodules", "--end-of-options",
             "origin", ref)
    except git.GitCommandError:
        # Servers that refuse a shallow fetch by SHA (plain local repos) still serve everything.
        try:
            _git(repo, "fetch", "--no-recurse-submodules", "--tags", "--end-of-options", "origin")
            sha = _git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options",
                       f"{ref}^{{commit}}")
        except git.GitCommandError:
            raise SourceError(f"source {name!r}: ref {ref!r} not found in {url}") from None
    else:
        sha = _git(repo, "rev-parse", "FETCH_HEAD^{commit}")
    current = repo.head.commit.hexsha if repo.head.is_valid() else None
    if current != sha:
        _git(repo, "checkout", "--force", "--detach", sha)  # sha: 40 hex digits from rev-parse
        _git(repo, "clean", "-fdx")
    return sha


def _stderr(exc: git.GitCommandError) -> str:
    text = (exc.stderr or str(exc)).strip()
    return " ".join(text.replace("stderr:", "").split())[:300]


def _installed_files(name: str, dist: str) -> tuple[dict[str, Path], str]:
    """Files an installed distribution put in site-packages (no metadata, no bytecode)."""
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        raise SourceError(f"source {name!r}: distribution {dist!r} is not installed") from None
    files: dict[str, Path] = {}
    for f in d.files or []:
        rel = PurePosixPath(f.as_posix())
        if rel.parts and (rel.parts[0] == ".." or rel.parts[0].endswith((".dist-info", ".egg-info"))):
            continue
        if "__pycache__" in rel.parts or rel.suffix in {".pyc", ".pyo", ".so", ".pyd"}:
            continue
        path = Path(str(f.locate()))
        if path.is_file() and not path.is_symlink():
            files[rel.as_posix()] = path
    if not files:
        raise SourceError(f"source {name!r}: distribution {dist!r} has no files to snapshot")
    return files, d.version


def _dir_files(src: Path) -> dict[str, Path]:
    files = {}
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d != ".git")
        for fn in filenames:
            p = Path(dirpath, fn)
            if p.is_file() and not p.is_symlink():
                files[p.relative_to(src).as_posix()] = p
    return files


def _mirror(dest: Path, files: dict[str, Path]) -> None:
    """Make the work tree of `dest` hold exactly `files`, touching only what differs: an
    unchanged file keeps its inode and mtime, a changed one is replaced by rename. Another run
    reading this checkout (generating or replaying examples) while this one re-syncs an
    unchanged source sees no file vanish or change (it did when the tree was rewritten)."""
    wanted = set(files)
    dirs: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(dest, followlinks=False):
        base = Path(dirpath)
        if base == dest:
            dirnames[:] = [d for d in dirnames if d != ".git"]
        for d in [d for d in dirnames if (base / d).is_symlink()]:
            (base / d).unlink()
            dirnames.remove(d)
        for name in filenames:
            p = base / name
            if p.is_symlink() or p.relative_to(dest).as_posix() not in wanted:
                p.unlink()
        dirs += [base / d for d in dirnames]
    for d in reversed(dirs):  # deepest first; only those the pass above emptied
        with contextlib.suppress(OSError):
            d.rmdir()
    for rel, src in sorted(files.items()):
        target = dest / rel
        if target.is_file() and not target.is_symlink() and _same_file(src, target):
            continue
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.sync-tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()
    except OSError:
        return False


def _snapshot(dest: Path, files: dict[str, Path], message: str) -> str:
    """Mirror `files` into the work tree of `dest` and commit if anything changed."""
    repo = git.Repo(dest) if (dest / ".git").is_dir() else git.Repo.init(dest)
    _mirror(dest, files)
    _git(repo, "add", "--all", "--force", ".")
    if repo.head.is_valid() and not _git(repo, "status", "--porcelain"):
        return repo.head.commit.hexsha
    env = {
        **GIT_ENV,
        "GIT_AUTHOR_NAME": SNAPSHOT_IDENTITY["name"],
        "GIT_AUTHOR_EMAIL": SNAPSHOT_IDENTITY["email"],
        "GIT_COMMITTER_NAME": SNAPSHOT_IDENTITY["name"],
        "GIT_COMMITTER_EMAIL": SNAPSHOT_IDENTITY["email"],
        "GIT_AUTHOR_DATE": SNAPSHOT_DATE,
        "GIT_COMMITTER_DATE": SNAPSHOT_DATE,
    }
    repo.git.execute(
        ["git", *SAFE_GIT_CONFIG, "commit", "--quiet", "--no-verify", "--allow-empty", "-m", message],
        env=env,
    )
    return repo.head.commit.hexsha


def expected_py_bytes(spec: SourceSpec, dest: Path, project_root: Path) -> int:
    """Bytes of Python a source is expected to bring, to start the biggest first (a big
    repository started last is the build's straggler): an installed distribution's RECORD
    sizes, a local directory's files, a Git source's last checkout (0 when never synced).
    An estimate that only orders work: never raises, 0 when unknown."""
    try:
        if spec.kind == "installed":
            return _dist_py_bytes(spec.dist or "")
        root = (project_root / (spec.path or "")) if spec.kind == "path" else dest
        return _tree_py_bytes(root) if root.is_dir() else 0
    except (OSError, ValueError, md.PackageNotFoundError):
        return 0


@functools.lru_cache(maxsize=4096)
def _dist_py_bytes(dist: str) -> int:
    return sum(f.size or 0 for f in md.distribution(dist).files or [] if f.suffix == ".py")


def _tree_py_bytes(root: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for fn in filenames:
            if fn.endswith(".py"):
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, fn)).st_size
    return total
