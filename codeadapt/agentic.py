"""Agentic evaluation: the model gets only the question, calls the real tools on the pinned
checkout in a loop (at most `max_calls` calls; a tool's error comes back to it as the tool
returns it), and its final answer is scored against the task's ground truth. This is what a
user of the adapter gets, where the turn-level scores feed the gold history back in.

Tasks are the held-out conversations whose last turn is an answer after at least one call.
Ground truth comes from that conversation: for "which classes subclass X / which files import
X / where is @X used" (a bullet list) the expected items, scored by precision and recall; for
every other kind the expected answer's fact tokens and yes/no polarity (`evaluate.match_answer`:
path and line for "where is X", the quoted definition for "show X", ...).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from codeadapt import chat
from codeadapt.evaluate import (
    Markers,
    answer_facts,
    effective_n,
    match_answer,
    parse_output,
    run_call,
    wilson,
)
from codeadapt.prompts import Prompt

SET_KINDS = ("grep_subclasses", "grep_importers", "grep_decorator", "grep_async")
SET_F1 = 0.8  # a list answer succeeds at this F1 of its items against the expected items


@dataclass(frozen=True, slots=True)
class Task:
    id: str
    source: str
    kind: str
    root: str
    system: dict[str, Any]
    question: str
    expected: str  # the gold conversation's final answer
    gold_calls: int
    tools: tuple[dict[str, Any], ...]
    cluster: str
    held_out: bool = False


@dataclass(slots=True)
class Outcome:
    task_id: str
    success: bool
    calls: int = 0
    invalid_calls: int = 0  # unparsable, unknown tool, or a tool error
    answer: str = ""
    failure: str = ""  # "" | "no_answer" | "too_many_calls" | an answer-check reason
    precision: float | None = None
    recall: float | None = None
    seconds: float = 0.0
    transcript: list[dict[str, Any]] = field(default_factory=list)


def tasks_from_prompts(prompts: Sequence[Prompt], limit: int | None = None) -> list[Task]:
    """One task per conversation whose final turn answers after at least one call."""
    last: dict[str, Prompt] = {}
    for p in prompts:
        if p.example_id not in last or p.turn > last[p.example_id].turn:
            last[p.example_id] = p
    out = []
    for p in last.values():
        calls = sum(bool(m.get("tool_calls")) for m in p.messages)
        users = [m for m in p.messages if m.get("role") == "user"]
        if p.expects_call or calls == 0 or len(users) != 1:
            continue
        out.append(Task(p.example_id, p.source, p.kind, p.root, p.messages[0], users[0]["content"],
                        p.expected_text, calls, p.tools, p.group, p.held_out))
    out.sort(key=lambda t: t.id)
    return out[:limit] if limit else out


def _items(text: str) -> list[frozenset[str]]:
    """The fact tokens of each bullet line of a list answer."""
    return [frozenset(answer_facts(ln)) for ln in text.splitlines()
            if ln.lstrip().startswith(("-", "*")) and answer_facts(ln)]


def score_answer(task: Task, answer: str) -> tuple[bool, str, float | None, float | None]:
    """(success, why not, precision, recall) of a final answer against the task's truth."""
    if task.kind in SET_KINDS:
        want, got = _items(task.expected), _items(answer)
        if want:
            flat = " ".join(answer.split())
            found = [w for w in want if all(f in flat for f in w)]
            right = [g for g in got if any(w <= g for w in want)]
            recall = len(found) / len(want)
            precision = len(right) / len(got) if got else (1.0 if found else 0.0)
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            return f1 >= SET_F1, "" if f1 >= SET_F1 else "set", precision, recall
    m = match_answer(answer, task.expected, task.question)
    return m.ok, "" if m.ok else (m.rule if m.rule not in ("facts", "f1") else "answer"), None, None


# generate(conversations, their tools, their task ids) -> one completion per conversation
Generate = Callable[[list[list[dict[str, Any]]], list[tuple[dict[str, Any], ...]], list[str]],
                    list[str]]


