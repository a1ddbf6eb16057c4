"""Evaluation prompts: one per assistant turn of a dataset split or of the fixed set, with
provenance and the checkout its tools run in; and the n-gram check that test questions did
not leak into training."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codeadapt import chat
from codeadapt.config import check_name
from codeadapt.tools import NO_MATCHES


@dataclass(frozen=True, slots=True)
class Prompt:
    """One assistant turn to predict, the conversation before it, and where it came from."""

    id: str  # "<example id>#<message index>"
    example_id: str
    turn: int  # index of the predicted assistant message
    messages: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...]
    expected_name: str | None  # None: a direct answer is expected
    expected_arguments: dict[str, Any] | None
    expected_text: str
    source: str
    kind: str
    root: str  # checkout the tools run in
    held_out: bool = False  # its source was held out of training
    cluster: str = ""  # the source file it is about: turns of one file are not independent
    # A grep the conversation makes while it expects "No matches." (a search it then refines):
    # the arguments of its next grep that finds something. A call finding those lines at once
    # is a better step than repeating the failing one (codeadapt.scoring.finds_target).
    refined_to: dict[str, Any] | None = None

    @property
    def group(self) -> str:
        return self.cluster or self.example_id

    @property
    def expects_call(self) -> bool:
        return self.expected_name is not None


def prompts_of(record: dict[str, Any], example_id: str, source: str, kind: str, root: str,
               held_out: bool = False, cluster: str = "") -> list[Prompt]:
    """One Prompt per assistant message of a `{"messages", "tools"}` record."""
    messages, tool_list = record["messages"], record.get("tools") or []
    chat.validate_messages(messages, tool_list)
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        calls = m.get("tool_calls") or []
        if len(calls) > 1:
            raise ValueError(f"{example_id}: message {i} makes {len(calls)} calls; expected one")
        fn = calls[0]["function"] if calls else None
        out.append(Prompt(
            id=f"{example_id}#{i}", example_id=example_id, turn=i, messages=tuple(messages[:i]),
            tools=tuple(tool_list), expected_name=fn["name"] if fn else None,
            expected_arguments=fn["arguments"] if fn else None, expected_text=m.get("content") or "",
            source=source, kind=kind, root=root, held_out=held_out, cluster=cluster,
            refined_to=refined_grep(messages, i)))
    return out


def _grep_of(message: dict[str, Any]) -> dict[str, Any] | None:
    calls = (message.get("tool_calls") or []) if message.get("role") == "assistant" else []
    fn = calls[0]["function"] if len(calls) == 1 else None
    return fn["arguments"] if fn is not None and fn["name"] == "grep" else None


def refined_grep(messages: Sequence[dict[str, Any]], i: int) -> dict[str, Any] | None:
    """When message `i` is a grep whose result (message i + 1) is "No matches.", the arguments
    of the conversation's next grep that finds something; else None."""
    if _grep_of(messages[i]) is None or i + 1 >= len(messages):
        return None
    if (messages[i + 1].get("content") or "").strip() != NO_MATCHES:
        return None
    for j in range(i + 2, len(messages) - 1):
        args = _grep_of(messages[j])
        if args is not None and (messages[j + 1].get("content") or "").strip() != NO_MATCHES:
            return args
    return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON: {exc}") from None
    return rows


