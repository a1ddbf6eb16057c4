"""Evaluate a base model or adapter on held-out tool-use turns: generate greedily
(`codeadapt.models.generate`: the KV cache of shared token prefixes — system prompt and tool
schemas, earlier turns of the same conversation — reused across prompts, continuous batching),
then score with `codeadapt.scoring` (what each metric means is documented there). Prompts come
from codeadapt.prompts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from codeadapt.config import EvalSpec
from codeadapt.models.generate import Generations, generate_outputs, load_for_generation

# Re-exported: the evaluation API is one import.
from codeadapt.prompts import (  # noqa: F401
    Prompt,
    check_contamination,
    load_fixed_set,
    ngram_overlap,
    prompts_from_split,
    user_texts,
)
from codeadapt.scoring import (  # noqa: F401
    ADAPTER_FILE,
    ANSWER_F1,
    FABRICATED,
    METRICS,
    NO_MATCHES,
    READ_SLACK,
    TOOL_CALL_END,
    TOOL_CALL_START,
    AnswerMatch,
    Markers,
    Parsed,
    Scored,
    answer_facts,
    covers,
    effective_n,
    markers_of,
    match_answer,
    normalize_arguments,
    parse_output,
    polarity,
    run_call,
    score,
    shown_lines,
    summarize,
    token_f1,
    wilson,
)


def adapter_bytes(adapter_dir: Path | None) -> int | None:
    """Size of the final adapter weights; numbered checkpoints beside it don't count."""
    return None if adapter_dir is None else (Path(adapter_dir) / ADAPTER_FILE).stat().st_size


def evaluate_model(model_dir: Path, adapter_dir: Path | None, prompts: Sequence[Prompt],
                   spec: EvalSpec, generate: Callable[..., Generations] = generate_outputs,
                   prefill_store: Path | None = None, base_top: int | None = None
                   ) -> dict[str, Any]:
    """Load, generate, parse and score every prompt; per-prompt results plus a summary.
    `prefill_store`: where rows on the same base share their frozen blocks' prefill
    (codeadapt.models.prefill; `base_top`: the adapters' LoRA depth, for the base row)."""
    if not prompts:
        raise ValueError("no prompts to evaluate")
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json; expected an mlx-lm model dir")
    if adapter_dir is not None and not (Path(adapter_dir) / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"{adapter_dir} has no {ADAPTER_FILE}")
    missing = sorted({p.root for p in prompts if not Path(p.root).is_dir()})
    if spec.run_tools and missing:
        raise FileNotFoundError(f"checkouts missing (sync the sources first): {missing}")
    model, tokenizer, load_model_s, load_adapter_s = load_for_generation(model_dir, adapter_dir,
                                                                         spec.fast_kernels)
    kw: dict[str, Any] = {}
    shared = None
    if prefill_store is not None:
        from codeadapt.models import prefill

        shared = prefill.for_row(model, model_dir, adapter_dir, prefill_store, base_top,
                                 spec.fast_kernels)
        kw["shared"] = shared
    gen = generate(model, tokenizer, prompts, spec.max_tokens, spec.batch_size,
                   prefix_cache=spec.prefix_cache, **kw)
    if shared is not None:
        prefill.prune(prefill_store)
    return {"model": str(model_dir), "adapter": None if adapter_dir is None else str(adapter_dir),
            "shared_prefill": None if shared is None else shared.stats(),
            "load_s": load_model_s + load_adapter_s, "load_model_s": load_model_s,
            "load_adapter_s": load_adapter_s, "adapter_bytes": adapter_bytes(adapter_dir),
            **score_outputs(prompts, gen, spec, markers_of(tokenizer))}


