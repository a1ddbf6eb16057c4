"""Merge per-source examples into a phase dataset: redact, replay, dedup, split, write.

The split is a pure function of (salt, source, group), so an example keeps its split when a
later phase adds data. The group is the example's file, so every example drawn from one file
lands in one split; a source of a group listed in `split.by_symbol` (a small repository, where
a few files hold most definitions) is split by top-level definition instead, so that each split
gets its share and all examples about one definition still share a split.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from codeadapt import chat, parallel, tools
from codeadapt.budget import Budget, fit, length_stats, load_counter, samples
from codeadapt.card import data_card, question_stats
from codeadapt.fsutil import locked, read_json, replace_dir
from codeadapt.records import Checkout, Example
from codeadapt.secrets import redact, redact_text

DATASET_VERSION = "3"
SPLITS = ("train", "valid", "test")


def split_of(source: str, group: str, valid: float, test: float, salt: str) -> str:
    """Stable split for a (source, group) pair; the group is a path or `path:line`."""
    h = hashlib.sha256(f"{salt}\0{source}\0{group}".encode()).digest()
    x = int.from_bytes(h[:8], "big") / 2**64
    return "test" if x < test else "valid" if x < test + valid else "train"


_TOP_DEF = re.compile(r"(?:async\s+def|def|class)\b|@")


def definition_anchor(lines: list[str], line: int) -> int:
    """First line (decorators included) of the top-level definition that holds 1-based `line`
    (a method's class, a function's decorators); 1 for module code above the first one."""
    i = min(max(line, 1), max(len(lines), 1)) - 1
    while i > 0 and not _TOP_DEF.match(lines[i]):
        i -= 1
    while i > 0 and lines[i - 1].startswith("@"):
        i -= 1
    return i + 1


class SplitGroups:
    """The split group of an example: its path, or `path:anchor` for a source split by symbol.
    File text is read once per (root, path)."""

    def __init__(self) -> None:
        self._lines: dict[tuple[str, str], list[str]] = {}

    def __call__(self, root: Path | str, path: str, line: int, by_symbol: bool) -> str:
        if not by_symbol:
            return path
        key = (str(root), path)
        if key not in self._lines:
            try:
                text = (Path(root) / path).read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = ""
            self._lines[key] = text.splitlines()
        return f"{path}:{definition_anchor(self._lines[key], line)}"


def _norm(obj: Any) -> Any:
    if isinstance(obj, str):
        return " ".join(obj.split()).lower()
    if isinstance(obj, list | tuple):
        return [_norm(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _norm(v) for k, v in sorted(obj.items()) if k not in {"id", "tool_call_id"}}
    return obj


def content_key(example: Example) -> str:
    """Hash of the normalised conversation (whitespace and case folded; call ids ignored)."""
    blob = json.dumps(_norm(list(example.messages)), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def replay_mismatches(example: Example, root: Path | str) -> list[int]:
    """Indices of tool messages that differ from re-running the tool (redacted as written)."""
    return chat.replay_mismatches(example.messages, root, clean=lambda t: redact_text(t)[0])


def prepare(examples: Iterable[Example], checkouts: dict[str, Checkout],
            stats: Counter[str]) -> list[Example]:
    """Redact, then keep only examples whose every tool result replays on its checkout.
    Replayed source by source (in worker processes where `parallel` has them), each under one
    grep index of its checkout; the order is kept."""
    examples = list(examples)
    by_source: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_source.setdefault(ex.source, []).append(i)
    jobs = [([examples[i] for i in idxs], checkouts.get(source)) for source, idxs in by_source.items()]
    kept: dict[int, Example] = {}
    for idxs, (results, counts) in zip(by_source.values(), parallel.starmap(_prepare_source, jobs)):
        stats.update(counts)
        kept.update((i, ex) for i, ex in zip(idxs, results) if ex is not None)
    return [kept[i] for i in sorted(kept)]


def _prepare_source(examples: list[Example], co: Checkout | None) -> tuple[list[Example | None], Counter[str]]:
    stats: Counter[str] = Counter()
    with tools.indexed(co.path) if co is not None else contextlib.nullcontext():
        return [_prepared(ex, co, stats) for ex in examples], stats


def _prepared(ex: Example, co: Checkout | None, stats: Counter[str]) -> Example | None:
    if co is None:
        stats["dropped_source_unavailable"] += 1
        return None
    if not ex.commit:
        ex = replace(ex, commit=co.commit)
    msgs, n = redact(list(ex.messages))
    stats["secrets_redacted"] += n
    ex = replace(ex, messages=tuple(msgs))
    if ex.commit != co.commit or replay_mismatches(ex, co.path):
        stats["dropped_replay_mismatch"] += 1
        return None
    return ex


def dedup(examples: list[Example], stats: Counter[str]) -> list[tuple[str, Example]]:
    """First occurrence of each normalised conversation wins; callers order oldest phase first."""
    seen: set[str] = set()
    out = []
    for ex in examples:
        key = content_key(ex)
        if key in seen:
            stats["dropped_duplicate"] += 1
            continue
        seen.add(key)
        out.append((key[:16], ex))
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def fit_budget(kept: list[tuple[str, Example]], budget: Budget | None,
               stats: Counter[str]) -> tuple[list[tuple[str, Example, int | None]], Any]:
    """Each example within the token budget (cut or dropped, counted), with its token count,
    and the renderer the card shows examples with; counts are None without a budget."""
    if budget is None:
        return [(k, ex, None) for k, ex in kept], None
    count, render, count_many = load_counter(budget.tokenizer_dir)
    lengths = count_many([(ex.messages, ex.tools) for _, ex in kept])
    out = []
    for (key, ex), n0 in zip(kept, lengths):
        fitted, n, how = fit(ex, count, budget.max_tokens, n0)
        if how != "fits":
            stats[f"{how}[{ex.kind}]" if fitted is None else "cut_to_token_budget"] += 1
        if fitted is not None:
            out.append((key, fitted, n))
    return out, render


def build_dataset(phase: str, examples: list[Example], checkouts: dict[str, Checkout],
                  out_dir: Path, split_cfg: dict[str, Any], inputs: dict[str, Any],
                  upstream_stats: dict[str, dict[str, int]], budget: Budget | None = None) -> dict[str, Any]:
    """`_build_dataset` under `out_dir`'s lock: two runs building one dataset take turns (the
    second finds it up to date)."""
    with locked(Path(out_dir)):
        return _build_dataset(phase, examples, checkouts, Path(out_dir), split_cfg, inputs,
                              upstream_stats, budget)


def _build_dataset(phase: str, examples: list[Example], checkouts: dict[str, Checkout],
                   out_dir: Path, split_cfg: dict[str, Any], inputs: dict[str, Any],
                   upstream_stats: dict[str, dict[str, int]], budget: Budget | None) -> dict[str, Any]:
    """Write `out_dir/{train,valid,test}.jsonl`, `manifest.json`, `README.md`; return manifest.

    With a `budget`, examples are fitted to the training `max_seq_length` in the target
    model's tokens here (never dropped silently by the trainer). Nothing is rewritten when the
    existing dataset was built from the same inputs and its files are intact
    (`manifest["rebuilt"]` says which happened)."""
    inputs = {**inputs, "token_budget": budget.key() if budget else None}
    current = up_to_date(out_dir, inputs, split_cfg)
    if current is not None:
        return {**current, "rebuilt": False}
    stats: Counter[str] = Counter()
    stats["input_examples"] = len(examples)
    kept, render = fit_budget(dedup(prepare(examples, checkouts, stats), stats), budget, stats)
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    entries = []
    group_of = SplitGroups()
    by_symbol = set(split_cfg.get("by_symbol", ()))
    for ex_id, ex, n_tokens in kept:
        co = checkouts[ex.source]
        group = group_of(co.path, ex.path, ex.start_line, co.group in by_symbol)
        split = split_of(ex.source, group, split_cfg["valid"], split_cfg["test"], split_cfg["salt"])
        rows[split].append(ex.record())
        entries.append({"id": ex_id, "split": split, "group": group, "source": ex.source, "commit": ex.commit,
                        "path": ex.path, "start_line": ex.start_line, "end_line": ex.end_line,
                        "kind": ex.kind, "generator_version": ex.generator_version, "tokens": n_tokens})
    counts = {
        "total": len(entries),
        "split": dict(Counter(e["split"] for e in entries)),
        "kind": dict(sorted(Counter(e["kind"] for e in entries).items())),
        "source": dict(sorted(Counter(e["source"] for e in entries).items())),
        "source_split": {s: dict(Counter(e["split"] for e in entries if e["source"] == s))
                         for s in sorted({e["source"] for e in entries})},
        **question_stats([(e, ex) for e, (_, ex, _) in zip(entries, kept)]),
        "tokens": {s: length_stats([e["tokens"] for e in entries if e["split"] == s and e["tokens"]])
                   for s in SPLITS} if budget else None,
    }
    manifest: dict[str, Any] = {
        "phase": phase,
        "dataset_version": DATASET_VERSION,
        "split": split_cfg,
        "inputs": inputs,
        "counts": counts,
        "stats": {"build": dict(sorted(stats.items())), **upstream_stats},
        "examples": entries,
    }
    picks = samples([(e["kind"], ex) for e, (_, ex, _) in zip(entries, kept) if e["split"] == "train"],
                    3, split_cfg["salt"])
    shown = {k: [render(ex.messages, ex.tools) if render else
                 json.dumps(list(ex.messages), indent=1, ensure_ascii=False) for ex in v]
             for k, v in picks.items()}
    write_atomically(out_dir, rows, manifest, shown)
    return {**json.loads((out_dir / "manifest.json").read_text()), "rebuilt": True}


def up_to_date(out_dir: Path, inputs: dict[str, Any], split_cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The existing manifest if `out_dir` holds an intact build of exactly these inputs."""
    path = out_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    want = inputs_hash({"inputs": inputs, "split": split_cfg, "dataset_version": DATASET_VERSION})
    if old.get("inputs_hash") != want:
        return None
    for name, digest in old.get("outputs", {}).items():
        if not (out_dir / name).is_file() or _sha256(out_dir / name) != digest:
            return None
    return old


