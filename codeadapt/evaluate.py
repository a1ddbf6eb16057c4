"""Evaluate a base model or adapter on held-out tool-use turns: generate greedily (reusing the
KV cache of shared token prefixes — system prompt and tool schemas, earlier turns of the same
conversation — across prompts), then score with `codeadapt.scoring` (what each metric means is
documented there). Prompts come from codeadapt.prompts.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from codeadapt.config import EvalSpec

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

# ---- generation ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Generations:
    texts: list[str]
    finish_reasons: list[str]  # "stop" (end of turn) or "length"
    generated_tokens: list[int]
    prompt_tokens: int
    seconds: float
    reused_tokens: int = 0  # prompt tokens served from the prefix cache instead of prefilled


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    return tokenizer.apply_chat_template(list(prompt.messages), tools=list(prompt.tools) or None,
                                         add_generation_prompt=True, return_dict=False)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _prefill(model: Any, cache: list[Any], tokens: Sequence[int], step: int = 512) -> None:
    """Run `tokens` through the model into `cache` (which then holds them after its contents),
    `step` at a time: the attention scores of a chunk are step × cache length floats per head,
    so a long tool result does not need gigabytes at once."""
    import mlx.core as mx

    for i in range(0, len(tokens), step):
        model(mx.array(tokens[i:i + step])[None], cache=cache)
        mx.eval([c.state for c in cache])


def _rewind(model: Any, cache: list[Any], keep: int) -> tuple[list[Any], int]:
    """Trim `cache` to its first `keep` tokens; a fresh cache and 0 where it can't go back that
    far (e.g. a sliding-window layer that has already dropped them)."""
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    trim_prompt_cache(cache, max(0, max(c.size() for c in cache) - keep))
    if any(c.size() != keep for c in cache):
        return make_prompt_cache(model), 0
    return cache, keep


def _stream_one(model: Any, tokenizer: Any, ids: Sequence[int], max_tokens: int,
                cache: list[Any] | None) -> list[int]:
    from mlx_lm.generate import stream_generate

    # The "stop" response carries the eos token: not part of the completion.
    return [r.token for r in stream_generate(model, tokenizer, list(ids), max_tokens=max_tokens,
                                             prompt_cache=cache)
            if r.finish_reason != "stop"]


def _sequential(model: Any, tokenizer: Any, ids: list[list[int]], max_tokens: int,
                reuse: bool) -> tuple[list[list[int]], int]:
    """One prompt at a time. With `reuse`, prompts run in sorted token order through one KV cache
    that is trimmed back to the prefix shared with the previous prompt (a depth-first walk of
    the prompts' token trie), so every shared prefix is prefilled once."""
    from mlx_lm.models.cache import make_prompt_cache

    outs: list[list[int]] = [[] for _ in ids]
    if not reuse:
        for i, p in enumerate(ids):
            outs[i] = _stream_one(model, tokenizer, p, max_tokens, None)
        return outs, 0
    cache = make_prompt_cache(model)
    prev: list[int] = []
    reused = 0
    for i in sorted(range(len(ids)), key=ids.__getitem__):
        p = ids[i]
        keep = min(common_prefix(prev, p), len(p) - 1)  # feed at least one token
        # Drops the rest of `prev` and what was generated after it.
        cache, keep = _rewind(model, cache, keep)
        outs[i] = _stream_one(model, tokenizer, p[keep:], max_tokens, cache)
        reused += keep
        prev = p
    return outs, reused


Carried = tuple[list[int], list[Any]]  # the tokens a KV cache holds, and the cache


def kv_budget(model: Any) -> int:
    """Tokens of KV cache that weigh what the model's weights do. A decode step reads every
    weight once and every cached key and value of every row of the batch once: a running
    batch kept under this many (rows × longest row, since rows are padded to the longest)
    costs at most about twice a single stream's step, and its memory stays bounded, however
    long some prompts are."""
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import make_prompt_cache

    args = getattr(model, "args", None)
    heads = getattr(args, "num_attention_heads", None)
    if not heads:
        return 1 << 62  # unknown layout: no token bound, only the batch size
    kv_heads = getattr(args, "num_key_value_heads", None) or heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // heads
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    per_token = 2 * len(make_prompt_cache(model)) * kv_heads * head_dim * 4  # keys + values, fp32
    return max(1, weights // per_token)


def _batched(model: Any, tokenizer: Any, ids: list[list[int]], max_tokens: int, batch_size: int,
             reuse: bool, carry: list[Carried | None] | None = None,
             finals: list[Carried | None] | None = None,
             batch_tokens: int | None = None) -> tuple[list[list[int]], int]:
    """Continuous batching: at most `batch_size` prompts decode together, and as soon as one
    finishes the next is prefilled and joins the running batch (mlx-lm's BatchGenerator), so
    a short completion never waits for the longest of a fixed chunk. A prompt joins only while
    rows × the longest row (prompt + `max_tokens`) stays within `batch_tokens` (`kv_budget`
    by default) or the batch is empty: a long tool result decodes with few companions instead
    of padding seven others to its length. Each prompt is prefilled alone. With `reuse`,
    prompts go in sorted token order through one running KV cache trimmed back to the prefix
    shared with the previous prompt, and each prompt decodes from a snapshot of it: every
    shared prefix is prefilled once.

    `carry[j]`, when given, is a cache from an earlier call that prompt j extends (an agentic
    task's previous turn): the prompt starts from it when it shares more than the running
    cache does, so a conversation's history is not prefilled again each turn (the carried
    cache is consumed). `finals`, when given, receives each prompt's cache after its
    completion, for the next call."""
    import copy

    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models.cache import make_prompt_cache

    outs: list[list[int]] = [[] for _ in ids]
    queue = collections.deque(sorted(range(len(ids)), key=ids.__getitem__) if reuse
                              else range(len(ids)))
    state: dict[str, Any] = {"cache": make_prompt_cache(model), "have": [], "reused": 0}
    gen = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                         completion_batch_size=batch_size, prefill_batch_size=1)
    active: dict[int, int] = {}  # generator uid -> prompt index
    budget = kv_budget(model) if batch_tokens is None else batch_tokens

    def fits(j: int) -> bool:
        if not active:
            return True
        longest = max(len(ids[i]) for i in [*active.values(), j]) + max_tokens
        return len(active) < batch_size and (len(active) + 1) * longest <= budget

    def feed() -> None:
        while queue and fits(queue[0]):
            admit(queue.popleft())

    def admit(j: int) -> None:
        p = ids[j]
        keep = min(common_prefix(state["have"], p), len(p) - 1) if reuse else 0
        prior = carry[j] if carry and reuse else None
        shared = min(common_prefix(prior[0], p), len(p) - 1) if prior is not None else 0
        if prior is not None and shared > keep:
            own, k = _rewind(model, prior[1], shared)
            _prefill(model, own, p[k:-1])
            state["reused"] += k
            (uid,) = gen.insert([p[-1:]], [max_tokens], caches=[own])
            active[uid] = j
            return
        state["cache"], keep = _rewind(model, state["cache"], keep)
        _prefill(model, state["cache"], p[keep:-1])  # the last token starts the decode
        state["have"] = p[:-1]
        state["reused"] += keep
        (uid,) = gen.insert([p[-1:]], [max_tokens], caches=[copy.deepcopy(state["cache"])])
        active[uid] = j

    try:
        feed()
        while active:
            responses = gen.next_generated()
            if not responses:  # nothing left to decode while prompts wait: a generator bug
                raise RuntimeError(f"batch generator stalled with {len(active)} prompts unfinished")
            for r in responses:
                j = active[r.uid]
                if r.finish_reason != "stop":  # the stop token is not part of the completion
                    outs[j].append(r.token)
                if r.finish_reason is not None:
                    del active[r.uid]
                    if finals is not None:  # its cache: the prompt, then what it generated
                        # mlx-lm extracts the row lazily: evaluated now, it is a copy of the
                        # row; left lazy, it would keep the whole batch's buffers alive.
                        mx.eval([c.state for c in r.prompt_cache])
                        seen = ids[j] + outs[j] + ([r.token] if r.finish_reason == "stop" else [])
                        sizes = {c.size() for c in r.prompt_cache}
                        n = sizes.pop() if len(sizes) == 1 else -1
                        finals[j] = ((seen[:n], r.prompt_cache) if len(ids[j]) <= n <= len(seen)
                                     else None)
                    feed()
    finally:
        gen.close()
    return outs, state["reused"]


def generate_outputs(model: Any, tokenizer: Any, prompts: Sequence[Prompt], max_tokens: int,
                     batch_size: int = 1, prefix_cache: bool = True,
                     sessions: dict[str, Carried] | None = None) -> Generations:
    """Greedy completions: continuous batching of `batch_size` streams when it is > 1, else
    stream_generate.

    `prefix_cache` reuses the KV cache of token prefixes that prompts share (the system prompt
    and tool schemas, and earlier turns of the same conversation) instead of prefilling them
    again; outputs are the same as without it. Models whose cache can't be trimmed (e.g.
    recurrent layers) run without it.

    `sessions` (batched path): caches kept between calls by prompt id. A prompt starts from its
    id's cache where that shares more of it, and its cache after the completion replaces it."""
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

    ids = [prompt_ids(tokenizer, p) for p in prompts]
    reuse = prefix_cache and can_trim_prompt_cache(make_prompt_cache(model))
    tic = time.perf_counter()
    if batch_size > 1:
        carry = [sessions.pop(p.id, None) for p in prompts] if sessions is not None else None
        finals: list[Carried | None] | None = [None] * len(ids) if sessions is not None else None
        outs, reused = _batched(model, tokenizer, ids, max_tokens, batch_size, reuse, carry, finals)
        if sessions is not None and finals is not None:
            sessions.update((p.id, f) for p, f in zip(prompts, finals) if f is not None)
    else:
        outs, reused = _sequential(model, tokenizer, ids, max_tokens, reuse)
    seconds = time.perf_counter() - tic
    # Decode both paths the same way, special tokens kept, so an invented turn shows up.
    return Generations(texts=[tokenizer.decode(t) for t in outs],
                       finish_reasons=["length" if len(t) >= max_tokens else "stop" for t in outs],
                       generated_tokens=[len(t) for t in outs],
                       prompt_tokens=sum(map(len, ids)), seconds=seconds, reused_tokens=reused)


def adapter_bytes(adapter_dir: Path | None) -> int | None:
    """Size of the final adapter weights; numbered checkpoints beside it don't count."""
    return None if adapter_dir is None else (Path(adapter_dir) / ADAPTER_FILE).stat().st_size


def load_for_generation(model_dir: Path | str, adapter_dir: Path | str | None,
                        fast_kernels: bool = True) -> tuple[Any, Any, float, float]:
    """(model, tokenizer, load seconds, adapter seconds) ready for greedy generation: the
    adapter's LoRA weights fused into the linear layers they adapt (W + s·BA: one matmul
    instead of three per layer and step, measured 9% of an evaluation), and with
    `fast_kernels` the base-2 attention/SiLU of codeadapt.models.fastpath for cached prompts
    (mlx-lm's own kernels otherwise)."""
    import mlx_lm
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.utils import load_adapters

    from codeadapt.models import fastpath

    if fast_kernels:
        fastpath.install(cached=True)
    else:
        fastpath.uninstall()
    tic = time.perf_counter()
    model, tokenizer = mlx_lm.load(str(model_dir))
    load_model_s = time.perf_counter() - tic
    tic = time.perf_counter()
    if adapter_dir is not None:
        model = load_adapters(model, str(adapter_dir))
        fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
        model.update_modules(tree_unflatten(fused))
    model.eval()
    return model, tokenizer, load_model_s, time.perf_counter() - tic


def evaluate_model(model_dir: Path, adapter_dir: Path | None, prompts: Sequence[Prompt],
                   spec: EvalSpec, generate: Callable[..., Generations] = generate_outputs
                   ) -> dict[str, Any]:
    """Load, generate, parse and score every prompt; per-prompt results plus a summary."""
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
    gen = generate(model, tokenizer, prompts, spec.max_tokens, spec.batch_size,
                   prefix_cache=spec.prefix_cache)
    return {"model": str(model_dir), "adapter": None if adapter_dir is None else str(adapter_dir),
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
    result = evaluate_model(Path(payload["model_dir"]), adapter, prompts, spec)
    from codeadapt.worker import blas_in_use

    result["blas"] = blas_in_use()
    return result
