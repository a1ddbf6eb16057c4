"""Operations: `codeadapt up` / `status` / `down` and the deployments, end to end on a real
server (free port, throwaway PREFECT_HOME, results and data in tmp dirs: never the user's
`.prefect/`, port 4200 or `data/`).

The stack and one phase7 deployment run are shared with test_ui.py through `shared_stack()` /
`shared_phase7_run()` (one per session). A tests/flows/conftest.py would shadow tests/conftest.py
for the `from conftest import ...` lines of the other test modules, hence this module."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from codeadapt import stack
from codeadapt.cli import main as cli_main
from codeadapt.config import load_settings

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[2]
PREFECT_CLI = str(Path(sys.executable).with_name("prefect"))
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
SMALL_BUDGETS = {"domain": (4, 2, 2), "popular": (10, 4, 4)}
DEPLOYMENTS = {"phase5/phase5", "phase6/phase6", "phase7/phase7", "nightly/nightly"}


# --------------------------------------------------------------------------- shared fixtures

@dataclass
class LiveStack:
    home: Path
    port: int
    tmp: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{stack.HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        return stack.api_url(self.port)

    def up(self) -> stack.UpResult:
        return stack.up(port=self.port, home=self.home, env=self.extra_env, timeout=240)

    def cli_env(self) -> dict[str, str]:
        """A user's shell after `export PREFECT_API_URL=...`."""
        return {**os.environ, **stack.OFFLINE_ENV, "PREFECT_API_URL": self.api_url,
                "PREFECT_API_AUTH_STRING": stack.api_auth(self.home),
                "PREFECT_HOME": str(self.home), "COLUMNS": "200"}

    def api(self, method: str, path: str, body: Any = None) -> Any:
        return stack._request(method, f"{self.api_url}{path}", body, timeout=30,
                              auth=stack.api_auth(self.home))

    def log(self, name: str, n: int = 60) -> str:
        return stack._tail(self.home / "logs" / f"{name}.log", n)


_SHARED: dict[str, Any] = {}


def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> LiveStack:
    """The session's stack (not started: `up()` it)."""
    if "stack" not in _SHARED:
        tmp = tmp_path_factory.mktemp("stack")
        _SHARED["stack"] = LiveStack(
            home=tmp / "prefect-home", port=stack.free_port(), tmp=tmp,
            extra_env={"PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp / "results"),
                       "PREFECT_WORKER_QUERY_SECONDS": "1"})
    return _SHARED["stack"]


def phase7_overrides(data: Path) -> list[str]:
    out = [f"paths.data='{data}'", f"paths.repos='{data / 'repos'}'",
           f"paths.adapters='{data / 'adapters'}'"]
    for g, (grep, read, explain) in SMALL_BUDGETS.items():
        out.append(f"groups.{g}.budget={{grep = {grep}, read = {read}, explain = {explain}}}")
    return out


def wait_flow_run(s: LiveStack, run_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fr = s.api("GET", f"/flow_runs/{run_id}")
        if fr["state_type"] in TERMINAL:
            return fr
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} unfinished after {timeout} s; worker log:\n{s.log('worker')}")


def shared_phase7_run(s: LiveStack) -> dict[str, Any]:
    """`prefect deployment run 'phase7/phase7'` as a user types it (data only, small budgets,
    data under a tmp dir), waited for through the API. Once per session."""
    if "run" not in _SHARED:
        s.up()
        data = s.tmp / "data"
        overrides = phase7_overrides(data)
        t0 = time.monotonic()
        out = subprocess.run([PREFECT_CLI, "deployment", "run", "phase7/phase7", "--param", "models=false",
                              "--param", f"overrides={json.dumps(overrides)}"],
                             env=s.cli_env(), cwd=s.tmp, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        m = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout)
        assert m, out.stdout
        fr = wait_flow_run(s, m.group(1))
        assert fr["state_type"] == "COMPLETED", (fr["state"], s.log("worker"))
        _SHARED["run"] = {"id": fr["id"], "name": fr["name"], "flow_run": fr, "data": data,
                          "seconds": round(time.monotonic() - t0, 1)}
    return _SHARED["run"]