def _advance(t: Task, text: str, o: Outcome, conv: list[dict[str, Any]], max_calls: int,
             markers: Markers) -> bool:
    """One model turn of task `t`: a final answer is scored, a call runs on the checkout and
    its result joins `conv`. True while the task goes on (its conversation grew)."""
    parsed = parse_output(text, markers, list(t.tools))
    if not parsed.is_tool_call:
        o.answer = parsed.answer_text
        ok, why, o.precision, o.recall = score_answer(t, o.answer)
        o.success, o.failure = ok and not parsed.fabricated_response, why or (
            "" if not parsed.fabricated_response else "fabricated")
        if not o.answer:
            o.success, o.failure = False, "no_answer"
        return False
    if o.calls == max_calls:
        o.failure = "too_many_calls"
        return False
    o.calls += 1
    call_id = f"call_{o.calls}"
    if not parsed.format_valid or parsed.name is None:
        o.invalid_calls += 1
        result = f"error: {parsed.error or 'malformed tool call'}"
        name, args = "grep", {}
    else:
        name, args = parsed.name, parsed.arguments
        result = run_call(t.root, name, args)
        o.invalid_calls += result.startswith("error:")
        if name not in {s["function"]["name"] for s in t.tools}:
            name = "grep"  # keep the transcript renderable; the result says what happened
    conv += [chat.tool_call(call_id, name, args if isinstance(args, dict) else {}),
             chat.tool_result(call_id, name, result)]
    return True


Stream = Callable[[list[list[dict[str, Any]]], list[tuple[dict[str, Any], ...]],
                   Callable[[int, str], "list[dict[str, Any]] | None"]], None]


def run_tasks(tasks: Sequence[Task], generate: Generate, max_calls: int,
              markers: Markers = Markers(), stream: Stream | None = None) -> list[Outcome]:
    """Run every task to a final answer or `max_calls` calls. `generate(conversations, tools,
    ids)` returns one completion per conversation; tasks still going are generated together,
    one turn per round, so a batched generator batches across tasks (and, by id, can continue
    each task from its previous turn's cache). With `stream` (`ModelGenerator.stream`) the
    tasks run without rounds instead: each task's next turn is generated as soon as its call
    has run, beside the others' turns (the same greedy turns); every task then gets an equal
    share of the run's time (in rounds, of each round's)."""
    convs = {t.id: [t.system, chat.user(t.question)] for t in tasks}
    out = {t.id: Outcome(t.id, False) for t in tasks}
    active: list[Task] = []
    if stream is not None and tasks:
        tic = time.perf_counter()
        going = {t.id for t in tasks}

        def turn(i: int, text: str) -> list[dict[str, Any]] | None:
            t = tasks[i]
            if _advance(t, text, out[t.id], convs[t.id], max_calls, markers):
                return convs[t.id]
            going.discard(t.id)
            return None

        stream([convs[t.id] for t in tasks], [t.tools for t in tasks], turn)
        if going:
            raise RuntimeError(f"the generator left {len(going)} tasks without a final turn")
        share = (time.perf_counter() - tic) / len(tasks)
        for t in tasks:
            out[t.id].seconds = share
    else:
        active = list(tasks)
        for _ in range(max_calls + 1):
            if not active:
                break
            tic = time.perf_counter()
            texts = generate([convs[t.id] for t in active], [t.tools for t in active],
                             [t.id for t in active])
            share = (time.perf_counter() - tic) / len(active)
            still = []
            for t, text in zip(active, texts):
                out[t.id].seconds += share
                if _advance(t, text, out[t.id], convs[t.id], max_calls, markers):
                    still.append(t)
            active = still
    for t in active:  # ran out of rounds while still calling
        out[t.id].failure = out[t.id].failure or "too_many_calls"
    for t in tasks:
        out[t.id].transcript = convs[t.id][1:]
    return [out[t.id] for t in tasks]


