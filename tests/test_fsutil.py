"""Publishing outputs: no moment without a target, interrupted swaps repaired, concurrent
writers serialised by the output's lock, corrupt state files read as missing."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import pytest

from codeadapt import fsutil


def _fill(tag: str):
    def fill(d: Path) -> None:
        (d / "a").write_text(tag)
        (d / "b").write_text(tag)
    return fill


def _writer(target: str, n: int, tag: str) -> None:
    for i in range(n):
        fsutil.publish_dir(Path(target), _fill(f"{tag}{i}"))


def test_concurrent_writers_and_a_reader_never_find_the_output_missing(tmp_path: Path) -> None:
    target = tmp_path / "out"
    fsutil.publish_dir(target, _fill("start"))
    stop, seen = threading.Event(), {"missing": 0, "reads": 0}

    def read() -> None:
        while not stop.is_set():
            try:
                (target / "a").read_text()
            except FileNotFoundError:
                seen["missing"] += 1
                continue
            seen["reads"] += 1
    reader = threading.Thread(target=read)
    reader.start()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(target), 60, t)) for t in ("x", "y")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    stop.set()
    reader.join()
    assert [p.exitcode for p in procs] == [0, 0]
    assert seen["reads"] > 50 and seen["missing"] == 0
    assert {p.name for p in tmp_path.iterdir()} == {"out", ".locks"}  # no temp or .old left


def test_a_swap_killed_after_moving_the_old_output_aside_is_repaired(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    fsutil.publish_dir(target, _fill("promoted"))
    os.replace(target, tmp_path / ".adapter.old")  # the state a kill mid-swap leaves
    assert fsutil.recover_all(tmp_path) == ["adapter"]
    assert (target / "a").read_text() == "promoted" and not (tmp_path / ".adapter.old").exists()
    # A leftover beside a complete output is only garbage: deleted by the next publish.
    (tmp_path / ".adapter.old").mkdir()
    fsutil.publish_dir(target, _fill("new"))
    assert (target / "a").read_text() == "new" and not (tmp_path / ".adapter.old").exists()


def test_the_lock_serialises_builds_of_one_output_and_is_reentrant(tmp_path: Path) -> None:
    order: list[str] = []

    def build(tag: str) -> None:
        with fsutil.locked(tmp_path / "out"):
            order.append(f"{tag}-in")
            with fsutil.locked(tmp_path / "out"):  # same thread: no deadlock
                time.sleep(0.1)
            order.append(f"{tag}-out")
    ts = [threading.Thread(target=build, args=(t,)) for t in "ab"]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert order in (["a-in", "a-out", "b-in", "b-out"], ["b-in", "b-out", "a-in", "a-out"])


def test_corrupt_or_missing_state_reads_as_a_miss(tmp_path: Path) -> None:
    f = tmp_path / "run.json"
    assert fsutil.read_json(f) is None
    fsutil.write_json(f, {"a": [1, 2]})
    assert fsutil.read_json(f) == {"a": [1, 2]}
    f.write_text('{"a": [1,')  # truncated by a kill
    assert fsutil.read_json(f) is None
    f.write_bytes(b"\xff\xfe")
    assert fsutil.read_json(f) is None
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # write_json leaves no temp file


def test_result_storage_others_can_write_is_refused(tmp_path: Path):
    """Asserts: Prefect's result storage (unpickled on cache hits) is refused, named, when it
    is group- or world-writable; a missing one is made 0700; the flows check it first."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from codeadapt.fsutil import private_dir
    from flows.phase import trusted_results

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match=str(shared)):
        private_dir(shared, "results")
    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: shared}):
        with pytest.raises(PermissionError, match="Prefect result storage"):
            trusted_results()
    fresh = private_dir(tmp_path / "new" / "results", "results")
    assert fresh.stat().st_mode & 0o777 == 0o700
    shared.chmod(0o755)
    assert private_dir(shared, "results") == shared


def _publish_and_die(target: str, stage: str) -> None:
    """Publish "new" over `target` and SIGKILL this process at `stage` (a real kill, no
    cleanup runs): while filling, right after the old output moved aside (no exchange
    syscall, as on file systems without renameat2), or before the old one is deleted."""
    import signal

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    real_replace = os.replace
    fsutil._exchange = lambda a, b: False  # the fallback path has the window

    def replace(src, dst):
        real_replace(src, dst)
        if stage == "aside" and str(dst).endswith(".old"):
            die()
        if stage == "swapped" and Path(dst) == Path(target):
            die()

    os.replace = replace

    def fill(d: Path) -> None:
        (d / "a").write_text("new")
        if stage == "fill":
            die()
        (d / "b").write_text("new")

    fsutil.publish_dir(Path(target), fill)


@pytest.mark.parametrize("stage", ["fill", "aside", "swapped"])
def test_a_writer_killed_at_any_point_of_a_publish_loses_nothing(tmp_path: Path, stage: str) -> None:
    """Asserts: a process SIGKILLed while filling, after moving the old output aside, or after
    swapping in the new one leaves an output that the next run finds whole, old or new, never
    missing or mixed; its half-written temp directory and `.old` leftovers are gone after the
    next publish."""
    target = tmp_path / "adapter"
    fsutil.publish_dir(target, _fill("old"))
    child = mp.get_context("spawn").Process(target=_publish_and_die, args=(str(target), stage))
    child.start()
    child.join(60)
    assert child.exitcode == -9  # killed, as a power cut or an OOM kill would
    fsutil.recover_all(tmp_path)  # what every flow does first
    texts = {(target / "a").read_text(), (target / "b").read_text()}
    assert texts == ({"old"} if stage in ("fill", "aside") else {"new"}), (stage, texts)
    fsutil.publish_dir(target, _fill("next"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", "adapter"]
    assert (target / "a").read_text() == "next"
