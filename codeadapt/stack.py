"""A local Prefect stack for the project: server + work pool + `gpu` limit + deployments + worker.

`up` starts a Prefect server on 127.0.0.1 with SQLite under a project-local PREFECT_HOME
(`.prefect/`), locked down: an API auth string generated into `<home>/api-auth` (mode 0600)
that the server requires and the worker, deploy step and CLI send, CSRF protection on, and
CORS limited to the server's own origin (a web page elsewhere cannot drive the API, which can
start commands through the process work pool). It waits for `/api/health`, creates the `process` work pool and the `gpu` global
concurrency limit, deploys `deployments/prefect.yaml` and starts a worker. Every process it
starts is the leader of its own process group (session); their PIDs, start times and the URL
go to `<home>/stack.json`. `down` stops exactly those process groups, plus any process they
spawned into groups of their own (the worker starts each flow run in a new session), and
nothing else. `status` reports what runs. Logs: `<home>/logs/`.

Plain functions (no Prefect import at module level), so the CLI stays thin and tests can drive
a stack on a free port with a throwaway home.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"
HOST = "127.0.0.1"
DEFAULT_PORT = 4200
DEFAULT_POOL = "codeadapt"
NIGHTLY = "nightly"
OFFLINE_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}

Say = Callable[[str], None]


class StackError(RuntimeError):
    """Something the user must act on (port taken, server did not come up, deploy failed)."""


@dataclass(frozen=True)
class StackPaths:
    home: Path

    @property
    def state(self) -> Path:
        return self.home / "stack.json"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def auth_file(self) -> Path:
        return self.home / "api-auth"


def default_home() -> Path:
    return ROOT / ".prefect"


def paths(home: Path | str | None = None) -> StackPaths:
    return StackPaths(Path(home).resolve() if home else default_home())


def api_url(port: int, host: str = HOST) -> str:
    return f"http://{host}:{port}/api"


def env_line(url: str, home: Path | str | None = None) -> str:
    """The shell lines that point Prefect commands at the stack (URL and auth string)."""
    auth = paths(home).auth_file
    return f"export PREFECT_API_URL={url} PREFECT_API_AUTH_STRING=\"$(cat {auth})\""


def api_auth(home: Path | str | None = None) -> str:
    """The stack's API auth string (`user:password`), generated on first use, readable only
    by its owner."""
    f = paths(home).auth_file
    if not f.is_file():
        f.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"codeadapt:{secrets.token_urlsafe(24)}\n")
    os.chmod(f, 0o600)
    return f.read_text().strip()


def auth_for(url: str | None, home: Path | str | None = None) -> str | None:
    """The auth string of the stack in `home` if `url` is its API, else None."""
    state = read_state(home)
    if url and state and state.get("api_url") == url.rstrip("/") and paths(home).auth_file.is_file():
        return api_auth(home)
    return None


# --------------------------------------------------------------------------- processes

def _ps(*fields: str, pid: int | None = None) -> list[list[str]]:
    cmd = ["ps", "-o", ",".join(f"{f}=" for f in fields)]
    cmd += ["-p", str(pid)] if pid is not None else ["-A"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    return [line.split(None, len(fields) - 1) for line in out.stdout.splitlines() if line.strip()]


def _started(pid: int) -> str | None:
    """The process's start time as `ps` prints it: with the PID, identifies the process."""
    rows = _ps("lstart", pid=pid)
    return rows[0][0].strip() if rows else None


def alive(pid: int, started: str | None = None) -> bool:
    """True if `pid` runs (not a zombie) and, when `started` is given, is still that process."""
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own exited child
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    rows = _ps("stat", pid=pid)
    if not rows or rows[0][0].startswith("Z"):
        return False
    return started is None or _started(pid) == started


