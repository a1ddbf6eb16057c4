"""The Prefect UI served by `codeadapt up` renders a phase7 deployment run's page, checked
with Debian's headless chromium (`apt-get install chromium`; scripts/setup.sh installs it), in its new headless mode (the old one denies
localStorage, where the UI keeps the password).

Shares the stack and the run with test_stack.py; when that module's last test has brought the
stack down, `up()` starts it again on the same home: the run is read back from its SQLite DB."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
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
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
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


def sign_in(tmp_path: Path, origin: str, auth: str) -> None:
    """What a user does once on the login page: store the stack's password in the UI's
    localStorage (`prefect-password`, as the UI's own login form does), through the DevTools
    protocol of a headless chromium on the profile the later calls use."""
    from websockets.sync.client import connect

    port = socket_port()
    proc = subprocess.Popen([CHROMIUM, *FLAGS[:-1], f"--user-data-dir={tmp_path / 'chromium-profile'}",
                             f"--remote-debugging-port={port}", f"{origin}/"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        page = None
        while page is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    page = next((t for t in json.load(r) if t["type"] == "page" and t["url"].startswith(origin)), None)
            except OSError:
                pass
            time.sleep(0.5)
        assert page, "chromium did not open the UI"
        with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            # A fresh profile denies localStorage for a moment after start-up: ask again.
            for i in range(1, 41):
                ws.send(json.dumps({"id": i, "method": "Runtime.evaluate", "params": {
                    "expression": f"localStorage.setItem('prefect-password', btoa({json.dumps(auth)})); "
                                  "localStorage.getItem('prefect-password')"}}))
                while (msg := json.loads(ws.recv(timeout=30))).get("id") != i:
                    pass
                if msg["result"]["result"].get("value"):
                    break
                time.sleep(0.5)
            assert msg["result"]["result"].get("value"), msg
    finally:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version", timeout=5) as r:
                browser = json.load(r)["webSocketDebuggerUrl"]
            with connect(browser) as ws:  # a clean close flushes localStorage to the profile
                ws.send(json.dumps({"id": 1, "method": "Browser.close"}))
            proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()


def socket_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_flow_run_page_renders_the_run(ui_stack: LiveStack, tmp_path: Path):
    run: dict[str, Any] = shared_phase7_run(ui_stack)
    ui_stack.up()  # harmless when running; restarts it (same DB) after test_stack's `down`
    url = f"{ui_stack.url}/runs/flow-run/{run['id']}"
    # Without the password the UI shows its login page (the API answers 401).
    assert run["name"] not in chromium(tmp_path / "anon", "--dump-dom", url).stdout
    sign_in(tmp_path, ui_stack.url, stack.api_auth(ui_stack.home))

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
