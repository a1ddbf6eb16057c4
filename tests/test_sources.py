"""Real Git repos built here; each bad input gets a clear error naming it."""

from pathlib import Path

import pytest
from conftest import commit_files, git, make_repo

from codeadapt.config import SourceSpec
from codeadapt.sources import SourceError, sync_source


def spec(url: str, ref: str = "HEAD") -> SourceSpec:
    return SourceSpec(kind="git", url=url, ref=ref, group="g")


def test_git_source_pins_commit_and_refetches_only_when_ref_moves(tmp_path: Path):
    upstream = tmp_path / "up"
    first = make_repo(upstream, {"pkg/a.py": "def f():\n    pass\n"})
    repos = tmp_path / "repos"
    co = sync_source("up", spec(str(upstream), "main"), repos, tmp_path)
    assert co.commit == first and (repos / "up" / "pkg" / "a.py").is_file()
    assert git(repos / "up", "rev-parse", "HEAD") == first
    # Unchanged ref: same commit, work tree untouched (a marker file survives).
    (repos / "up" / "marker").write_text("x")
    assert sync_source("up", spec(str(upstream), "main"), repos, tmp_path).commit == first
    assert (repos / "up" / "marker").exists()
    # Ref moved: checked out again at the new commit, clean.
    second = commit_files(upstream, {"pkg/b.py": "X = 1\n"})
    co2 = sync_source("up", spec(str(upstream), "main"), repos, tmp_path)
    assert co2.commit == second != first
    assert (repos / "up" / "pkg" / "b.py").is_file() and not (repos / "up" / "marker").exists()


def test_git_source_by_tag_and_sha(tmp_path: Path):
    upstream = tmp_path / "up"
    first = make_repo(upstream, {"a.py": "A = 1\n"})
    git(upstream, "tag", "v1")
    commit_files(upstream, {"a.py": "A = 2\n"})
    assert sync_source("t", spec(str(upstream), "v1"), tmp_path / "r", tmp_path).commit == first
    assert sync_source("s", spec(str(upstream), first), tmp_path / "r", tmp_path).commit == first


def test_hooks_never_run(tmp_path: Path):
    upstream = tmp_path / "up"
    make_repo(upstream, {"a.py": "A = 1\n"})
    dest = tmp_path / "r" / "h"
    dest.mkdir(parents=True)
    git(dest, "init", "-q")
    hook = dest / ".git" / "hooks" / "post-checkout"
    hook.write_text(f"#!/bin/sh\ntouch {tmp_path}/hook-ran\n")
    hook.chmod(0o755)
    sync_source("h", spec(str(upstream), "main"), tmp_path / "r", tmp_path)
    assert not (tmp_path / "hook-ran").exists()


def test_unreachable_url(tmp_path: Path):
    with pytest.raises(SourceError, match=r"'gone'.*cannot reach .*does-not-exist"):
        sync_source("gone", spec(str(tmp_path / "does-not-exist")), tmp_path / "r", tmp_path)


def test_missing_ref(tmp_path: Path):
    make_repo(tmp_path / "up", {"a.py": "A = 1\n"})
    with pytest.raises(SourceError, match=r"ref 'no-such-branch' not found"):
        sync_source("up", spec(str(tmp_path / "up"), "no-such-branch"), tmp_path / "r", tmp_path)


