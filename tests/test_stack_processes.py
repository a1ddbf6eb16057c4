"""`down` signals only processes the stack started: a recorded PID that another program now
uses (PID reuse) is left alone, with or without a recorded start time."""

from __future__ import annotations

import subprocess
import sys

from codeadapt import stack


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)


def test_a_reused_pid_is_never_signalled() -> None:
    other = _sleeper()  # stands for an unrelated program that got the recorded PID
    try:
        for record in ({"pid": other.pid, "started": "Thu Jan  1 00:00:00 1970"},
                       {"pid": other.pid, "started": None},  # no start time recorded
                       {"pid": other.pid, "started": None, "cmd": ["prefect", "server", "start"]}):
            assert stack.stop_processes([record], timeout=1) == [], record
            assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_our_process_is_stopped_by_start_time_or_by_its_command_line() -> None:
    for by_cmd in (False, True):
        ours = _sleeper()
        cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
        record = ({"pid": ours.pid, "started": None, "cmd": cmd} if by_cmd
                  else {"pid": ours.pid, "started": stack._started(ours.pid)})
        assert stack.stop_processes([record], timeout=5) == [ours.pid]
        assert ours.wait(10) is not None