def inputs_hash(manifest: dict[str, Any]) -> str:
    """What the dataset was built from; equal hashes mean nothing needs rebuilding."""
    blob = json.dumps({"inputs": manifest["inputs"], "split": manifest["split"],
                       "version": manifest["dataset_version"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_atomically(out_dir: Path, rows: dict[str, list[dict[str, Any]]], manifest: dict[str, Any],
                     shown: dict[str, list[str]] | None = None) -> None:
    """Write everything into a temp dir beside `out_dir`, then swap it in."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for split in SPLITS:
            _write_jsonl(tmp / f"{split}.jsonl", rows[split])
        manifest["outputs"] = {f"{s}.jsonl": _sha256(tmp / f"{s}.jsonl") for s in SPLITS}
        manifest["inputs_hash"] = inputs_hash(manifest)
        (tmp / "README.md").write_text(data_card(manifest, shown or {}), encoding="utf-8")
        manifest["outputs"]["README.md"] = _sha256(tmp / "README.md")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkout_inputs(checkouts: dict[str, Checkout]) -> dict[str, Any]:
    return {n: {k: v for k, v in asdict(c).items() if k not in {"path"}} for n, c in sorted(checkouts.items())}


def without_sources(src: Path, dst: Path, sources: Iterable[str]) -> Path:
    """A copy of dataset `src` at `dst` whose train and valid splits leave out `sources`, so
    an evaluation can hold whole sources out of training. Rewritten only when `src` changed."""
    drop = set(sources)
    manifest = json.loads((src / "manifest.json").read_text())
    key = hashlib.sha256(json.dumps([manifest["outputs"], sorted(drop)]).encode()).hexdigest()
    stamp = dst / "holdout.json"
    if (read_json(stamp) or {}).get("key") == key:
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        entries = manifest["examples"]
        for split in SPLITS:
            lines = (src / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
            mine = [e for e in entries if e["split"] == split]
            keep = [ln for ln, e in zip(lines, mine, strict=True) if split == "test" or e["source"] not in drop]
            (tmp / f"{split}.jsonl").write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
        kept = [e for e in entries if e["split"] == "test" or e["source"] not in drop]
        (tmp / "manifest.json").write_text(json.dumps({**manifest, "examples": kept, "held_out": sorted(drop)},
                                                      indent=1, sort_keys=True) + "\n")
        (tmp / "holdout.json").write_text(json.dumps({"key": key, "from": str(src)}))
        replace_dir(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
