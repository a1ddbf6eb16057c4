"""The dataset card (README.md of a phase dataset) and the question statistics it shows."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

from codeadapt.records import Example

SPLITS = ("train", "valid", "test")

_TICKED = re.compile(r"`[^`]+`")
_PATHLIKE = re.compile(r"[\w.-]+(?:/[\w.-]+)+|\b[\w-]+\.(?:py|html?)\b")


def question_form(question: str, source: str) -> str:
    """A question with its names, paths and repository taken out: what is left is its wording."""
    q = _TICKED.sub("X", question.split("\n\n")[0])
    q = _PATHLIKE.sub("P", q).replace(source, "R")
    q = re.sub(r"\b[A-Za-z_]\w*(?:\(\))", "X", q)  # name() in a terse question
    return " ".join(re.findall(r"\w+", q.lower()))


def question_stats(pairs: list[tuple[dict[str, Any], Example]]) -> dict[str, Any]:
    """Distinct question forms per split, and per kind: count, forms, mean calls, mean length."""
    forms: dict[str, set[str]] = {}
    kinds: dict[str, dict[str, Any]] = {}
    for e, ex in pairs:
        q = next((m["content"] for m in ex.messages if m["role"] == "user"), "")
        f = question_form(q, ex.source)
        forms.setdefault(e["split"], set()).add(f)
        k = kinds.setdefault(e["kind"], {"count": 0, "forms": set(), "calls": 0, "chars": 0, "tokens": 0})
        k["count"] += 1
        k["tokens"] += e.get("tokens") or 0
        k["forms"].add(f)
        k["calls"] += sum(len(m.get("tool_calls") or []) for m in ex.messages)
        k["chars"] += sum(len(str(m.get("content") or "")) for m in ex.messages)
    train = forms.get("train", set())
    return {
        "question_forms": {s: len(v) for s, v in sorted(forms.items())},
        "test_forms_not_in_train": len(forms.get("test", set()) - train),
        "kind_detail": {k: {"count": v["count"], "forms": len(v["forms"]),
                            "mean_calls": round(v["calls"] / v["count"], 2),
                            "mean_chars": round(v["chars"] / v["count"]),
                            "mean_tokens": round(v["tokens"] / v["count"]) or None}
                        for k, v in sorted(kinds.items())},
    }



def _table(header: tuple[str, ...], rows: Iterable[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _no_test_line(c: dict[str, Any]) -> str:
    missing = [s for s, v in c["source_split"].items() if not v.get("test") and sum(v.values()) >= 20]
    return f"\n- **No test examples** from: {', '.join(missing)} (declare their group in `split.by_symbol`)." if missing else ""


def _samples_md(shown: dict[str, list[str]]) -> str:
    if not shown:
        return "No training examples."
    out = []
    for kind, texts in shown.items():
        for i, text in enumerate(texts, 1):
            fence = "````" if "```" in text else "```"
            out.append(f"<details><summary>{kind} #{i}</summary>\n\n{fence}text\n{text.rstrip()}\n{fence}\n\n</details>")
    return "\n".join(out)


def _tokens_line(c: dict[str, Any], m: dict[str, Any]) -> str:
    budget = m["inputs"].get("token_budget")
    if not budget:
        return "Token budget: not applied (the base's tokenizer is made from this data)."
    per = "; ".join(f"{s} p50 {v['p50']} / p90 {v['p90']} / max {v['max']}"
                    for s, v in (c.get("tokens") or {}).items() if v)
    return (f"Tokens (`{budget['tokenizer']}`'s chat template, tools included): {per}. Budget "
            f"{budget['max_tokens']} (the training `max_seq_length`): longer examples had their last "
            "tool result cut to fit, marked in the result, and were kept only if the answer quotes "
            "nothing that was cut.")


def data_card(m: dict[str, Any], shown: dict[str, list[str]] | None = None) -> str:
    """The dataset's README: what is in it, where it came from, how it was split."""
    c = m["counts"]
    src_rows = []
    for name, info in sorted(m["inputs"].get("sources", {}).items()):
        ss = c["source_split"].get(name, {})
        src_rows.append((name, info.get("origin", ""), f"`{info.get('commit', '')[:12]}`",
                         *(ss.get(s, 0) for s in SPLITS)))
    drops: Counter[str] = Counter()
    for st in m["stats"].values():
        for k, v in st.items():
            if v and any(w in k for w in ("dropped_", "short_", "syntax_errors")):
                drops[k] += v
    return f"""# Dataset card: {m['phase']}

Tool-use chat examples (`messages` + `tools`, OpenAI/HF convention, tool-call arguments as JSON
objects) for fine-tuning a local coding assistant with mlx-lm. Built by codeadapt
(dataset version {m['dataset_version']}).

- Examples: {c['total']} (train {c['split'].get('train', 0)}, valid {c['split'].get('valid', 0)}, test {c['split'].get('test', 0)})
- Every tool result was produced by running codeadapt's `grep`/`read_file` on the source's
  checkout at the pinned commit below, and replayed identically before writing.
- Split: by a hash of (salt `{m['split']['salt']}`, source, group), valid {m['split']['valid']},
  test {m['split']['test']}. The group is the file, so all examples about one file share a
  split; sources of the groups {m['split'].get('by_symbol', [])} (small repositories) are split
  by top-level definition instead (a file may then span splits, a definition never does).
  Hand-written examples join the group of the definition they are about. A later phase never
  moves an example. Keep `test` for evaluation.{_no_test_line(c)}
- Dedup: exact, on the conversation with whitespace and case folded (first occurrence kept,
  earlier phases first).
- Secrets: detect-secrets' credential detectors; matches replaced with `<REDACTED-SECRET>`.
- Inputs hash: `{m.get('inputs_hash', '')}`

## Sources

{_table(('source', 'origin', 'commit', *SPLITS), src_rows)}

## Kinds

Distinct question forms (names, paths and the repository taken out): {c.get('question_forms', {})};
{c.get('test_forms_not_in_train', 0)} test forms never appear in train (each kind keeps its last
wordings for test examples).

{_table(('kind', 'examples', 'question forms', 'mean calls', 'mean characters', 'mean tokens'),
        ((k, d['count'], d['forms'], d['mean_calls'], d['mean_chars'], d.get('mean_tokens') or '–')
         for k, d in c.get('kind_detail', {}).items()))}

{_tokens_line(c, m)}

## Dropped or short (by reason)

{_table(('reason', 'count'), sorted(drops.items())) if drops else 'Nothing dropped.'}

## Examples as the model sees them (3 random training examples per kind)

{_samples_md(shown or {})}

## Files

`train.jsonl`, `valid.jsonl`, `test.jsonl`; `manifest.json` has per-example provenance (id,
source, commit, path, line span, kind, generator version, split), input SHAs and output hashes.
"""