@pytest.fixture(scope="session")
def live_stack(tmp_path_factory: pytest.TempPathFactory):
    s = shared_stack(tmp_path_factory)
    yield s
    stack.down(s.home)  # whatever a test left running (harmless when already down)


@pytest.fixture(scope="session")
def phase7_run(live_stack: LiveStack) -> dict[str, Any]:
    return shared_phase7_run(live_stack)


# --------------------------------------------------------------------------- helpers

def processes_with_home(home: Path) -> list[int]:
    """PIDs (Linux) whose environment has PREFECT_HOME=home: everything the stack started."""
    needle = f"PREFECT_HOME={stack.paths(home).home}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0") and stack.alive(int(d.name)):
                found.append(int(d.name))
        except OSError:
            continue
    return found


def graph_nodes(s: LiveStack, run_id: str) -> dict[str, dict[str, Any]]:
    """graph-v2 nodes by id (the API lists a node once per edge: de-duplicated)."""
    graph = s.api("GET", f"/flow_runs/{run_id}/graph-v2")
    return {node_id: node for node_id, node in graph["nodes"]}


# --------------------------------------------------------------------------- tests

def test_up_status_and_a_second_up_is_harmless(live_stack: LiveStack, monkeypatch, capsys):
    t0 = time.monotonic()
    first = live_stack.up()
    took = time.monotonic() - t0
    assert not first.already_running, first.notes
    state = stack.read_state(live_stack.home)
    assert state["api_url"] == live_stack.api_url
    pids = (state["server"]["pid"], state["worker"]["pid"])
    assert all(stack.alive(p) for p in pids)
    assert (live_stack.home / "prefect.db").is_file()  # SQLite under the stack's home
    assert {"server.log", "worker.log", "deploy.log"} <= {p.name for p in (live_stack.home / "logs").iterdir()}

    st = stack.status(live_stack.home)
    assert st["running"] and st["healthy"] and st["worker_alive"] and st["pool_status"] == "READY"
    deps = {d["name"]: d for d in st["deployments"]}
    assert set(deps) == DEPLOYMENTS
    assert all(d["pool"] == "codeadapt" and not d["paused"] for d in deps.values())
    assert deps["nightly/nightly"]["schedules"] == ["0 3 * * * UTC"]
    for name in ("phase5/phase5", "phase7/phase7"):
        dep = live_stack.api("GET", f"/deployments/name/{name}")
        assert dep["parameters"] == {"profile": "offline", "overrides": []}
        assert dep["pull_steps"] == [{"prefect.deployments.steps.set_working_directory":
                                      {"directory": str(REPO_ROOT)}}]
    assert live_stack.api("GET", "/v2/concurrency_limits/gpu")["limit"] == 1
    assert live_stack.api("GET", "/work_pools/codeadapt")["type"] == "process"

    monkeypatch.setenv("PREFECT_HOME", str(live_stack.home))  # what the CLI would set
    assert cli_main(["status", "--home", str(live_stack.home)]) == 0
    out = capsys.readouterr().out
    assert f"server:  {live_stack.url}" in out and "healthy" in out and "nightly/nightly" in out
    assert f"export PREFECT_API_URL={live_stack.api_url}" in out

    # Locked down: the API wants the generated password (0600), a state change wants a CSRF
    # token, and a page from another origin gets no CORS grant.
    assert (live_stack.home / "api-auth").stat().st_mode & 0o777 == 0o600
    for kwargs, code in (({}, 401), ({"auth": "codeadapt:wrong"}, 401),
                         ({"auth": stack.api_auth(live_stack.home), "headers": {}}, None)):
        try:
            stack._request("GET", f"{live_stack.api_url}/work_pools/codeadapt", **kwargs)
            assert code is None
        except urllib.error.HTTPError as exc:
            assert exc.code == code, kwargs
    no_csrf = urllib.request.Request(
        f"{live_stack.api_url}/flows/filter", data=b"{}", method="POST",
        headers={"Content-Type": "application/json", "Authorization": "Basic " + base64.b64encode(
            stack.api_auth(live_stack.home).encode()).decode()})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(no_csrf, timeout=10)
    assert info.value.code == 403
    for origin, allowed in (("http://evil.example", False), (live_stack.url, True)):
        req = urllib.request.Request(f"{live_stack.api_url}/health", headers={"Origin": origin})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert (resp.headers.get("Access-Control-Allow-Origin") == origin) is allowed, origin
            assert resp.headers.get("Access-Control-Allow-Origin") != "*"

    again = live_stack.up()
    assert again.already_running and "already running" in again.notes[0]
    assert (again.state["server"]["pid"], again.state["worker"]["pid"]) == pids
    assert cli_main(["up", "--home", str(live_stack.home), "--port", str(live_stack.port)]) == 0
    out = capsys.readouterr().out
    assert "already running" in out and f"export PREFECT_API_URL={live_stack.api_url}" in out
    assert stack.read_state(live_stack.home)["server"]["pid"] == pids[0]
    print(f"up took {took:.1f} s")


