"""The Prefect UI served by `codeadapt up` renders a phase7 deployment run's page, checked
with Debian's headless chromium (`apt-get install chromium`; scripts/setup.sh installs it).

Shares the stack and the run with test_stack.py; when that module's last test has brought the
stack down, `up()` starts it again on the same home: the run is read back from its SQLite DB."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_stack import LiveStack, shared_phase7_run, shared_stack

from codeadapt import stack

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                       reason="Debian's chromium is not installed (apt-get install chromium; "
                              "scripts/setup.sh installs it)"),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=15000"]


@pytest.fixture(scope="session")
def ui_stack(tmp_path_factory: pytest.TempPathFactory):
    s = shared_stack(tmp_path_factory)
    yield s
    stack.down(s.home)


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_the_flow_run_page_renders_the_run(ui_stack: LiveStack, tmp_path: Path):
    run: dict[str, Any] = shared_phase7_run(ui_stack)
    ui_stack.up()  # harmless when running; restarts it (same DB) after test_stack's `down`
    url = f"{ui_stack.url}/runs/flow-run/{run['id']}"

    dom = chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-3000:]
    assert run["name"] in dom.stdout, dom.stdout[-3000:]
    assert "Completed" in dom.stdout and "phase7" in dom.stdout

    shot = tmp_path / "run.png"
    res = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,1000", url)
    assert res.returncode == 0, res.stderr[-3000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    print(f"screenshot: {shot}")