def descendants(pids: list[int]) -> list[int]:
    """Every live process below `pids` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for row in _ps("pid", "ppid"):
        try:
            children.setdefault(int(row[1]), []).append(int(row[0]))
        except (ValueError, IndexError):
            continue
    out: list[int] = []
    todo = list(pids)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.append(c)
                todo.append(c)
    return out


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_members(pgid: int) -> list[int]:
    out = []
    for row in _ps("pid", "pgid"):
        try:
            if int(row[1]) == pgid:
                out.append(int(row[0]))
        except (ValueError, IndexError):
            continue
    return [p for p in out if alive(p)]


def _ours(p: dict[str, Any]) -> bool:
    """Whether the live process at the recorded PID is the one we started: same start time, or,
    where none was recorded, the same command line. Otherwise the PID may have been reused."""
    if p.get("started"):
        return alive(p["pid"], p["started"])
    if not p.get("cmd") or not alive(p["pid"]):
        return False
    rows = _ps("args", pid=p["pid"])
    return bool(rows) and rows[0][0].strip() == " ".join(p["cmd"])


def stop_processes(procs: list[dict[str, Any]], timeout: float = 20.0) -> list[int]:
    """SIGTERM the process groups of `procs` (recorded {"pid", "started"}: session leaders we
    started) and of everything they spawned; SIGKILL whatever is left after `timeout`.
    Returns the PIDs that were live. A recorded PID now used by another process is left alone."""
    roots: list[int] = []
    for p in procs:
        if _ours(p):
            roots.append(p["pid"])
        elif not alive(p["pid"]):  # leader gone; members of its group may remain (the PID
            roots += _group_members(p["pid"])  # cannot be reused while the group exists)
    if not roots:
        return []
    tree = list(dict.fromkeys(roots + descendants(roots)))
    me = os.getpgid(0)
    groups = [g for g in dict.fromkeys(_pgid(p) for p in tree) if g is not None and g != me]
    # Children's groups first (flow runs, in sessions of their own), then the leaders'.
    for g in reversed(groups):
        _signal_group(g, signal.SIGTERM)
    for p in tree:  # anything in our own group (should not happen) gets a plain SIGTERM
        if _pgid(p) == me:
            try:
                os.kill(p, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in tree):
        time.sleep(0.2)
    for g in groups:
        _signal_group(g, signal.SIGKILL)
    for p in tree:  # a process that moved to a group of its own is killed by PID
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p) for p in tree):
        time.sleep(0.1)
    return tree


def _spawn(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Start `cmd` as the leader of a new session, output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True)
    return {"pid": proc.pid, "started": _started(proc.pid), "log": str(log), "cmd": cmd}


def _tail(log: Path | str, n: int = 25) -> str:
    try:
        lines = Path(log).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# --------------------------------------------------------------------------- HTTP

def _request(method: str, url: str, body: Any = None, timeout: float = 5.0,
             auth: str | None = None, headers: dict[str, str] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    head = {"Content-Type": "application/json", **(headers or {})}
    if auth:
        head["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        if method in {"POST", "PUT", "PATCH", "DELETE"}:  # CSRF protection: a token per client
            api = url.split("/api/", 1)[0] + "/api"
            client = f"codeadapt-{os.getpid()}"
            token = _request("GET", f"{api}/csrf-token?client={client}", timeout=timeout, auth=auth)
            head.update({"Prefect-Csrf-Token": token["token"], "Prefect-Csrf-Client": client})
    req = urllib.request.Request(url, data=data, method=method, headers=head)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        text = resp.read().decode()
    return json.loads(text) if text else None


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        return _request("GET", f"{url}/health", timeout=timeout) is True
    except (OSError, urllib.error.URLError, ValueError):
        return False


def port_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- state

def read_state(home: Path | str | None = None) -> dict[str, Any] | None:
    f = paths(home).state
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None


def _write_state(sp: StackPaths, state: dict[str, Any]) -> None:
    sp.home.mkdir(parents=True, exist_ok=True)
    tmp = sp.state.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(sp.state)


def stack_env(sp: StackPaths, url: str, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for everything the stack starts: project-local home, the API, no telemetry,
    results under the project (as `codeadapt run`) unless already set."""
    env = {**os.environ, **OFFLINE_ENV}
    auth = api_auth(sp.home)
    env.update(PREFECT_HOME=str(sp.home), PREFECT_API_URL=url, PREFECT_SERVER_API_HOST=HOST,
               PREFECT_SERVER_API_PORT=str(port), PWD=str(ROOT),
               PREFECT_SERVER_API_AUTH_STRING=auth, PREFECT_API_AUTH_STRING=auth,
               PREFECT_SERVER_CSRF_PROTECTION_ENABLED="true", PREFECT_CLIENT_CSRF_SUPPORT_ENABLED="true",
               PREFECT_SERVER_CORS_ALLOWED_ORIGINS=f"http://{HOST}:{port}")
    env.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(ROOT / "data" / "cache" / "results"))
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------- steps

