"""Run MLX jobs in a child process with a fast BLAS preloaded.

The mlx-cpu wheel bundles a reference BLAS; Debian's OpenBLAS, preloaded, trains ~12x faster
with the same losses. LD_PRELOAD only works from process start, hence the child.
`CODEADAPT_BLAS`: unset or "auto" (OpenBLAS when installed), "reference" (the bundled one), or
a path to a BLAS library. Protocol: the parent writes {"kind", "payload"} as JSON to the
child's stdin; the child writes one JSON message per line to its stdout ({"progress": {...}},
then {"result": {...}} or {"error": {...}}); everything else the child prints goes to stderr.
"""

from __future__ import annotations

import builtins
import ctypes
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
BLAS_ENV = "CODEADAPT_BLAS"
# kind -> "module:function"; the function takes (payload, progress) and returns a JSON dict.
KINDS = {"train": "codeadapt.train:train_job", "eval": "codeadapt.evaluate:eval_job",
         "agentic": "codeadapt.agentic:agentic_job", "blas": "codeadapt.worker:blas_job"}
TAIL_CHARS = 4000
# glibc malloc: mlx (CPU) allocates and frees each op's output with malloc, and glibc serves
# anything over 32 MB (attention scores, the head's logits, KV caches) with a fresh mmap, then
# unmaps it on free: every use faults its pages in again and the kernel zeroes them. Keeping
# such buffers in the heap (served under 4 GiB, trimmed over 16 GiB) measured here: LoRA
# 431 -> 461 tokens/s, evaluation of the phase-7 prompts 139 -> 129 s (5.4M -> 0.8M page
# faults), the default run 44:58 -> 41:28, outputs and losses identical (README, stop 34).
# Other libcs ignore the names.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}
log = logging.getLogger(__name__)


def _mapping_of(address: int) -> str | None:
    """The file mapped at `address` in this process, from /proc/self/maps."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= address < hi and len(parts) == 6:
            return parts[5]
    return None


def blas_in_use() -> str:
    """Which BLAS mlx's `cblas_sgemm` binds to in this process."""
    if sys.platform == "darwin":
        return "accelerate"
    if not Path("/proc/self/maps").exists():
        return "unknown"
    # libmlx is dlopen'ed RTLD_LOCAL: a cblas_sgemm in the global scope (LD_PRELOAD) wins over
    # its bundled one; with none there, the bundled one serves. numpy's copy is symbol-prefixed.
    try:
        address = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
    except AttributeError:
        return "reference (bundled with mlx)"
    lib = _mapping_of(address) or "?"
    name = "openblas" if "openblas" in lib.lower() else "mkl" if "mkl" in lib.lower() else "blas"
    return f"{name} ({lib})"


def worker_env(environ: Mapping[str, str] | None = None,
               openblas: Path | None = None) -> dict[str, str]:
    """The child's environment: LD_PRELOAD per CODEADAPT_BLAS, codeadapt importable."""
    env = dict(os.environ if environ is None else environ)
    choice = env.get(BLAS_ENV, "auto").strip()
    default = OPENBLAS if openblas is None else openblas
    lib: Path | None = None
    if choice in ("", "auto"):
        lib = default if default.exists() and sys.platform.startswith("linux") else None
    elif choice != "reference":
        lib = Path(choice)
        if not lib.is_file():
            raise FileNotFoundError(f"{BLAS_ENV}={choice!r}: no such library "
                                    "(use 'auto', 'reference' or a path)")
    preloaded = env.get("LD_PRELOAD", "")
    if lib is not None and str(lib) not in preloaded.replace(":", " ").split():
        env["LD_PRELOAD"] = " ".join(filter(None, [str(lib), preloaded]))
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    env.setdefault("DO_NOT_TRACK", "1")
    if sys.platform.startswith("linux"):
        for key, value in MALLOC_ENV.items():
            env.setdefault(key, value)  # a value the user set wins
    return env


def _tail(text: str) -> str:
    return text if len(text) <= TAIL_CHARS else "…" + text[-TAIL_CHARS:]


def _child_error(error: dict[str, Any]) -> BaseException:
    """The child's exception as the same builtin type when possible, its traceback inside."""
    message = (f"{error.get('message', '')}\n--- worker traceback (tail) ---\n"
               f"{_tail(error.get('traceback', ''))}")
    cls = getattr(builtins, error.get("type", ""), None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except TypeError:  # exception types with other constructors
            pass
    return RuntimeError(f"{error.get('type')}: {message}")


def run_in_worker(kind: str, payload: dict[str, Any],
                  progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run job `kind` in `python -m codeadapt.worker`; relay progress; return its result."""
    if kind not in KINDS:
        raise ValueError(f"unknown worker kind {kind!r}; expected one of {sorted(KINDS)}")
    request = json.dumps({"kind": kind, "payload": payload}, default=str)
    env = worker_env()
    with tempfile.TemporaryFile() as errf:
        proc = subprocess.Popen([sys.executable, "-m", "codeadapt.worker"], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errf)
        result = error = None
        try:
            proc.stdin.write(request.encode())
            proc.stdin.close()
            for line in proc.stdout:
                try:
                    msg = json.loads(line)
                except json.JSONDecodeError:
                    continue  # not ours: a library writing to fd 1 before the child redirected it
                if "progress" in msg and progress is not None:
                    progress(msg["progress"])
                result = msg.get("result", result)
                error = msg.get("error", error)
            rc = proc.wait()
        finally:
            if proc.poll() is None:  # the parent failed or was interrupted: don't leave it running
                proc.kill()
                proc.wait()
        errf.seek(0)
        log_text = errf.read().decode("utf-8", "replace")
    if error is not None:
        raise _child_error(error)
    if rc != 0 or result is None:
        raise RuntimeError(f"worker {kind!r} exited with code {rc} without a result; "
                           f"stderr tail:\n{_tail(log_text)}")
    return result


def blas_job(payload: dict[str, Any], progress: Any = None) -> dict[str, Any]:
    """The "blas" kind: which BLAS a worker gets (after loading mlx)."""
    import mlx.core  # noqa: F401

    return {"blas": blas_in_use(), "ld_preload": os.environ.get("LD_PRELOAD", "")}


def main() -> int:
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # mlx-lm's progress UI and stray prints go to stderr, not the message channel
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def send(msg: dict[str, Any]) -> None:
        out.write(json.dumps(msg, default=str) + "\n")
        out.flush()

    try:
        request = json.load(sys.stdin)
        module, _, func = KINDS[request["kind"]].partition(":")
        job = getattr(importlib.import_module(module), func)
        log.info("worker %s: BLAS %s", request["kind"], blas_in_use())
        send({"result": job(request["payload"], lambda p: send({"progress": p}))})
        return 0
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        send({"error": {"type": type(exc).__name__, "message": str(exc),
                        "traceback": traceback.format_exc()}})
        return 1


if __name__ == "__main__":
    sys.exit(main())
