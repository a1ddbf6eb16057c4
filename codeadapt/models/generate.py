"""Greedy generation for the evaluations: a model loaded for decoding (an adapter fused into
its weights, codeadapt.models.fastpath's kernels), prompts through their chat template, the
KV cache of shared token prefixes reused across prompts, and continuous batching with
mlx-lm's BatchGenerator in which the rows that decode together are chosen to pad each other
least. Same tokens as plain one-prompt-at-a-time greedy decoding (tests/test_evaluate.py).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codeadapt.prompts import Prompt


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


PREFILL_STEP = 512  # prompt tokens per prefill chunk


def _prefill(model: Any, cache: list[Any], ids: Sequence[int], start: int, stop: int,
             step: int | None = None, shared: Any = None) -> None:
    """Run `ids[start:stop]` through the model into `cache`, which holds `ids[:start]`, `step`
    at a time: the attention scores of a chunk are step × cache length floats per head, so a
    long tool result does not need gigabytes at once. `shared`: a
    codeadapt.models.prefill.SharedBottom that serves the bottom blocks' part of each chunk."""
    import mlx.core as mx

    step = step or PREFILL_STEP
    for i in range(start, stop, step):
        e = min(i + step, stop)
        if shared is not None:
            shared.run(model, cache, ids[:e], i)
        else:
            model(mx.array(ids[i:e])[None], cache=cache)
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
Follow = Callable[[int, list[int]], "list[int] | None"]  # (prompt index, its completion) -> next


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


def padding_added(n: int, rows: Sequence[int]) -> int:
    """Padded cache positions each decode step reads more when a prompt of `n` tokens joins
    running rows of these lengths (rows are left-padded to the longest): its own padding when
    it is shorter than the longest, else every running row's new padding."""
    if not rows:
        return 0
    span = max(rows)
    return span - n if n <= span else len(rows) * (n - span)


def _batched(model: Any, tokenizer: Any, ids: list[list[int]], max_tokens: int, batch_size: int,
             reuse: bool, carry: list[Carried | None] | None = None,
             finals: list[Carried | None] | None = None,
             batch_tokens: int | None = None,
             lookahead: int | None = None, shared: Any = None,
             follow: Follow | None = None) -> tuple[list[list[int]], int]:
    """Continuous batching: at most `batch_size` prompts decode together, and as soon as one
    finishes another is prefilled and joins the running batch (mlx-lm's BatchGenerator), so
    a short completion never waits for the longest of a fixed chunk. A prompt joins only while
    rows × the longest row (prompt + `max_tokens`) stays within `batch_tokens` (`kv_budget`
    by default) or the batch is empty: a long tool result decodes with few companions instead
    of padding seven others to its length. Each prompt is prefilled alone. With `reuse`,
    prompts go in sorted token order through one running KV cache trimmed back to the prefix
    shared with the previous prompt, and each prompt decodes from a snapshot of it: every
    shared prefix is prefilled once.

    Prompts are prefilled up to `lookahead` (default `batch_size`; 1 = in queue order) ahead,
    and at most `batch_tokens` tokens of them, into a pool, and a free row goes to the pooled
    prompt that pads the batch least (`padding_added`): rows are left-padded to the longest,
    and a decode step reads every row's cache to that length, so mixing a 1,000-token tool
    result with 250-token questions made half of the cache each step read padding (54% on
    the default run's prompts, 33% with the pool). Long prompts wait and decode together.

    `carry[j]`, when given, is a cache from an earlier call that prompt j extends (an agentic
    task's previous turn): the prompt starts from it when it shares more than the running
    cache does, so a conversation's history is not prefilled again each turn (the carried
    cache is consumed). `finals`, when given, receives each prompt's cache after its
    completion, for the next call. `shared`: a codeadapt.models.prefill.SharedBottom for the
    prefills, used where the model's caches allow it.

    `follow(j, tokens)`, when given, is called as prompt j finishes with what it generated, and
    may return the token ids of a next prompt (an agentic task's next turn, which extends prompt
    j and its completion): it joins the front of the queue, carrying j's cache, while the other
    rows go on decoding; `ids` and the returned lists grow by it. Without a round barrier a long
    answer no longer holds every other task's next turn back."""
    import copy

    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models.cache import make_prompt_cache

    outs: list[list[int]] = [[] for _ in ids]
    if follow is not None:  # a follow-up carries its predecessor's final cache
        carry = carry if carry is not None else [None] * len(ids)
        finals = finals if finals is not None else [None] * len(ids)
    queue = collections.deque(sorted(range(len(ids)), key=ids.__getitem__) if reuse
                              else range(len(ids)))
    state: dict[str, Any] = {"cache": make_prompt_cache(model), "have": [], "reused": 0}
    gen = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                         completion_batch_size=batch_size, prefill_batch_size=1)
    active: dict[int, int] = {}  # generator uid -> prompt index
    pool: list[tuple[int, list[Any]]] = []  # prefilled prompts waiting for a row, queue order
    budget = kv_budget(model) if batch_tokens is None else batch_tokens
    ahead = max(1, lookahead or batch_size)
    bottom = shared if shared is not None and shared.supports(model, state["cache"], shared.n) else None
    if bottom is not None:
        bottom.trim(0)  # follows this call's running prefix cache, which starts empty

    def fits(j: int) -> bool:
        if not active:
            return True
        longest = max(len(ids[i]) for i in [*active.values(), j]) + max_tokens
        return len(active) < batch_size and (len(active) + 1) * longest <= budget

    def padding(j: int) -> int:
        return padding_added(len(ids[j]), [len(ids[i]) + len(outs[i]) for i in active.values()])

    def fill() -> None:
        pooled = sum(len(ids[j]) for j, _ in pool)
        while queue and len(pool) < ahead and (not pool or pooled + len(ids[queue[0]]) <= budget):
            j = queue.popleft()
            pool.append((j, prefilled(j)))
            pooled += len(ids[j])

    def feed() -> None:
        fill()
        while candidates := [k for k, (j, _) in enumerate(pool) if fits(j)]:
            j, cache = pool.pop(min(candidates, key=lambda k: padding(pool[k][0])))
            (uid,) = gen.insert([ids[j][-1:]], [max_tokens], caches=[cache])
            active[uid] = j
            fill()

    def prefilled(j: int) -> list[Any]:
        """A KV cache holding prompt j but its last token, which starts the decode."""
        p = ids[j]
        keep = min(common_prefix(state["have"], p), len(p) - 1) if reuse else 0
        prior = carry[j] if carry and reuse else None
        shared = min(common_prefix(prior[0], p), len(p) - 1) if prior is not None else 0
        if prior is not None and carry:
            carry[j] = None  # consumed: rewound below, or dropped
        if prior is not None and shared > keep:
            own, k = _rewind(model, prior[1], shared)
            _prefill(model, own, p, k, len(p) - 1)  # a decoded cache: not shared (prefill.py)
            state["reused"] += k
            return own
        state["cache"], keep = _rewind(model, state["cache"], keep)
        if bottom is not None:
            bottom.trim(keep)
        _prefill(model, state["cache"], p, keep, len(p) - 1, shared=bottom)
        state["have"] = p[:-1]
        state["reused"] += keep
        return copy.deepcopy(state["cache"])

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
                    if follow is not None and carry is not None and finals is not None:
                        nxt = follow(j, outs[j])
                        if nxt is not None:
                            ids.append(nxt)
                            outs.append([])
                            carry.append(finals[j] if reuse else None)  # unused without reuse
                            finals.append(None)
                            queue.appendleft(len(ids) - 1)
                        finals[j] = None  # handed on (or the task is done): not kept
            feed()
    finally:
        gen.close()
    return outs, state["reused"]