def test_a_port_in_use_is_a_clear_error_naming_it(tmp_path: Path, monkeypatch, capsys):
    with socket.socket() as other:
        other.bind((stack.HOST, 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(stack.StackError, match=f"port {port} on 127.0.0.1 is already in use"):
            stack.up(port=port, home=tmp_path / "home")
        monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
        assert cli_main(["up", "--home", str(tmp_path / "home"), "--port", str(port)]) == 1
        assert f"port {port}" in capsys.readouterr().err
    assert stack.read_state(tmp_path / "home") is None and processes_with_home(tmp_path / "home") == []


def test_a_deployment_run_builds_phase7_with_a_node_per_source_and_a_counts_artifact(
        live_stack: LiveStack, phase7_run: dict[str, Any]):
    print(f"deployment run → Completed in {phase7_run['seconds']} s")
    settings = load_settings(REPO_ROOT / "pipeline.toml", profile="offline")
    sources = {n: spec for p in settings.phase_chain("phase7") for n, spec in settings.phase_sources(p).items()}
    python = sorted(n for n, spec in sources.items() if spec.generator == "python")
    html = sorted(n for n, spec in sources.items() if spec.generator == "html")
    assert len(python) == 11 and html == ["html"]

    nodes = graph_nodes(live_stack, phase7_run["id"])
    by_label: dict[str, list[dict]] = {}
    for node in nodes.values():
        by_label.setdefault(node["label"], []).append(node)
    expected = ([f"sync_repo[{n}]" for n in sources] + [f"extract_repo[{n}]" for n in python]
                + [f"make_examples[{n}]" for n in python] + [f"html_examples[{n}]" for n in html]
                + [f"build_dataset[{p}]" for p in ("phase5", "phase6", "phase7")])
    for label in expected:
        assert len(by_label.get(label, [])) == 1, (label, sorted(by_label))
        node = by_label[label][0]
        assert node["kind"] == "task-run" and node["state_type"] == "COMPLETED", node
    # every stage node is Completed or Cached (Cached is a COMPLETED state)
    runs = live_stack.api("POST", "/task_runs/filter",
                          {"flow_runs": {"id": {"any_": [phase7_run["id"]]}}, "limit": 200})
    states = {r["name"]: r["state"]["name"] for r in runs}
    assert all(states[label] in ("Completed", "Cached") for label in expected), states

    arts = live_stack.api("POST", "/artifacts/filter", {"artifacts": {
        "key": {"any_": ["dataset-counts-phase7"]}, "flow_run_id": {"any_": [phase7_run["id"]]}}})
    assert len(arts) == 1 and arts[0]["type"] == "table"
    rows = json.loads(arts[0]["data"]) if isinstance(arts[0]["data"], str) else arts[0]["data"]
    assert {r["source"] for r in rows} == set(sources) | {"ALL"}
    total = next(r for r in rows if r["source"] == "ALL")["total"]
    manifest = json.loads((phase7_run["data"] / "phase7" / "manifest.json").read_text())
    assert total == manifest["counts"]["total"] > 0  # written where the overrides said
    assert manifest["inputs"]["groups"]["popular"]["budget"] == {"grep": 10, "read": 4, "explain": 4}


def test_serve_py_takes_over_the_names_and_keeps_the_nightly_schedule_on_shutdown(live_stack: LiveStack):
    live_stack.up()
    log = (live_stack.tmp / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "deployments" / "serve.py"),
                             "--timezone", "Europe/Berlin"],
                            env={**live_stack.cli_env(), **live_stack.extra_env}, cwd=live_stack.tmp,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:  # 404 between serve.py deleting the work-pool deployment and re-registering it
                nightly = live_stack.api("GET", "/deployments/name/nightly/nightly")
            except urllib.error.HTTPError:
                nightly = {}
            if nightly.get("work_pool_name", "?") is None and nightly["schedules"] and \
                    nightly["schedules"][0]["schedule"]["timezone"] == "Europe/Berlin":
                break
            assert proc.poll() is None, (live_stack.tmp / "serve.log").read_text()
            time.sleep(0.5)
        else:
            raise AssertionError((live_stack.tmp / "serve.log").read_text())
        served = {f"{d['name']}/{d['name']}": d for d in live_stack.api("POST", "/deployments/filter", {})}
        assert set(served) == DEPLOYMENTS and all(d["work_pool_name"] is None for d in served.values())
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # what `kill` / a service manager sends
        proc.wait(timeout=60)
        log.close()
    nightly = live_stack.api("GET", "/deployments/name/nightly/nightly")
    assert not nightly["paused"] and nightly["schedules"][0]["active"]
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    # back to the worker deployments, as README says
    stack.deploy(stack.paths(live_stack.home), stack.stack_env(stack.paths(live_stack.home),
                 live_stack.api_url, live_stack.port, live_stack.extra_env), stack.PREFECT_FILE)
    assert live_stack.api("GET", "/deployments/name/phase7/phase7")["work_pool_name"] == "codeadapt"


def test_down_stops_everything_it_started_even_mid_run(live_stack: LiveStack, monkeypatch, capsys):
    live_stack.up()
    state = stack.read_state(live_stack.home)
    # a flow run in progress: the worker starts it in a process group of its own
    data = live_stack.tmp / "data-down"
    out = subprocess.run([PREFECT_CLI, "deployment", "run", "phase7/phase7", "--param", "models=false",
                          "--param", f"overrides={json.dumps(phase7_overrides(data)[:3])}"],
                         env=live_stack.cli_env(), cwd=live_stack.tmp, capture_output=True, text=True,
                         timeout=120)
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1)
    deadline = time.monotonic() + 120
    while live_stack.api("GET", f"/flow_runs/{run_id}")["state_type"] != "RUNNING":
        assert time.monotonic() < deadline, live_stack.log("worker")
        time.sleep(0.3)
    started = processes_with_home(live_stack.home)
    assert {state["server"]["pid"], state["worker"]["pid"]} < set(started)  # + the flow run's
    stopped = stack.down(live_stack.home)
    assert {state["server"]["pid"], state["worker"]["pid"]} <= set(stopped)
    assert processes_with_home(live_stack.home) == []
    assert not any(stack.alive(p) for p in started)
    assert stack.port_free(live_stack.port)
    assert stack.read_state(live_stack.home) is None
    assert stack.status(live_stack.home) == {"running": False, "home": str(live_stack.home)}
    monkeypatch.setenv("PREFECT_HOME", str(live_stack.home))
    assert cli_main(["down", "--home", str(live_stack.home)]) == 0
    assert "nothing to stop" in capsys.readouterr().out
    assert cli_main(["status", "--home", str(live_stack.home)]) == 3