def test_empty_repo(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    git(tmp_path / "empty", "init", "-q")
    with pytest.raises(SourceError, match=r"'empty'.*is empty"):
        sync_source("empty", spec(str(tmp_path / "empty")), tmp_path / "r", tmp_path)


def test_name_escaping_repos_dir_is_rejected(tmp_path: Path):
    with pytest.raises(ValueError, match=r"invalid source name '\.\./x'"):
        sync_source("../x", spec(str(tmp_path)), tmp_path / "r", tmp_path)
    assert not (tmp_path / "x").exists()


def test_installed_snapshot_is_content_addressed(tmp_path: Path):
    s = SourceSpec(kind="installed", dist="svcs", group="g")
    a = sync_source("svcs", s, tmp_path / "a", tmp_path)
    b = sync_source("svcs", s, tmp_path / "b", tmp_path)
    again = sync_source("svcs", s, tmp_path / "a", tmp_path)
    assert a.commit == b.commit == again.commit
    assert (Path(a.path) / "svcs" / "_core.py").is_file()
    assert not list(Path(a.path).rglob("*.dist-info"))
    assert a.origin.startswith("svcs==")
    assert "snapshot of svcs" in git(Path(a.path), "log", "-1", "--format=%s")


def test_missing_distribution_and_directory(tmp_path: Path):
    with pytest.raises(SourceError, match="'nope'.*not installed"):
        sync_source("nope", SourceSpec(kind="installed", dist="no-such-dist-xyz", group="g"), tmp_path, tmp_path)
    with pytest.raises(SourceError, match="does not exist"):
        sync_source("d", SourceSpec(kind="path", path="missing-dir", group="g"), tmp_path / "r", tmp_path)


@pytest.mark.parametrize("ref", ["--upload-pack=touch PWNED; git-upload-pack", "-c", "a b",
                                 "main..other", "x@{1}", "ref\nnewline", "", "refs/heads/x.lock"])
def test_a_ref_that_git_could_read_as_an_option_is_refused(tmp_path: Path, ref: str):
    """Asserts: hostile refs fail config validation naming the ref, and the sync itself refuses
    them too (a SourceError), with no command run: the file the injection would touch is absent."""
    up = tmp_path / "up"
    make_repo(up, {"a.py": "x = 1\n"})
    with pytest.raises(ValueError, match="ref"):
        spec(str(up), ref)
    from codeadapt import sources

    with pytest.raises(SourceError, match="is not a branch, tag or commit"):
        sources._sync_git("up", str(up), ref, tmp_path / "repos" / "up")
    assert not list(tmp_path.rglob("PWNED")) and not (Path.cwd() / "PWNED").exists()


@pytest.mark.parametrize("url", ["ext::sh -c touch% PWNED", "--upload-pack=touch PWNED", "fd::17",
                                 "transport::x"])
def test_command_running_transports_are_refused(tmp_path: Path, url: str):
    with pytest.raises(ValueError, match="url"):
        spec(url, "main")
    assert not list(tmp_path.rglob("PWNED"))


def test_sync_never_writes_through_a_symlinked_destination(tmp_path: Path):
    """Asserts: data/repos/<name> being a symlink (to a directory holding a file) is refused and
    the target's file survives."""
    up = tmp_path / "up"
    make_repo(up, {"a.py": "x = 1\n"})
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    repos = tmp_path / "repos"
    repos.mkdir()
    (repos / "up").symlink_to(victim)
    with pytest.raises(SourceError, match="symlink"):
        sync_source("up", spec(str(up), "main"), repos, tmp_path)
    assert (victim / "keep.txt").read_text() == "mine"


def test_the_users_git_config_does_not_apply(tmp_path: Path, monkeypatch):
    """Asserts: a global git config that would rewrite every URL to a missing host is ignored."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text('[url "/nonexistent/"]\n\tinsteadOf = /\n')
    monkeypatch.setenv("HOME", str(home))
    up = tmp_path / "up"
    make_repo(up, {"a.py": "x = 1\n"})
    co = sync_source("up", spec(str(up), "main"), tmp_path / "repos", tmp_path)
    assert (Path(co.path) / "a.py").is_file()


def test_a_remote_that_never_answers_is_cut_off_by_the_git_timeout(tmp_path: Path, monkeypatch):
    """Asserts: a server that accepts the connection and then says nothing (a stalled or
    hostile remote) ends the sync with a SourceError naming the source within the git
    timeout, instead of hanging the flow."""
    import socket
    import threading
    import time

    from codeadapt import sources

    monkeypatch.setattr(sources, "GIT_TIMEOUT_S", 3)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(srv.accept()[0]), daemon=True).start()
    url = f"http://127.0.0.1:{srv.getsockname()[1]}/repo.git"
    tic = time.monotonic()
    with pytest.raises(SourceError, match="'stalled'"):
        sync_source("stalled", spec(url), tmp_path / "repos", tmp_path)
    assert time.monotonic() - tic < 30
    srv.close()


def test_ssh_runs_in_batch_mode_and_never_prompts(tmp_path: Path, monkeypatch):
    """Asserts: for an ssh URL git starts ssh with BatchMode=yes (no password or host-key
    prompt can block a nightly run; recorded by an `ssh` stand-in first on PATH), and the
    failure is a SourceError naming the source."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "ssh-argv"
    (bin_dir / "ssh").write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 255\n')
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SourceError, match="'over-ssh'"):
        sync_source("over-ssh", spec("ssh://git@example.invalid/repo.git"), tmp_path / "repos", tmp_path)
    assert "BatchMode=yes" in log.read_text()


def test_resyncing_an_unchanged_snapshot_touches_no_file(tmp_path: Path):
    """Asserts: syncing an unchanged `path` source again leaves every work-tree file as it was
    (same inode and mtime: a run reading the checkout meanwhile sees nothing vanish), while a
    changed, added and removed file is mirrored and committed."""
    src = tmp_path / "proj"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("A = 1\n")
    (src / "pkg" / "b.py").write_text("B = 1\n")
    spec_ = SourceSpec(kind="path", path="proj", group="g")
    first = sync_source("p", spec_, tmp_path / "repos", tmp_path)
    tree = Path(first.path)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tree.rglob("*.py")}
    assert sync_source("p", spec_, tmp_path / "repos", tmp_path).commit == first.commit
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tree.rglob("*.py")} == before
    (src / "pkg" / "a.py").write_text("A = 2\n")
    (src / "pkg" / "b.py").unlink()
    (src / "c.py").write_text("C = 1\n")
    moved = sync_source("p", spec_, tmp_path / "repos", tmp_path)
    assert moved.commit != first.commit
    assert sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if ".git" not in p.parts) == [
        "c.py", "pkg", "pkg/a.py"]
    assert (tree / "pkg" / "a.py").read_text() == "A = 2\n"


def test_expected_size_orders_work_and_never_fails(tmp_path: Path):
    from codeadapt.sources import expected_py_bytes

    svcs = SourceSpec(kind="installed", dist="svcs", group="g")
    synced = sync_source("svcs", svcs, tmp_path / "repos" / "svcs", tmp_path)
    py = sum(p.stat().st_size for p in Path(synced.path).rglob("*.py") if ".git" not in p.parts)
    assert expected_py_bytes(svcs, tmp_path / "unused", tmp_path) == py > 0  # RECORD's sizes
    local = tmp_path / "proj"
    (local / "pkg").mkdir(parents=True)
    (local / "pkg" / "a.py").write_text("x = 1\n")
    (local / "notes.txt").write_text("not python")
    assert expected_py_bytes(SourceSpec(kind="path", path="proj", group="g"), tmp_path / "r", tmp_path) == 6
    git_spec = SourceSpec(kind="git", url="https://example.invalid/x.git", group="g")
    assert expected_py_bytes(git_spec, tmp_path / "never-synced", tmp_path) == 0
    assert expected_py_bytes(git_spec, Path(synced.path), tmp_path) == py  # its last checkout
    assert expected_py_bytes(SourceSpec(kind="installed", dist="no-such-dist-xyz", group="g"),
                             tmp_path, tmp_path) == 0