def generate_outputs(model: Any, tokenizer: Any, prompts: Sequence[Prompt], max_tokens: int,
                     batch_size: int = 1, prefix_cache: bool = True,
                     sessions: dict[str, Carried] | None = None, shared: Any = None) -> Generations:
    """Greedy completions: continuous batching of `batch_size` streams when it is > 1, else
    stream_generate.

    `prefix_cache` reuses the KV cache of token prefixes that prompts share (the system prompt
    and tool schemas, and earlier turns of the same conversation) instead of prefilling them
    again; outputs are the same as without it. Models whose cache can't be trimmed (e.g.
    recurrent layers) run without it.

    `sessions` (batched path): caches kept between calls by prompt id. A prompt starts from its
    id's cache where that shares more of it, and its cache after the completion replaces it.

    `shared` (batched path): a codeadapt.models.prefill.SharedBottom, whose stored bottom-block
    chunks other models on the same base computed for these prompts."""
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

    ids = [prompt_ids(tokenizer, p) for p in prompts]
    reuse = prefix_cache and can_trim_prompt_cache(make_prompt_cache(model))
    tic = time.perf_counter()
    if batch_size > 1:
        carry = [sessions.pop(p.id, None) for p in prompts] if sessions is not None else None
        finals: list[Carried | None] | None = [None] * len(ids) if sessions is not None else None
        outs, reused = _batched(model, tokenizer, ids, max_tokens, batch_size, reuse, carry, finals,
                                shared=shared)
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


def generate_stream(model: Any, tokenizer: Any, prompts: Sequence[Prompt], max_tokens: int,
                    batch_size: int, follow: Callable[[int, str], Prompt | None],
                    shared: Any = None) -> int:
    """Greedy completions of `prompts` and of the prompts that follow them: `follow(i, text)`
    gets prompt i's completion (i: the index in `prompts` of the conversation it continues)
    and returns that conversation's next prompt, or None when it is done. Continuous batching
    as in `generate_outputs`, with each follow-up joining the running batch as soon as its
    predecessor finishes, from that predecessor's KV cache (`_batched`'s `follow`). Returns
    the prompts' tokens served from caches instead of prefilled."""
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    owner = list(range(len(ids)))  # prompt index -> the conversation it belongs to

    def nxt(j: int, tokens: list[int]) -> list[int] | None:
        p = follow(owner[j], tokenizer.decode(tokens))
        if p is None:
            return None
        owner.append(owner[j])
        return prompt_ids(tokenizer, p)

    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

    reuse = can_trim_prompt_cache(make_prompt_cache(model))
    _, reused = _batched(model, tokenizer, ids, max_tokens, batch_size, reuse, shared=shared,
                         follow=nxt)
    return reused


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