def score_outputs(prompts: Sequence[Prompt], gen: Generations, spec: EvalSpec, markers: Markers
                  ) -> dict[str, Any]:
    """Parse and score every completion: per-prompt results, per-source counts, the summary."""
    results, scores = [], []
    for i, p in enumerate(prompts):
        parsed = parse_output(gen.texts[i], markers, list(p.tools))
        s = score(p, parsed, p.root if spec.run_tools else None)
        scores.append(s)
        results.append({
            "id": p.id, "example_id": p.example_id, "source": p.source, "kind": p.kind,
            "held_out": p.held_out, "expected": {"name": p.expected_name,
                                                 "arguments": p.expected_arguments,
                                                 "text": p.expected_text},
            "output": gen.texts[i], "finish_reason": gen.finish_reasons[i],
            "generated_tokens": gen.generated_tokens[i], "parsed": asdict(parsed),
            "score": asdict(s)})
    n_tokens = sum(gen.generated_tokens)
    by_source: dict[str, dict[str, Any]] = {}
    for p, s in sorted(zip(prompts, scores), key=lambda ps: ps[0].source):
        row = by_source.setdefault(p.source, {"k": 0, "n": 0, "tool_call": {"k": 0, "n": 0},
                                              "answer": {"k": 0, "n": 0}})
        row["k"] += s.correct  # overall
        row["n"] += 1
        part = row["tool_call" if p.expects_call else "answer"]
        part["k"] += s.correct
        part["n"] += 1
    return {
        "spec": spec.model_dump(), "prompts": len(prompts), "gen_s": gen.seconds,
        "gen_s_per_prompt": gen.seconds / len(prompts), "generated_tokens": n_tokens,
        "prompt_tokens": gen.prompt_tokens, "reused_prompt_tokens": gen.reused_tokens,
        "tokens_per_s": n_tokens / gen.seconds if gen.seconds > 0 and n_tokens else None,
        "truncated": sum(r == "length" for r in gen.finish_reasons),
        "metrics": summarize(scores, groups=[p.group for p in prompts]),
        "metrics_by_origin": {
            origin: summarize([s for p, s in zip(prompts, scores) if p.held_out == held],
                              groups=[p.group for p in prompts if p.held_out == held])
            for origin, held in (("trained_repos", False), ("held_out_repos", True))
            if any(p.held_out == held for p in prompts)},
        "by_source": by_source,
        "results": results,
    }


def rescore(result: dict[str, Any], prompts: Sequence[Prompt], spec: EvalSpec,
            markers: Markers = Markers()) -> dict[str, Any]:
    """Score a stored result's completions again with the current scorer: generations are
    what costs, so a cache keeps them, and a scorer fix still reaches every row."""
    stored = {r["id"]: r for r in result["results"]}
    missing = [p.id for p in prompts if p.id not in stored]
    if missing:  # fewer prompts (an item excluded since) is fine; a new one is not stored
        raise ValueError(f"stored result was generated for other prompts (e.g. {missing[:3]})")
    rs = [stored[p.id] for p in prompts]
    gen = Generations([r["output"] for r in rs], [r["finish_reason"] for r in rs],
                      [r["generated_tokens"] for r in rs], result["prompt_tokens"],
                      result["gen_s"], result.get("reused_prompt_tokens", 0))
    return {**result, **score_outputs(prompts, gen, spec, markers)}


def evaluate_rules(prompts: Sequence[Prompt], spec: EvalSpec) -> dict[str, Any]:
    """The rule baseline (`codeadapt.baseline`) on the same prompts and scorer as the models."""
    from codeadapt.baseline import rule_output

    if not prompts:
        raise ValueError("no prompts to evaluate")
    tic = time.perf_counter()
    texts = [rule_output(p.messages) for p in prompts]
    gen = Generations(texts, ["stop"] * len(texts), [0] * len(texts), 0, time.perf_counter() - tic)
    return {"model": "rules", "adapter": None, "load_s": 0.0, "load_model_s": 0.0,
            "load_adapter_s": 0.0, "adapter_bytes": None,
            **score_outputs(prompts, gen, spec, Markers())}


def eval_job(payload: dict[str, Any], progress: Callable[[dict[str, Any]], None] | None = None
             ) -> dict[str, Any]:
    """Worker entry: collect the prompts, then `evaluate_model` (runs with the fast BLAS)."""
    from codeadapt.prompts import eval_prompts

    spec = EvalSpec.model_validate(payload["spec"])
    fixed = Path(payload["fixed_set"]) if payload.get("fixed_set") else None
    held_out = Path(payload["held_out_dir"]) if payload.get("held_out_dir") else None
    prompts = eval_prompts(spec, Path(payload["data_dir"]), Path(payload["repos_dir"]), fixed, held_out)
    adapter = Path(payload["adapter_dir"]) if payload.get("adapter_dir") else None
    store = payload.get("prefill_store")
    result = evaluate_model(Path(payload["model_dir"]), adapter, prompts, spec,
                            prefill_store=Path(store) if store else None,
                            base_top=payload.get("base_top"))
    from codeadapt.worker import blas_in_use

    result["blas"] = blas_in_use()
    return result
