"""Eval prompts from dataset splits and the fixed set; n-gram decontamination."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from codeadapt import chat, prompts, sources
from codeadapt.config import load_settings
from codeadapt.handwritten import refill_tool_results

ROOT = Path(__file__).resolve().parents[1]
FIXED = ROOT / "data" / "eval" / "fixed.jsonl"


def _call_example(repo: str, question: str, pattern: str) -> dict[str, Any]:
    return {"messages": [chat.system(repo), chat.user(question),
                         chat.tool_call("call_1", "grep", {"pattern": pattern, "glob": "*.py"}),
                         chat.tool_result("call_1", "grep", "a.py:1:class A:"),
                         chat.assistant("`A` is in a.py, line 1.")],
            "tools": list(chat.tool_schemas())}


def _direct_example(repo: str, question: str) -> dict[str, Any]:
    return {"messages": [chat.system(repo), chat.user(question), chat.assistant("It does X.")],
            "tools": list(chat.tool_schemas())}


def write_dataset(out: Path, rows: list[tuple[str, str, str, dict[str, Any]]]) -> Path:
    """A phase dir like dataset.build_dataset writes: rows are (id, split, source, record)."""
    out.mkdir(parents=True)
    entries = []
    for split in ("train", "valid", "test"):
        with (out / f"{split}.jsonl").open("w") as fh:
            for _, s, _, record in rows:
                if s == split:
                    fh.write(json.dumps(record) + "\n")
    for ex_id, s, source, _ in rows:
        entries.append({"id": ex_id, "split": s, "source": source, "commit": "c0ffee", "path": "a.py",
                        "start_line": 1, "end_line": 1, "kind": "grep_class", "generator_version": "1"})
    # Manifest entries interleave splits; each split file follows their order.
    (out / "manifest.json").write_text(json.dumps({"examples": entries}))
    return out


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data" / "phase6", [
        ("e1", "train", "flask", _call_example("flask", "Where is class `A` in flask?", "^class A")),
        ("e2", "test", "flask", _call_example("flask", "Where is class `B` in flask?", "^class B")),
        ("e3", "valid", "click", _direct_example("click", "What is click?")),
        ("e4", "test", "click", _direct_example("click", "What does click.echo do?")),
        ("e5", "train", "click", _direct_example("click", "What is click for?")),
    ])


def test_one_prompt_per_assistant_turn_with_provenance(dataset: Path) -> None:
    ps = prompts.prompts_from_split(dataset, "test")
    assert [p.id for p in ps] == ["e2#2", "e2#4", "e4#2"]
    call, answer, direct = ps
    assert call.expects_call and call.expected_name == "grep"
    assert call.expected_arguments == {"pattern": "^class B", "glob": "*.py"}
    assert [m["role"] for m in call.messages] == ["system", "user"]
    assert [m["role"] for m in answer.messages] == ["system", "user", "assistant", "tool"]
    assert not answer.expects_call and answer.expected_text == "`A` is in a.py, line 1."
    assert (direct.source, direct.kind, direct.example_id) == ("click", "grep_class", "e4")
    assert call.root == str(dataset.parent / "repos" / "flask")
    assert not any(p.held_out for p in ps)


def test_hold_out_sources_add_their_examples_from_every_split(dataset: Path, tmp_path: Path) -> None:
    ps = prompts.prompts_from_split(dataset, "test", hold_out_sources=["click"], repos_dir=tmp_path)
    assert [p.id for p in ps] == ["e2#2", "e2#4", "e4#2", "e5#2", "e3#2"]
    assert [p.held_out for p in ps] == [False, False, True, True, True]
    assert ps[0].root == str(tmp_path / "flask")
    with pytest.raises(ValueError, match="nope"):
        prompts.prompts_from_split(dataset, "test", hold_out_sources=["nope"])


def test_split_file_and_manifest_must_agree(dataset: Path) -> None:
    with (dataset / "test.jsonl").open("a") as fh:
        fh.write(json.dumps(_direct_example("x", "extra?")) + "\n")
    with pytest.raises(ValueError, match="3 lines but the manifest lists 2"):
        prompts.prompts_from_split(dataset, "test")
    with pytest.raises(FileNotFoundError, match="build the dataset"):
        prompts.prompts_from_split(dataset.parent / "phase9", "test")


def test_fixed_set_loads_and_covers_every_source() -> None:
    ps = prompts.load_fixed_set(FIXED, Path("/nowhere"))
    assert 20 <= len(ps) <= 32
    settings = load_settings(ROOT / "pipeline.toml")
    assert {p.source for p in ps} == set(settings.phase_sources("phase7"))
    assert sum(p.expects_call for p in ps) >= 10 and sum(not p.expects_call for p in ps) >= 10
    assert len({p.id for p in ps}) == len(ps)


def test_fixed_set_tool_results_replay_on_the_offline_snapshots(tmp_path: Path) -> None:
    # The yardstick's results must be what the tools give on data/repos/<source> (offline).
    settings = load_settings(ROOT / "pipeline.toml")
    for name, spec in settings.phase_sources("phase7").items():
        sources.sync_source(name, spec, tmp_path, ROOT)
    for line in FIXED.read_text().splitlines():
        record = json.loads(line)
        assert refill_tool_results(record, tmp_path / record["meta"]["source"]) == record, (
            record["meta"]["id"])


def test_ngram_overlap_counts_shared_8grams_and_exact_short_duplicates() -> None:
    train = ["I want to read the implementation of class `Foo` in flask.", "What is click?"]
    test = ["I want to read the implementation of class `Bar` in pytest.",  # template 8-gram
            "What is click?",  # shorter than n: counts only as an exact duplicate
            "What is click for?",
            "Where is Baz?"]
    r = prompts.ngram_overlap(test, train, n=8)
    assert (r["contaminated"], r["test_texts"]) == (2, 4)
    assert r["fraction"] == 0.5 and r["max_overlap"] == 1.0
    assert r["samples"] == test[:2]
    # Template text found in more train turns than allowed is ignored.
    r = prompts.ngram_overlap(test[:1], train * 1 + [train[0].replace("Foo", "Qux")], 8,
                              max_train_count=1)
    assert r["contaminated"] == 0


def test_check_contamination_raises_loudly_above_threshold() -> None:
    train = ["a b c d e f g h i", "x"]
    test = ["a b c d e f g h z", "nothing in common here at all today ok"]
    assert prompts.check_contamination(test, train, threshold=0.5)["fraction"] == 0.5
    with pytest.raises(ValueError, match=r"CONTAMINATION: 1/2 test user turns \(50\.0%\)"):
        prompts.check_contamination(test, train, threshold=0.4)


def test_user_texts_are_distinct_in_order() -> None:
    ex = _call_example("r", "q1?", "x")["messages"]
    assert prompts.user_texts([ex, ex[:2], [chat.user("q2?")]]) == ["q1?", "q2?"]


def _turns(conversations: dict[str, int]) -> list[prompts.Prompt]:
    """`n` prompts (turns 2, 4, ...) for each example id, interleaved across conversations."""
    out = []
    for t in range(max(conversations.values())):
        for ex, n in conversations.items():
            if t < n:
                out.append(prompts.Prompt(
                    id=f"{ex}#{2 + 2 * t}", example_id=ex, turn=2 + 2 * t,
                    messages=(chat.system("r"), chat.user(f"{ex} {t}?")), tools=(),
                    expected_name=None, expected_arguments=None, expected_text="x", source="s",
                    kind="k", root="/r"))
    return out


def test_sample_conversations_keeps_whole_conversations_stably() -> None:
    """Asserts: limit None (or >= the number of conversations) returns the input unchanged;
    a limit keeps exactly `limit` example ids with every one of their turns and no turn of a
    dropped id, in input order; the kept ids do not depend on the input order."""
    convs = {f"ex{i:02d}": 1 + i % 3 for i in range(12)}
    ps = _turns(convs)
    assert prompts.sample_conversations(ps, None) == ps
    assert prompts.sample_conversations(ps, 12) == ps and prompts.sample_conversations(ps, 50) == ps
    seen = set()
    for limit in (1, 4, 11):
        kept = prompts.sample_conversations(ps, limit)
        ids = {p.example_id for p in kept}
        assert len(ids) == limit
        assert kept == [p for p in ps if p.example_id in ids]  # every turn, input order
        assert all(sum(p.example_id == ex for p in kept) == convs[ex] for ex in ids)
        for order in (ps[::-1], sorted(ps, key=lambda p: (p.turn, p.id[::-1]))):
            again = prompts.sample_conversations(order, limit)
            assert {p.example_id for p in again} == ids
            assert sorted(p.id for p in again) == sorted(p.id for p in kept)
        seen.add(frozenset(ids))
    assert len(seen) == 3
    # Not simply the first ids of the input: the sample is by hash.
    assert {p.example_id for p in prompts.sample_conversations(ps, 4)} != set(list(convs)[:4])


def test_collect_prompts_samples_the_split_but_keeps_the_fixed_set(dataset: Path, tmp_path: Path
                                                                    ) -> None:
    """Asserts: max_conversations limits the held-out split's conversations (all their turns)
    and leaves the fixed set whole."""
    fixed = prompts.load_fixed_set(FIXED, tmp_path)
    full = prompts.collect_prompts(dataset, tmp_path, "test", [], FIXED)
    assert [p.id for p in full[:3]] == ["e2#2", "e2#4", "e4#2"] and full[3:] == fixed
    one = prompts.collect_prompts(dataset, tmp_path, "test", [], FIXED, max_conversations=1)
    split = one[: len(one) - len(fixed)]
    assert one[len(split):] == fixed
    assert len({p.example_id for p in split}) == 1
    assert split == [p for p in full[:3] if p.example_id == split[0].example_id]


def test_collect_prompts_adds_conversations_from_repositories_never_trained_on(dataset: Path, tmp_path: Path
                                                                              ) -> None:
    """Every split of the held-out phase counts (no phase trains on it), marked held_out,
    sampled to held_out_conversations; a conversation that repeats train is still excluded."""
    held = write_dataset(tmp_path / "data" / "base", [
        ("h1", "train", "httpx", _call_example("httpx", "Where is class `H` in httpx?", "^class H")),
        ("h2", "test", "httpx", _direct_example("httpx", "What is httpx?")),
        ("h3", "valid", "rich", _call_example("rich", "Where is class `R` in rich?", "^class R")),
        ("h4", "train", "rich", _call_example("flask", "Where is class `A` in flask?", "^class A")),
    ])
    got = prompts.collect_prompts(dataset, tmp_path, "test", [], None, None, held, 10)
    assert [p.id for p in got if not p.held_out] == ["e2#2", "e2#4", "e4#2"]
    assert sorted({p.example_id for p in got if p.held_out}) == ["h1", "h2", "h3"]  # h4 = e1: a leak
    assert all(p.root.startswith(str(tmp_path)) for p in got)
    two = prompts.collect_prompts(dataset, tmp_path, "test", [], None, None, held, 2)
    assert len({p.example_id for p in two if p.held_out}) == 2
    assert prompts.collect_prompts(dataset, tmp_path, "test", [], None, None, held, 0) == got[:3]


def test_checkout_errors_name_a_source_at_another_commit_modified_or_missing(tmp_path: Path) -> None:
    from conftest import commit_files, make_repo

    repos = tmp_path / "repos"
    first = make_repo(repos / "flask", {"a.py": "class A:\n    pass\n"})
    data = tmp_path / "data" / "p"
    write_dataset(data, [("e1", "test", "flask", _call_example("flask", "Where is `A`?", "^class A"))])
    manifest = json.loads((data / "manifest.json").read_text())
    for e in manifest["examples"]:
        e["commit"] = first
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert prompts.checkout_errors(data, repos) == []
    (repos / "flask" / "a.py").write_text("class A:\n    x = 1\n")
    assert "has local changes" in prompts.checkout_errors(data, repos)[0]
    second = commit_files(repos / "flask", {"a.py": "class A:\n    x = 1\n"})
    [err] = prompts.checkout_errors(data, repos)
    assert err.startswith("flask:") and second in err and first in err
    assert "no commit" in prompts.checkout_errors(data, tmp_path / "elsewhere")[0]


def test_fixed_set_source_cannot_point_the_tools_outside_repos(tmp_path: Path) -> None:
    record = {**_call_example("flask", "Where is `A`?", "^class A"),
              "meta": {"id": "f1", "source": "..", "kind": "grep_class"}}
    path = tmp_path / "fixed.jsonl"
    for bad in ("..", "/", "a/../../etc"):
        record["meta"]["source"] = bad
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(ValueError, match=rf"{path}:1: invalid source name"):
            prompts.load_fixed_set(path, tmp_path / "repos")
