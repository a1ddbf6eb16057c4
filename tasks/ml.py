"""Prefect tasks for the model stages: base, training (one device slot), evaluation, report."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.concurrency.sync import concurrency

from codeadapt import basemodel, report, train
from codeadapt.config import AgenticSpec, EvalSpec, TrainSpec
from codeadapt.fsutil import read_json, replace_dir, write_json
from codeadapt.secrets import redact

GPU_LIMIT = "gpu"  # one slot: "single-GPU-equivalent"; two trainings never share a device


def ensure_gpu_limit(slots: int = 1) -> None:
    """Create the `gpu` global concurrency limit if missing (an existing one is left as set)."""
    import os

    from prefect import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            gcl = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots))
            return
        if gcl.active_slots and not os.environ.get("PREFECT_API_URL"):
            # A temporary server (no PREFECT_API_URL) runs no lease-expiry service: a slot a
            # killed run held stays taken in ~/.prefect's database and every later run would
            # wait on it forever. This process started that server, so no run of it holds one.
            logging.getLogger(__name__).warning(
                "freeing %d '%s' slot(s) left by a killed run", gcl.active_slots, GPU_LIMIT)
            client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(active_slots=0))


def _key(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


@task(task_run_name="make_base[{name}]")
def make_gguf_base(bases_dir: Path, name: str) -> Path:
    """Convert (or reuse) the wheel-shipped GGUF base into an mlx-lm model directory."""
    from codeadapt.models import gguf

    out = gguf.make_base(bases_dir, name=name)
    get_run_logger().info("base %s: %s", name, out)
    return out


@task(task_run_name="make_base[tiny]")
def make_base(bases_dir: Path, base_data: Path, checkouts: list[Path], tiny_args: dict[str, Any]) -> Path:
    """Build (or reuse) the offline tiny base from the base corpus."""
    from codeadapt.base import TinyBaseArgs, make_tiny_base

    corpus = basemodel.tokenizer_corpus(base_data, checkouts)
    out = bases_dir / f"tiny-{basemodel.corpus_key(corpus, tiny_args)}"
    if (out / "config.json").is_file():
        get_run_logger().info("reusing tiny base %s", out)
        return out
    return make_tiny_base(out, corpus, TinyBaseArgs(**tiny_args))


def _train(label: str, base_dir: Path, data_dir: Path, out_dir: Path, spec: TrainSpec,
           init_adapter: Path | None = None) -> dict[str, Any]:
    """Train under the device slot, with a live progress artifact and a loss-curve artifact."""
    log = get_run_logger()
    if train.is_current(out_dir, base_dir, data_dir, spec, init_adapter):
        log.info("%s is up to date with its dataset, base and spec: not retraining", out_dir)
        return json.loads((out_dir / "metrics.json").read_text())
    key = _key(f"train-{label}")
    with concurrency(GPU_LIMIT, occupy=1, strict=True):
        progress_id = create_progress_artifact(progress=0.0, key=f"{key}-progress",
                                               description=f"{label}: training progress (%)")

        def on_progress(event: dict[str, Any]) -> None:
            if "train_loss" in event:
                update_progress_artifact(progress_id, 100.0 * event["step"] / event["iters"])
                log.info("%s step %d/%d train loss %.4f (%.0f tok/s)", label, event["step"],
                         event["iters"], event["train_loss"], event.get("tokens_per_sec") or 0)
            elif "val_loss" in event:
                log.info("%s step %d valid loss %.4f", label, event["step"], event["val_loss"])

        # A task inside the slot: its run times in the API show trainings never overlap.
        metrics = fit.with_options(task_run_name=f"fit[{label}]")(
            base_dir, data_dir, out_dir, spec, on_progress, init_adapter)
        update_progress_artifact(progress_id, 100.0)
    png = out_dir / "loss.png"
    img = base64.b64encode(png.read_bytes()).decode() if png.is_file() else ""
    create_markdown_artifact(
        key=f"{key}-loss", description=f"{label}: loss curves",
        markdown=f"# {label}: loss\n\n![loss](data:image/png;base64,{img})\n\n"
        f"- final valid loss: {metrics.get('final_valid_loss')}\n"
        f"- tokens/s: {metrics.get('tokens_per_sec')} ({metrics.get('blas')})\n"
        f"- iters: {metrics['iters']}, resumed from: {metrics.get('resumed_from') or 'none'}\n"
        f"- started from: {metrics.get('init_adapter') or 'the base (no adapter)'}\n")
    return metrics


@task
def fit(base_dir: Path, data_dir: Path, out_dir: Path, spec: TrainSpec, on_progress: Any,
        init_adapter: Path | None = None) -> dict[str, Any]:
    """The training itself, run in the fast-BLAS worker; called only while holding the slot."""
    # Phase datasets sit side by side under paths.data: the frozen blocks' states are shared
    # beside them, so a phase reuses what the one it extends computed (codeadapt.models.frozen).
    return train.train_in_worker(base_dir, data_dir, out_dir, spec, on_progress, init_adapter,
                                 frozen_store=data_dir.parent / "cache" / "frozen")


@task(task_run_name="pretrain_base")
def pretrain_base(base_dir: Path, data_dir: Path, out_dir: Path, spec: TrainSpec) -> Path:
    _train("base-pretrain", base_dir, data_dir, out_dir, spec)
    return out_dir


@task(task_run_name="train_adapter[{phase}]")
def train_adapter(phase: str, base_dir: Path, data_dir: Path, out_dir: Path, spec: TrainSpec,
                  init_adapter: Path | None = None) -> dict[str, Any]:
    return _train(phase, base_dir, data_dir, out_dir, spec, init_adapter)


def eval_key(payload: dict[str, Any]) -> str:
    """What an evaluation depends on: weights, adapter, prompt files and options (not paths)."""
    h = hashlib.sha256(json.dumps(payload["spec"], sort_keys=True).encode())
    h.update(train.weights_sha256(Path(payload["model_dir"])).encode())
    files = [Path(payload["data_dir"]) / "manifest.json"]
    if payload["adapter_dir"]:
        files.append(Path(payload["adapter_dir"]) / "adapters.safetensors")
    if payload["fixed_set"]:
        files.append(Path(payload["fixed_set"]))
    for f in files:
        h.update(train.file_sha256(f).encode())
    return h.hexdigest()[:16]


def _in_slot_stored(kind: str, payload: dict[str, Any], cached: Path) -> dict[str, Any]:
    """Run a worker job holding the `gpu` slot; store its result at `cached` (write, then
    rename, so a reader never sees half of it)."""
    from codeadapt.worker import run_in_worker

    with concurrency(GPU_LIMIT, occupy=1, strict=True):
        result = run_in_worker(kind, payload)
    result, _ = redact(result)  # model output and tool results quote repository text
    write_json(cached, result, indent=None)
    return result


def _shared_prefill(data_dir: Path, base_top: int | None) -> dict[str, Any]:
    """Payload keys of the prefill store beside the phase datasets (codeadapt.models.prefill)."""
    return {"prefill_store": str(Path(data_dir).parent / "cache" / "prefill"), "base_top": base_top}


@task(task_run_name="evaluate[{label}]")
def evaluate(label: str, model_dir: Path, adapter_dir: Path | None, data_dir: Path, repos_dir: Path,
             spec: EvalSpec, fixed_set: Path | None, cache_dir: Path,
             held_out_dir: Path | None = None, base_top: int | None = None) -> dict[str, Any]:
    """Score one model (+ adapter) on the held-out prompts, in the fast-BLAS worker. Rows on
    the same base share their frozen blocks' prefill under <data>/cache/prefill
    (codeadapt.models.prefill); `base_top`: the adapters' LoRA depth, for the base row."""

    payload = {"model_dir": str(model_dir), "adapter_dir": str(adapter_dir) if adapter_dir else None,
               "data_dir": str(data_dir), "repos_dir": str(repos_dir), "spec": spec.model_dump(),
               "fixed_set": str(fixed_set) if fixed_set else None,
               "held_out_dir": str(held_out_dir) if held_out_dir else None}
    # Not part of the key: where the shared prefill is kept changes no output.
    shared = _shared_prefill(data_dir, base_top)
    key = eval_key(payload)
    if held_out_dir is not None and spec.held_out_conversations:
        key += train.file_sha256(Path(held_out_dir) / "manifest.json")[:8]
    cached = cache_dir / f"{_key(label)}-{key}.json"
    stored = read_json(cached)  # missing or corrupt: generate again
    if isinstance(stored, dict):
        from codeadapt.evaluate import rescore
        from codeadapt.prompts import eval_prompts

        get_run_logger().info("%s: same model, adapter, prompts and spec as %s; not generating "
                              "again (scored again with the current scorer)", label, cached)
        prompts = eval_prompts(spec, data_dir, repos_dir, fixed_set, held_out_dir)
        return redact(rescore(stored, prompts, spec))[0]
    result = _in_slot_stored("eval", {**payload, **shared}, cached)
    m, c = result["metrics"]["tool_call"], result["metrics"]["correct"]
    get_run_logger().info("%s: tool-call accuracy %.1f%% [%.1f, %.1f], overall %.1f%% on %d prompts",
                          label, 100 * m["accuracy"], 100 * m["lo"], 100 * m["hi"],
                          100 * c["accuracy"], result["prompts"])
    return result