def summarize_tasks(tasks: Sequence[Task], outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Task success (clustered Wilson interval), calls, invalid-call rate, time; overall and
    for held-out files vs held-out repositories."""
    def part(pairs: list[tuple[Task, Outcome]]) -> dict[str, Any]:
        vals = [o.success for _, o in pairs]
        n, k = len(vals), sum(vals)
        n_eff = effective_n(vals, [t.cluster for t, _ in pairs])
        lo, hi = wilson(k / n * n_eff if n else 0, n_eff)
        calls = sum(o.calls for _, o in pairs)
        return {"k": k, "n": n, "success": k / n if n else None, "lo": lo, "hi": hi,
                "calls_per_task": calls / n if n else None,
                "invalid_call_rate": sum(o.invalid_calls for _, o in pairs) / calls if calls else None,
                "seconds_per_task": sum(o.seconds for _, o in pairs) / n if n else None}

    pairs = list(zip(tasks, outcomes))
    by_kind: dict[str, list[int]] = {}
    for t, o in pairs:
        k = by_kind.setdefault(kind_name(t), [0, 0])
        k[0], k[1] = k[0] + o.success, k[1] + 1
    return {"all": part(pairs), "held_out_files": part([p for p in pairs if not p[0].held_out]),
            "held_out_repos": part([p for p in pairs if p[0].held_out]),
            "by_kind": dict(sorted(by_kind.items())),  # kind -> [successes, tasks]
            "failures": {f: sum(o.failure == f for o in outcomes)
                         for f in sorted({o.failure for o in outcomes if o.failure})}}


SESSION_TOKENS = 32_768  # KV kept between turns, all tasks together (fp32 SmolLM2: ~1.5 GB)


class ModelGenerator:
    """A `Generate` over an mlx-lm model: greedy, prefix-cached, batched (evaluate's path).
    With batching, each task's KV cache is kept from one turn to the next (up to
    SESSION_TOKENS in all), so a turn prefills only the new call and tool result; and `stream`
    runs whole tasks without rounds (`generate.generate_stream`)."""

    def __init__(self, model: Any, tokenizer: Any, max_tokens: int, batch_size: int,
                 shared: Any = None) -> None:
        from codeadapt.models.generate import Carried

        self.model, self.tokenizer, self.shared = model, tokenizer, shared
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.sessions: dict[str, Carried] = {}

    @staticmethod
    def _prompt(i: str, conv: Sequence[dict[str, Any]], tools: tuple[dict[str, Any], ...]) -> Prompt:
        return Prompt(id=i, example_id=i, turn=len(conv), messages=tuple(conv), tools=tools,
                      expected_name=None, expected_arguments=None, expected_text="",
                      source="", kind="", root="")

    def __call__(self, convs: list[list[dict[str, Any]]], tools: list[tuple[dict[str, Any], ...]],
                 ids: list[str]) -> list[str]:
        from codeadapt.models.generate import generate_outputs

        prompts = [self._prompt(i, c, t) for i, c, t in zip(ids, convs, tools)]
        sessions = self.sessions if self.batch_size > 1 else None
        texts = generate_outputs(self.model, self.tokenizer, prompts, self.max_tokens,
                                 self.batch_size, sessions=sessions, shared=self.shared).texts
        total = 0
        for key in [k for k in ids if k in self.sessions]:  # keep what fits, in task order
            total += len(self.sessions[key][0])
            if total > SESSION_TOKENS:
                del self.sessions[key]
        for key in [k for k in self.sessions if k not in ids]:
            del self.sessions[key]
        return texts

    def stream(self, convs: list[list[dict[str, Any]]], tools: list[tuple[dict[str, Any], ...]],
               turn: Callable[[int, str], list[dict[str, Any]] | None]) -> None:
        """Conversation i's completions go to `turn(i, text)`, which returns its next
        conversation or None when the task is done."""
        from codeadapt.models.generate import generate_stream

        def follow(i: int, text: str) -> Prompt | None:
            conv = turn(i, text)
            return None if conv is None else self._prompt(str(i), conv, tools[i])

        generate_stream(self.model, self.tokenizer,
                        [self._prompt(str(i), c, t) for i, (c, t) in enumerate(zip(convs, tools))],
                        self.max_tokens, self.batch_size, follow, self.shared)


def rules_generator() -> Generate:
    from codeadapt.baseline import rule_output

    return lambda convs, tools, ids: [rule_output(c) for c in convs]


def outcomes_json(outcomes: Sequence[Outcome], keep_transcripts: int = 20) -> list[dict[str, Any]]:
    """Outcomes as JSON; the first `keep_transcripts` keep their transcript (for reading)."""
    rows = []
    for i, o in enumerate(outcomes):
        d = asdict(o)
        if i >= keep_transcripts:
            d.pop("transcript")
        rows.append(d)
    return rows


def kind_name(task: Task) -> str:
    """The task's kind without the definition's sort (`read_class` and `read_function` are
    both `read`)."""
    return re.sub(r"_(class|function|method)$", "", task.kind)


def kinds_of(tasks: Sequence[Task]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in tasks:
        out[kind_name(t)] = out.get(kind_name(t), 0) + 1
    return out


def sample_key(task: Task) -> str:
    """A task's place in the stable sample: a hash of its repository and question. Not of the
    example id, which hashes the whole conversation: a generator change that rewords answers
    (v8's list answers) would then draw another sample, and two versions could not be compared
    on the same questions."""
    import hashlib

    return hashlib.sha256(f"{task.source}\0{task.question}".encode()).hexdigest()


def sample_tasks(tasks: Sequence[Task], limit: int) -> list[Task]:
    """A stable sample: the `limit` tasks with the smallest `sample_key` (ties by id)."""
    return sorted(tasks, key=lambda t: (sample_key(t), t.id))[:limit]


def mix_tasks(pools: Sequence[Sequence[Task]], limit: int) -> list[Task]:
    """`limit` tasks split evenly across the non-empty pools (held-out files, held-out
    repositories), each a stable sample; a short pool leaves its share to the others."""
    pools = sorted((list(p) for p in pools if p), key=len)
    out: list[Task] = []
    for i, pool in enumerate(pools):
        share = (limit - len(out)) // (len(pools) - i)
        out += sample_tasks(pool, share)
    return out


def agentic_job(payload: dict[str, Any], progress: Any = None) -> dict[str, Any]:
    """Worker entry: collect and sample the tasks, run them with the model (or, for
    `model_dir` "rules", the rule baseline), score, summarise."""
    from pathlib import Path

    from codeadapt.config import AgenticSpec, EvalSpec
    from codeadapt.prompts import prompts_from_split

    spec, ev = AgenticSpec.model_validate(payload["agentic"]), EvalSpec.model_validate(payload["spec"])
    repos = Path(payload["repos_dir"])
    pools = [tasks_from_prompts(prompts_from_split(Path(payload["data_dir"]), ev.split,
                                                   ev.hold_out_sources, repos))]
    if payload.get("held_out_dir"):  # every split of a phase no adapter trained on
        held = Path(payload["held_out_dir"])
        if not (held / "manifest.json").is_file():
            raise FileNotFoundError(f"{held}: no manifest.json; build the held-out phase first "
                                    "(`codeadapt run phase7 --data-only` builds it)")
        sources = sorted({e["source"] for e in json.loads((held / "manifest.json").read_text())["examples"]})
        pools.append(tasks_from_prompts(prompts_from_split(held, ev.split, sources, repos)))
    tasks = mix_tasks(pools, spec.tasks)
    if not tasks:
        raise ValueError(f"{payload['data_dir']}: no held-out conversation ends in an answer after a call")
    over_cap = None  # tasks whose expected answer is longer than a turn may be: unpassable
    shared = None
    if payload["model_dir"] == "rules":
        gen, load_s = rules_generator(), 0.0
    else:
        from codeadapt.models.generate import load_for_generation

        model, tokenizer, load_s, adapter_s = load_for_generation(
            payload["model_dir"], payload.get("adapter_dir"), ev.fast_kernels)
        load_s += adapter_s
        from codeadapt.models import prefill

        shared = prefill.for_row(model, payload["model_dir"], payload.get("adapter_dir"),
                                 payload.get("prefill_store"), payload.get("base_top"),
                                 ev.fast_kernels)
        gen = ModelGenerator(model, tokenizer, spec.max_tokens, spec.batch_size, shared)
        over_cap = sum(len(tokenizer.encode(t.expected)) > spec.max_tokens for t in tasks)
    tic = time.perf_counter()
    stream = gen.stream if isinstance(gen, ModelGenerator) and spec.batch_size > 1 else None
    outcomes = run_tasks(tasks, gen, spec.max_calls, stream=stream)
    if shared is not None:
        prefill.prune(payload["prefill_store"])
    return {"model": payload["model_dir"], "adapter": payload.get("adapter_dir"),
            "spec": spec.model_dump(), "tasks": len(tasks), "kinds": kinds_of(tasks),
            "load_s": load_s, "run_s": time.perf_counter() - tic, "over_cap": over_cap,
            "shared_prefill": None if shared is None else shared.stats(),
            "summary": summarize_tasks(tasks, outcomes),
            "outcomes": outcomes_json(outcomes, payload.get("keep_transcripts", 20))}