def split_records(data_dir: Path, split: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(record, manifest entry) pairs of one split file, checked against the manifest."""
    data_dir = Path(data_dir)
    for name in (f"{split}.jsonl", "manifest.json"):
        if not (data_dir / name).is_file():
            raise FileNotFoundError(f"{data_dir / name} does not exist; build the dataset first")
    entries = [e for e in json.loads((data_dir / "manifest.json").read_text())["examples"]
               if e["split"] == split]
    rows = _read_jsonl(data_dir / f"{split}.jsonl")
    if len(rows) != len(entries):
        raise ValueError(f"{data_dir}: {split}.jsonl has {len(rows)} lines but the manifest "
                         f"lists {len(entries)} {split} examples")
    return list(zip(rows, entries))


def prompts_from_split(data_dir: Path, split: str = "test", hold_out_sources: Iterable[str] = (),
                       repos_dir: Path | None = None) -> list[Prompt]:
    """Prompts for every assistant turn of `split`; plus, for `hold_out_sources` (kept out of
    training), their examples from every split, marked `held_out`."""
    data_dir = Path(data_dir)
    repos = Path(repos_dir) if repos_dir is not None else data_dir.parent / "repos"
    held = set(hold_out_sources)
    manifest = json.loads((data_dir / "manifest.json").read_text()) if held else {}
    unknown = held - {e["source"] for e in manifest.get("examples", [])}
    if unknown:
        raise ValueError(f"hold_out_sources {sorted(unknown)} have no examples in {data_dir}")
    splits = [split] + sorted({e["split"] for e in manifest.get("examples", [])} - {split})
    out: list[Prompt] = []
    for s in splits:
        for record, e in split_records(data_dir, s):
            if s == split or e["source"] in held:
                out += prompts_of(record, e["id"], e["source"], e["kind"],
                                  str(repos / e["source"]), e["source"] in held,
                                  f"{e['source']}/{e.get('path', e['id'])}")
    return out


def load_fixed_set(path: Path, repos_dir: Path) -> list[Prompt]:
    """Prompts of a fixed set: `{"messages", "tools", "meta": {"id", "source", "kind", ...}}`."""
    path = Path(path)
    out: list[Prompt] = []
    for lineno, record in enumerate(_read_jsonl(path), 1):
        meta = record.get("meta") or {}
        if not all(isinstance(meta.get(k), str) and meta[k] for k in ("id", "source", "kind")):
            raise ValueError(f"{path}:{lineno}: meta needs string id, source and kind, got {meta!r}")
        try:
            check_name(meta["source"])  # the tools' root is repos_dir/source: "/" or ".." escape it
            out += prompts_of(record, meta["id"], meta["source"], meta["kind"],
                              str(Path(repos_dir) / meta["source"]),
                              cluster=f"{meta['source']}/{meta.get('path', meta['id'])}")
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: {exc}") from None
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


_WORD = re.compile(r"\w+")


def _grams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    if len(words) < n:  # a short question can still be an exact duplicate
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def ngram_overlap(test_texts: Sequence[str], train_texts: Iterable[str], n: int = 8,
                  max_train_count: int | None = None) -> dict[str, Any]:
    """How many test texts share a word n-gram with any train text, and the largest share.

    `max_train_count` drops n-grams found in more train texts than that: question templates.
    """
    counts: Counter[tuple[str, ...]] = Counter()
    for t in train_texts:
        counts.update(_grams(t, n))
    seen = {g for g, c in counts.items() if max_train_count is None or c <= max_train_count}
    hits, worst, samples = 0, 0.0, []
    for t in test_texts:
        g = _grams(t, n)
        shared = len(g & seen)
        if shared:
            hits += 1
            if len(samples) < 5:
                samples.append(t)
        worst = max(worst, shared / len(g) if g else 0.0)
    total = len(test_texts)
    return {"n": n, "test_texts": total, "contaminated": hits,
            "fraction": hits / total if total else 0.0, "max_overlap": worst, "samples": samples}


def check_contamination(test_texts: Sequence[str], train_texts: Iterable[str], threshold: float,
                        n: int = 8, max_train_count: int | None = None) -> dict[str, Any]:
    """ngram_overlap, raising ValueError when the contaminated fraction exceeds `threshold`."""
    report = ngram_overlap(test_texts, train_texts, n, max_train_count)
    if report["fraction"] > threshold:
        raise ValueError(
            f"CONTAMINATION: {report['contaminated']}/{report['test_texts']} test user turns "
            f"({report['fraction']:.1%}) share a word {n}-gram with train, above the threshold "
            f"{threshold:.1%}; e.g. {report['samples'][:3]}")
    return report


def user_texts(messages_lists: Iterable[Sequence[dict[str, Any]]]) -> list[str]:
    """Distinct user turns of some conversations, in first-seen order."""
    return list(dict.fromkeys(m["content"] for msgs in messages_lists for m in msgs
                              if m.get("role") == "user"))


def sample_conversations(prompts: Sequence[Prompt], limit: int | None) -> list[Prompt]:
    """All turns of at most `limit` conversations, chosen by a hash of the example id: a stable
    sample (the same ids at every run and for every model) that keeps conversations whole."""
    ids = list(dict.fromkeys(p.example_id for p in prompts))
    if limit is None or len(ids) <= limit:
        return list(prompts)
    keep = set(sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:limit])
    return [p for p in prompts if p.example_id in keep]


def checkout_errors(data_dir: Path, repos_dir: Path) -> list[str]:
    """Why the checkouts under `repos_dir` cannot replay `data_dir`'s tools: a source whose
    checkout is missing, at another commit than the manifest's, or modified. Empty when all
    are as the dataset was built."""
    from codeadapt.sources import checkout_state

    want: dict[str, str] = {}
    for e in json.loads((Path(data_dir) / "manifest.json").read_text())["examples"]:
        want.setdefault(e["source"], e["commit"])
    errors = []
    for source, commit in sorted(want.items()):
        head, clean = checkout_state(Path(repos_dir) / source)
        if head != commit:
            errors.append(f"{source}: checkout {Path(repos_dir) / source} is at "
                          f"{head or 'no commit'}, the dataset at {commit}")
        elif not clean:
            errors.append(f"{source}: checkout {Path(repos_dir) / source} has local changes")
    return errors


def held_out_repo_prompts(held_out_dir: Path, repos_dir: Path) -> list[Prompt]:
    """Every turn of every split of a dataset whose sources no phase trains on, marked
    `held_out` (repositories the adapters never saw)."""
    manifest = json.loads((Path(held_out_dir) / "manifest.json").read_text())
    sources = {e["source"] for e in manifest["examples"]}
    return prompts_from_split(held_out_dir, "test", sources, repos_dir)


def collect_prompts(data_dir: Path, repos_dir: Path, split: str, hold_out_sources: Iterable[str],
                    fixed_set: Path | None, max_conversations: int | None = None,
                    held_out_dir: Path | None = None, held_out_conversations: int = 0) -> list[Prompt]:
    """Every prompt an evaluation scores: the held-out split (all turns of at most
    `max_conversations` of its conversations), all turns of `held_out_conversations`
    conversations about repositories never trained on (`held_out_dir`), and the fixed set, if
    any; without the conversations whose tool content leaks from the train split (`leaks_of`)."""
    held = prompts_from_split(data_dir, split, hold_out_sources, repos_dir)
    fixed = load_fixed_set(fixed_set, repos_dir) if fixed_set is not None else []
    repos = (held_out_repo_prompts(held_out_dir, repos_dir)
             if held_out_dir is not None and held_out_conversations else [])
    leaked = leaks_of(data_dir, held + fixed + repos)
    return (sample_conversations([p for p in held if p.example_id not in leaked], max_conversations)
            + sample_conversations([p for p in repos if p.example_id not in leaked], held_out_conversations)
            + [p for p in fixed if p.example_id not in leaked])


def eval_prompts(spec: Any, data_dir: Path, repos_dir: Path, fixed_set: Path | None,
                 held_out_dir: Path | None = None) -> list[Prompt]:
    """`collect_prompts` as an `EvalSpec` asks for: what every row of the turn table scores."""
    return collect_prompts(data_dir, repos_dir, spec.split, spec.hold_out_sources, fixed_set,
                           spec.max_conversations, held_out_dir, spec.held_out_conversations)


def leaks_of(data_dir: Path, prompts: Sequence[Prompt]) -> dict[str, str]:
    """{example id: "exact" | "near"} of held-out conversations whose tool calls and results
    repeat a conversation of `data_dir`'s train split (codeadapt.leaks)."""
    from codeadapt.leaks import content_leaks

    full: dict[str, tuple[dict[str, Any], ...]] = {}
    for p in prompts:  # the longest prompt of a conversation holds the most of it
        if len(p.messages) > len(full.get(p.example_id, ())):
            full[p.example_id] = p.messages
    train = Path(data_dir) / "train.jsonl"
    if not train.is_file():
        return {}
    return content_leaks(full, (r["messages"] for r in _read_jsonl(train)))