@task(task_run_name="agentic[{label}]")
def evaluate_agentic(label: str, model_dir: Path | str, adapter_dir: Path | None, data_dir: Path,
                     repos_dir: Path, spec: EvalSpec, agentic: AgenticSpec, cache_dir: Path,
                     held_out_dir: Path | None = None, base_top: int | None = None
                     ) -> dict[str, Any] | None:
    """Agentic task success of one model (+ adapter), or of the rules (`model_dir` "rules"),
    on the same sampled tasks; stored like `evaluate` (not repeated for the same inputs)."""

    if agentic.tasks == 0:
        return None
    rules = str(model_dir) == "rules"
    payload = {"model_dir": str(model_dir), "adapter_dir": str(adapter_dir) if adapter_dir else None,
               "data_dir": str(data_dir), "repos_dir": str(repos_dir), "spec": spec.model_dump(),
               "agentic": agentic.model_dump(), "fixed_set": None,
               "held_out_dir": str(held_out_dir) if held_out_dir else None}
    key_payload = {**payload, "spec": {"eval": spec.model_dump(), "agentic": agentic.model_dump()}}
    key = (hashlib.sha256(json.dumps(key_payload["spec"], sort_keys=True).encode()).hexdigest()[:16]
           + train.file_sha256(Path(data_dir) / "manifest.json")[:8]) if rules else eval_key(key_payload)
    if held_out_dir is not None:
        key += train.file_sha256(Path(held_out_dir) / "manifest.json")[:8]
    cached = cache_dir / f"agentic-{_key(label)}-{key}.json"
    stored = None if rules else read_json(cached)
    if isinstance(stored, dict):
        return stored
    if rules:
        from codeadapt.agentic import agentic_job

        result = agentic_job(payload)
    else:
        result = _in_slot_stored("agentic", {**payload, **_shared_prefill(data_dir, base_top)}, cached)
    a = result["summary"]["all"]
    get_run_logger().info("%s: agentic task success %.1f%% [%.1f, %.1f] on %d tasks, %.2f calls/task",
                          label, 100 * a["success"], 100 * a["lo"], 100 * a["hi"], a["n"],
                          a["calls_per_task"] or 0)
    return redact(result)[0]


