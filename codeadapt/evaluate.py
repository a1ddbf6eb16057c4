"""Evaluate a base model or adapter on held-out tool-use turns: generate, parse the tool call
the chat template defines, score it against the expected turn (running both calls with
`codeadapt.tools`), and summarise with Wilson intervals. Prompts come from codeadapt.prompts."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from codeadapt import tools

# Re-exported: the evaluation API is one import.
from codeadapt.prompts import (  # noqa: F401
    Prompt,
    check_contamination,
    load_fixed_set,
    ngram_overlap,
    prompts_from_split,
    user_texts,
)

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
# Text a model must never write itself: a tool's reply or the start of another turn.
FABRICATED = ("<tool_response>", "</tool_response>", "<|im_start|>")
NO_MATCHES = "No matches."
ADAPTER_FILE = "adapters.safetensors"
# Per-prompt checks; name and arguments count only turns that expect a tool call.
METRICS = ("correct", "format", "decision", "name", "arguments", "stop", "executed_ok")


class EvalSpec(BaseModel):
    """Evaluation options (until config.py grows an `[eval]` section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(256, ge=1, le=4096, description="generation limit per prompt")
    batch_size: int = Field(8, ge=1, le=256, description="1 = sequential stream_generate")
    run_tools: bool = Field(True, description="execute calls on the checkouts (grep equivalence)")
    ngram: int = Field(8, ge=1, le=64, description="word n-gram size for decontamination")
    # Question templates alone share 8-grams: phase7 test vs train measured 12.9%, phase6 6.1%.
    max_contamination: float = Field(
        0.2, ge=0, le=1, description="fail when more test user turns share an n-gram with train"
    )
    max_train_count: int | None = Field(
        None, ge=1, description="ignore n-grams in more train turns than this (template text)"
    )


# ---- parsing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Markers:
    """How a template wraps a tool call, and the parser for the text between the tags."""

    start: str = TOOL_CALL_START
    end: str = TOOL_CALL_END
    parser: Callable[[str, Any], Any] | None = None  # None: JSON

    def parse(self, text: str, tool_list: Any = None) -> Any:
        return self.parser(text, tool_list) if self.parser else json.loads(text.strip())


def markers_of(tokenizer_or_markers: Any) -> Markers:
    """Markers from an mlx-lm TokenizerWrapper's tool parser, else our template's defaults."""
    if isinstance(tokenizer_or_markers, Markers):
        return tokenizer_or_markers
    if getattr(tokenizer_or_markers, "has_tool_calling", False):
        t = tokenizer_or_markers
        return Markers(t.tool_call_start, t.tool_call_end, t.tool_parser)
    return Markers()


@dataclass(frozen=True, slots=True)
class Parsed:
    format_valid: bool
    is_tool_call: bool
    name: str | None = None
    arguments: Any = None  # a dict when valid; whatever the model wrote otherwise
    extra_text_after_call: str = ""
    fabricated_response: bool = False
    error: str = ""


def parse_output(text: str, tokenizer_or_markers: Any = None, tool_list: Any = None) -> Parsed:
    """Split a completion into a tool call (first one) or a direct answer, and say what's wrong."""
    mk = markers_of(tokenizer_or_markers)
    fabricated = any(tag in text for tag in FABRICATED)
    start = text.find(mk.start)
    if start < 0:
        if mk.end in text:
            return Parsed(False, False, fabricated_response=fabricated,
                          error=f"stray {mk.end} without {mk.start}")
        if not text.strip():
            return Parsed(False, False, error="empty output")
        return Parsed(True, False, fabricated_response=fabricated)
    end = text.find(mk.end, start + len(mk.start))
    if end < 0:
        return Parsed(False, True, fabricated_response=fabricated,
                      error=f"truncated tool call: no {mk.end}")
    extra = text[end + len(mk.end):].strip()
    base = {"is_tool_call": True, "extra_text_after_call": extra, "fabricated_response": fabricated}
    try:
        call = mk.parse(text[start + len(mk.start):end], tool_list)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        return Parsed(False, error=f"unparsable tool call: {exc}", **base)
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return Parsed(False, error="tool call is not an object with a string 'name'", **base)
    args = call.get("arguments")
    if not isinstance(args, dict):
        return Parsed(False, name=call["name"], arguments=args,
                      error=f"arguments must be a JSON object, got {type(args).__name__}", **base)
    return Parsed(True, name=call["name"], arguments=args, **base)


# ---- scoring ---------------------------------------------------------------------------------


def _as_int(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d+\s*", v):
        return int(v)
    return v


def _norm_path(v: Any) -> Any:
    # "./svcs/" == "svcs"; ".." stays so a refused path never equals an allowed one.
    return PurePosixPath(v).as_posix() if isinstance(v, str) else v


def normalize_arguments(name: str, args: Any) -> Any:
    """Arguments with the tool's defaults filled and equivalent spellings unified."""
    if not isinstance(args, dict):
        return args
    out = dict(args)
    if name == "grep":
        out["path"] = _norm_path(out.get("path") or ".")
        out["glob"] = out.get("glob") or None
    elif name == "read_file":
        out["path"] = _norm_path(out.get("path"))
        out["start_line"] = _as_int(out.get("start_line", 1))
        out["end_line"] = _as_int(out.get("end_line"))
    return out


def _same(a: Any, b: Any) -> bool:
    # As JSON, so `true` never equals 1 the way Python's True == 1 does.
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def run_call(root: str | Path, name: str, arguments: Any) -> str:
    """`tools.execute`, with the regex failures it lets escape turned into error text."""
    try:
        return tools.execute(root, name, arguments)
    except (OverflowError, RecursionError, re.error, ValueError) as exc:
        return f"error: {exc}"


@dataclass(frozen=True, slots=True)
class Scored:
    correct: bool
    format: bool
    decision: bool
    name: bool | None  # None: no call expected
    arguments: bool | None
    stop: bool
    executed: bool  # the model's call parsed and was run
    exec_error: bool | None
    tool_output: str | None
    failure: str  # first failed check, "" when correct


def score(prompt: Prompt, parsed: Parsed, root: str | Path | None = None) -> Scored:
    """Check one parsed completion against its prompt; run calls in `root` when given."""
    decision = parsed.is_tool_call == prompt.expects_call
    stop = not parsed.extra_text_after_call and not parsed.fabricated_response
    output = None
    if root is not None and parsed.is_tool_call and parsed.name is not None:
        output = run_call(root, parsed.name, parsed.arguments)
    name_ok = args_ok = None
    if prompt.expects_call:
        name_ok = parsed.is_tool_call and parsed.name == prompt.expected_name
        args_ok = bool(name_ok) and isinstance(parsed.arguments, dict) and _same(
            normalize_arguments(parsed.name, parsed.arguments),
            normalize_arguments(prompt.expected_name, prompt.expected_arguments))
        if name_ok and not args_ok and prompt.expected_name == "grep" and output is not None:
            # Two patterns that find the same lines are the same search.
            want = run_call(root, "grep", prompt.expected_arguments)
            args_ok = output == want and not want.startswith("error:") and want != NO_MATCHES
    checks = [("format", parsed.format_valid), ("decision", decision), ("name", name_ok),
              ("arguments", args_ok), ("stop", stop)]
    failure = next((k for k, ok in checks if ok is False), "")
    return Scored(correct=not failure, format=parsed.format_valid, decision=decision,
                  name=name_ok, arguments=args_ok, stop=stop, executed=output is not None,
                  exec_error=None if output is None else output.startswith("error:"),
                  tool_output=None if output is None else output[:1000], failure=failure)


# ---- statistics ------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; (0, 1) when n is 0."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(scores: Sequence[Scored], z: float = 1.96) -> dict[str, dict[str, Any]]:
    """Accuracy per metric with its Wilson interval; name/arguments over expected calls only."""
    out = {}
    for m in METRICS:
        if m == "executed_ok":
            vals = [not s.exec_error for s in scores if s.executed]
        else:
            vals = [getattr(s, m) for s in scores if getattr(s, m) is not None]
        k, n = sum(vals), len(vals)
        lo, hi = wilson(k, n, z)
        out[m] = {"k": k, "n": n, "accuracy": k / n if n else None, "lo": lo, "hi": hi}
    return out


# ---- generation ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Generations:
    texts: list[str]
    finish_reasons: list[str]  # "stop" (end of turn) or "length"
    generated_tokens: list[int]
    prompt_tokens: int
    seconds: float


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    return tokenizer.apply_chat_template(list(prompt.messages), tools=list(prompt.tools) or None,
                                         add_generation_prompt=True, return_dict=False)


def generate_outputs(model: Any, tokenizer: Any, prompts: Sequence[Prompt], max_tokens: int,
                     batch_size: int = 1) -> Generations:
    """Greedy completions: batch_generate when batch_size > 1, else stream_generate."""
    from mlx_lm.generate import batch_generate, stream_generate

    ids = [prompt_ids(tokenizer, p) for p in prompts]
    tic = time.perf_counter()
    if batch_size > 1:
        resp = batch_generate(model, tokenizer, ids, max_tokens=max_tokens, return_token_ids=True,
                              completion_batch_size=batch_size,
                              prefill_batch_size=min(batch_size, 8))
        outs = resp.token_ids
    else:
        outs = []
        for p in ids:
            toks = [r.token for r in stream_generate(model, tokenizer, p, max_tokens=max_tokens)
                    if r.finish_reason != "stop"]  # the "stop" response carries the eos token
            outs.append(toks)
    seconds = time.perf_counter() - tic
    # Decode both paths the same way, special tokens kept, so an invented turn shows up.
    return Generations(texts=[tokenizer.decode(t) for t in outs],
                       finish_reasons=["length" if len(t) >= max_tokens else "stop" for t in outs],
                       generated_tokens=[len(t) for t in outs],
                       prompt_tokens=sum(map(len, ids)), seconds=seconds)


def adapter_bytes(adapter_dir: Path | None) -> int | None:
    """Size of the final adapter weights; numbered checkpoints beside it don't count."""
    return None if adapter_dir is None else (Path(adapter_dir) / ADAPTER_FILE).stat().st_size


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
    import mlx_lm
    from mlx_lm.tuner.utils import load_adapters

    tic = time.perf_counter()
    model, tokenizer = mlx_lm.load(str(model_dir))
    load_model_s = time.perf_counter() - tic
    tic = time.perf_counter()
    if adapter_dir is not None:
        model = load_adapters(model, str(adapter_dir))
    model.eval()
    load_adapter_s = time.perf_counter() - tic

    gen = generate(model, tokenizer, prompts, spec.max_tokens, spec.batch_size)
    markers = markers_of(tokenizer)
    results, scores = [], []
    for i, p in enumerate(prompts):
        parsed = parse_output(gen.texts[i], markers, list(p.tools))
        s = score(p, parsed, p.root if spec.run_tools else None)
        scores.append(s)
        results.append({
            "id": p.id, "example_id": p.example_id, "source": p.source, "kind": p.kind,
            "held_out": p.held_out, "expected": {"name": p.expected_name,
                                                 "arguments": p.expected_arguments},
            "output": gen.texts[i], "finish_reason": gen.finish_reasons[i],
            "generated_tokens": gen.generated_tokens[i], "parsed": asdict(parsed),
            "score": asdict(s)})
    n_tokens = sum(gen.generated_tokens)
    by_source: dict[str, list[int]] = {}
    for p, s in zip(prompts, scores):
        by_source.setdefault(p.source, [0, 0])
        by_source[p.source][0] += s.correct
        by_source[p.source][1] += 1
    return {
        "model": str(model_dir), "adapter": None if adapter_dir is None else str(adapter_dir),
        "spec": spec.model_dump(), "prompts": len(prompts),
        "load_s": load_model_s + load_adapter_s, "load_model_s": load_model_s,
        "load_adapter_s": load_adapter_s, "gen_s": gen.seconds,
        "gen_s_per_prompt": gen.seconds / len(prompts), "generated_tokens": n_tokens,
        "tokens_per_s": n_tokens / gen.seconds if gen.seconds > 0 else None,
        "truncated": sum(r == "length" for r in gen.finish_reasons),
        "adapter_bytes": adapter_bytes(adapter_dir),
        "metrics": summarize(scores),
        "by_source": {k: {"k": v[0], "n": v[1]} for k, v in sorted(by_source.items())},
        "results": results,
    }