def _prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def _wait_healthy(url: str, server: dict[str, Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy(url):
            return
        if not alive(server["pid"]):
            raise StackError(f"the Prefect server exited during start-up; log {server['log']}:\n"
                             + _tail(server["log"]))
        time.sleep(0.5)
    raise StackError(f"the Prefect server did not answer {url}/health within {timeout:.0f} s; "
                     f"log {server['log']}:\n" + _tail(server["log"]))


def provision(url: str, pool: str = DEFAULT_POOL, auth: str | None = None) -> None:
    """Create the `process` work pool and the `gpu` limit if missing (existing ones are kept)."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    from tasks.ml import ensure_gpu_limit

    with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: auth}):
        with get_client(sync_client=True) as client:
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(
                    name=pool, type="process",
                    base_job_template=ProcessWorker.get_default_base_job_template()))
        ensure_gpu_limit()


def render_prefect_file(out: Path, pool: str = DEFAULT_POOL, cron: str | None = None,
                        timezone: str | None = None, source: Path = PREFECT_FILE) -> Path:
    """`deployments/prefect.yaml`, unless a pool or nightly schedule differs: then a copy with
    those changed, written to `out`."""
    if pool == DEFAULT_POOL and cron is None and timezone is None:
        return source
    import yaml

    spec = yaml.safe_load(source.read_text())
    for dep in spec["deployments"]:
        dep["work_pool"] = {**dep["work_pool"], "name": pool}
        if dep["name"] == NIGHTLY:
            sched = dict(dep["schedules"][0])
            sched["cron"] = cron or sched["cron"]
            sched["timezone"] = timezone or sched["timezone"]
            dep["schedules"] = [sched]
    out.write_text("# generated by `codeadapt up` from deployments/prefect.yaml\n"
                   + yaml.safe_dump(spec, sort_keys=False))
    return out


def deploy(sp: StackPaths, env: dict[str, str], prefect_file: Path, timeout: float = 300) -> None:
    log = sp.logs / "deploy.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = _prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file))
    with log.open("ab") as fh:
        fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        fh.flush()
        rc = subprocess.run(cmd, cwd=ROOT, env={**env, "COLUMNS": "200"}, stdin=subprocess.DEVNULL,
                            stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
    if rc != 0:
        raise StackError(f"`prefect deploy` failed (exit {rc}); log {log}:\n" + _tail(log))


def _wait_worker(url: str, pool: str, worker: dict[str, Any], timeout: float, auth: str | None) -> None:
    """Until the work pool reports a worker online (its first heartbeat)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(worker["pid"]):
            raise StackError(f"the worker exited during start-up; log {worker['log']}:\n"
                             + _tail(worker["log"]))
        try:
            if _request("GET", f"{url}/work_pools/{pool}", auth=auth).get("status") == "READY":
                return
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(0.5)
    raise StackError(f"the worker did not come online within {timeout:.0f} s; log {worker['log']}:\n"
                     + _tail(worker["log"]))


def start_worker(sp: StackPaths, env: dict[str, str], url: str, pool: str, timeout: float = 120) -> dict[str, Any]:
    worker = _spawn(_prefect("worker", "start", "--pool", pool, "--type", "process"),
                    sp.logs / "worker.log", env, ROOT)
    _wait_worker(url, pool, worker, timeout, env.get("PREFECT_API_AUTH_STRING"))
    return worker


# --------------------------------------------------------------------------- commands

@dataclass
class UpResult:
    state: dict[str, Any]
    already_running: bool
    notes: list[str]


def up(port: int = DEFAULT_PORT, home: Path | str | None = None, pool: str = DEFAULT_POOL,
       cron: str | None = None, timezone: str | None = None, env: dict[str, str] | None = None,
       timeout: float = 180, say: Say = lambda _m: None) -> UpResult:
    """Start (or find running) the project's server, work pool, `gpu` limit, deployments, worker."""
    sp = paths(home)
    state = read_state(sp.home)
    notes: list[str] = []
    if state and alive(state["server"]["pid"], state["server"].get("started")):
        if not healthy(state["api_url"]):
            raise StackError(f"a codeadapt Prefect server (PID {state['server']['pid']}) runs but "
                             f"{state['api_url']}/health does not answer; see {state['server']['log']} "
                             "or run `codeadapt down`")
        notes.append(f"already running: {state['url']} (server PID {state['server']['pid']})")
        w = state.get("worker")
        if w and alive(w["pid"], w.get("started")):
            notes.append(f"worker PID {w['pid']} is running")
        else:
            say("worker is not running: starting it")
            penv = stack_env(sp, state["api_url"], state["port"], env)
            state["worker"] = start_worker(sp, penv, state["api_url"], state["pool"])
            _write_state(sp, state)
            notes.append(f"worker restarted: PID {state['worker']['pid']}")
        if cron or timezone or pool != state["pool"]:
            notes.append("deployments and worker left as they are: `codeadapt down` and `codeadapt up "
                         "...` again to change the pool or the nightly schedule")
        if port != state["port"]:
            notes.append(f"(it listens on port {state['port']}, not {port}: "
                         "`codeadapt down` first to move it)")
        return UpResult(state, True, notes)
    if state:  # stale: the server is gone; clear whatever is left of that stack
        stop_processes([p for p in (state.get("worker"), state.get("server")) if p])
        sp.state.unlink(missing_ok=True)
        notes.append("cleared a stale state file (its server was not running)")

    url = api_url(port)
    if not port_free(port):
        raise StackError(f"port {port} on {HOST} is already in use by another program; stop it or "
                         f"choose another port (codeadapt up --port N)")
    sp.logs.mkdir(parents=True, exist_ok=True)
    penv = stack_env(sp, url, port, env)
    say(f"starting the Prefect server on {HOST}:{port} (PREFECT_HOME={sp.home}) ...")
    server = _spawn(_prefect("server", "start", "--host", HOST, "--port", str(port)),
                    sp.logs / "server.log", penv, ROOT)
    state = {"url": f"http://{HOST}:{port}", "api_url": url, "port": port, "home": str(sp.home),
             "pool": pool, "server": server, "worker": None,
             "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_state(sp, state)
    try:
        _wait_healthy(url, server, timeout)
        say("server healthy; creating the work pool and the `gpu` limit ...")
        provision(url, pool, api_auth(sp.home))
        pf = render_prefect_file(sp.home / "prefect.yaml", pool, cron, timezone)
        say(f"deploying {os.path.relpath(pf, ROOT) if pf.is_relative_to(ROOT) else pf} ...")
        deploy(sp, penv, pf)
        say(f"starting a worker for pool {pool!r} ...")
        state["worker"] = start_worker(sp, penv, url, pool)
        _write_state(sp, state)
    except BaseException:
        down(sp.home)
        raise
    return UpResult(state, False, notes)


def down(home: Path | str | None = None, timeout: float = 20) -> list[int]:
    """Stop the worker (and its flow runs) and the server of the stack in `home`; returns the
    PIDs that were stopped. Nothing running is not an error."""
    sp = paths(home)
    state = read_state(sp.home)
    if not state:
        return []
    stopped = stop_processes([p for p in (state.get("worker"),) if p], timeout)
    stopped += stop_processes([state["server"]], timeout)
    sp.state.unlink(missing_ok=True)
    return stopped


def status(home: Path | str | None = None) -> dict[str, Any]:
    """What runs: server (URL, PID, health), worker (PID), work pool, deployments."""
    sp = paths(home)
    state = read_state(sp.home)
    if not state:
        return {"running": False, "home": str(sp.home)}
    srv, wrk = state["server"], state.get("worker")
    out: dict[str, Any] = {
        "running": alive(srv["pid"], srv.get("started")), "home": str(sp.home),
        "url": state["url"], "api_url": state["api_url"], "server_pid": srv["pid"],
        "healthy": healthy(state["api_url"]), "pool": state["pool"],
        "worker_pid": wrk["pid"] if wrk else None,
        "worker_alive": bool(wrk and alive(wrk["pid"], wrk.get("started"))),
        "logs": str(sp.logs), "deployments": [],
    }
    if out["healthy"]:
        try:
            auth = api_auth(sp.home)
            flows = {f["id"]: f["name"] for f in _request("POST", f"{state['api_url']}/flows/filter", {}, auth=auth)}
            for d in _request("POST", f"{state['api_url']}/deployments/filter", {}, auth=auth):
                scheds = [f"{s['schedule'].get('cron') or s['schedule']} "
                          f"{s['schedule'].get('timezone') or ''}".strip()
                          + ("" if s.get("active", True) else " (inactive)") for s in d.get("schedules", [])]
                out["deployments"].append({"name": f"{flows.get(d['flow_id'], '?')}/{d['name']}",
                                           "pool": d.get("work_pool_name"), "paused": d.get("paused"),
                                           "schedules": scheds})
            out["pool_status"] = _request("GET", f"{state['api_url']}/work_pools/{state['pool']}",
                                          auth=auth).get("status")
        except (OSError, urllib.error.URLError, ValueError) as exc:
            out["error"] = str(exc)
    return out


def format_status(st: dict[str, Any]) -> str:
    if not st["running"]:
        msg = f"not running (PREFECT_HOME {st['home']}); start it with: codeadapt up"
        if "server_pid" in st:  # a state file whose server is gone
            msg = (f"server PID {st['server_pid']} ({st['url']}) is NOT running"
                   + (f"; worker PID {st['worker_pid']} still runs" if st["worker_alive"] else "")
                   + "\n`codeadapt up` restarts it (clearing what is left); `codeadapt down` stops it")
        return msg
    lines = [f"server:  {st['url']}  PID {st['server_pid']}  "
             + ("healthy" if st["healthy"] else "NOT answering /api/health"),
             "worker:  " + (f"PID {st['worker_pid']} " + ("running" if st["worker_alive"] else "NOT running")
                             if st["worker_pid"] else "none")
             + f"  pool {st['pool']!r}" + (f" ({st['pool_status']})" if st.get("pool_status") else ""),
             f"home:    {st['home']}  (logs in {st['logs']})"]
    if st["deployments"]:
        lines.append("deployments:")
        for d in sorted(st["deployments"], key=lambda d: d["name"]):
            how = f"pool {d['pool']}" if d["pool"] else "served (deployments/serve.py)"
            sched = f"  schedule: {', '.join(d['schedules'])}" if d["schedules"] else ""
            lines.append(f"  {d['name']:<16} {how}{sched}" + ("  PAUSED" if d["paused"] else ""))
    if st.get("error"):
        lines.append(f"(could not list deployments: {st['error']})")
    lines.append(env_line(st["api_url"], st["home"]))
    return "\n".join(lines)