@task(task_run_name="evaluate[rules]")
def evaluate_rules(data_dir: Path, repos_dir: Path, spec: EvalSpec, fixed_set: Path | None,
                   held_out_dir: Path | None = None) -> dict[str, Any]:
    """The rule baseline on the same prompts and scorer as the models (seconds; no model)."""
    from codeadapt.evaluate import evaluate_rules as rules
    from codeadapt.prompts import eval_prompts

    prompts = eval_prompts(spec, data_dir, repos_dir, fixed_set, held_out_dir)
    result = rules(prompts, spec)
    m = result["metrics"]["tool_call"]
    get_run_logger().info("rules: tool-call accuracy %.1f%% [%.1f, %.1f] on %d prompts",
                          100 * m["accuracy"], 100 * m["lo"], 100 * m["hi"], result["prompts"])
    return redact(result)[0]


@task(task_run_name="promote[{current.name}]")
def promote(candidate: Path, current: Path) -> Path:
    """Swap a candidate adapter in (rename; the old one is removed only after the swap)."""
    return replace_dir(candidate, current)


@task(task_run_name="check_contamination[{phase}]")
def check_contamination(phase: str, data_dir: Path, repos_dir: Path, spec: EvalSpec,
                        fixed_set: Path | None, held_out_dir: Path | None = None) -> dict[str, Any]:
    """Fail loudly when held-out prompts overlap the phase's train split."""
    from codeadapt import prompts as pr

    errors = [e for d in (data_dir, held_out_dir) if d is not None for e in pr.checkout_errors(d, repos_dir)]
    if errors:  # the tools would run on other code than the dataset's answers
        raise ValueError("checkouts do not match the evaluated data: " + "; ".join(errors))
    held = pr.prompts_from_split(data_dir, spec.split, spec.hold_out_sources, repos_dir)
    held += pr.load_fixed_set(fixed_set, repos_dir) if fixed_set else []
    leaked = pr.leaks_of(data_dir, held)
    if leaked:
        get_run_logger().warning("excluded from scoring, their tool calls and results repeat a "
                                 "train conversation: %s", leaked)
    test = pr.user_texts(p.messages for p in pr.eval_prompts(spec, data_dir, repos_dir, fixed_set, held_out_dir))
    train_recs = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    out = pr.check_contamination(test, pr.user_texts(r["messages"] for r in train_recs),
                                 spec.max_contamination, spec.ngram, spec.max_train_count)
    return {**out, "leaked": leaked}


@task(task_run_name="report")
def write_report(rows: list[dict[str, Any]], out_dir: Path, notes: str) -> Path:
    """REPORT.md + chart, the phase table as a table artifact, the chart as markdown."""
    path = report.write_report(rows, out_dir, title="codeadapt: phase comparison", notes=notes)
    table = report.phase_table(rows)
    create_table_artifact(key="phase-table", table=table,
                          description="Accuracy on held-out prompts (Wilson 95% intervals)")
    chart = out_dir / report.CHART_FILE
    img = base64.b64encode(chart.read_bytes()).decode()
    create_markdown_artifact(key="phase-report", description="Phase comparison report",
                             markdown=path.read_text().replace(
                                 f"]({report.CHART_FILE})", f"](data:image/png;base64,{img})"))
    return path
