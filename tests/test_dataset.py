import json
from collections import Counter
from pathlib import Path

from codeadapt import chat, tools
from codeadapt.dataset import build_dataset, content_key, dedup, split_of
from codeadapt.records import Checkout, Example
from codeadapt.secrets import REDACTED, redact_text

SPLIT = {"valid": 0.2, "test": 0.2, "salt": "s"}


def checkout(root: Path, name: str = "src") -> Checkout:
    return Checkout(name, "path", "x", "snapshot", "c0ffee", str(root), "g", "python")


def grep_example(root: Path, pattern: str, path: str, source: str = "src", answer: str = "ok") -> Example:
    args = {"pattern": pattern, "glob": "*.py"}
    msgs = (chat.system(source), chat.user(f"find {pattern}"), chat.tool_call("call_1", "grep", args),
            chat.tool_result("call_1", "grep", tools.grep(root, **args)), chat.assistant(answer))
    return Example(msgs, chat.tool_schemas(), source, "c0ffee", path, 1, 1, "grep_class", "1")


def test_split_is_a_pure_function_of_source_and_path():
    assert split_of("a", "x.py", 0.1, 0.1, "s") == split_of("a", "x.py", 0.1, 0.1, "s")
    got = Counter(split_of("a", f"f{i}.py", 0.1, 0.1, "s") for i in range(5000))
    assert 400 < got["test"] < 600 and 400 < got["valid"] < 600
    assert any(split_of("a", f"f{i}.py", 0.1, 0.1, "s") != split_of("a", f"f{i}.py", 0.1, 0.1, "t")
               for i in range(20))


def test_dedup_folds_whitespace_case_and_call_ids(tmp_path: Path):
    (tmp_path / "a.py").write_text("class A: pass\n")
    a = grep_example(tmp_path, "class A", "a.py", answer="Found  it")
    b = grep_example(tmp_path, "class A", "a.py", answer="found it")
    assert content_key(a) == content_key(b)
    stats: Counter[str] = Counter()
    assert [e for _, e in dedup([a, b], stats)] == [a] and stats["dropped_duplicate"] == 1


def test_build_writes_splits_manifest_card_and_drops_bad_replays(tmp_path: Path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for i in range(30):
        (repo / f"m{i}.py").write_text(f"class C{i}:\n    pass\n")
    exs = [grep_example(repo, f"class C{i}\\b", f"m{i}.py") for i in range(30)]
    forged = grep_example(repo, "class C1\\b", "m1.py", answer="forged")
    forged = Example(forged.messages[:3] + (chat.tool_result("call_1", "grep", "m1.py:9:class C1:"),)
                     + forged.messages[4:], *[getattr(forged, f) for f in
                     ("tools", "source", "commit", "path", "start_line", "end_line", "kind", "generator_version")])
    out = tmp_path / "data" / "p"
    m = build_dataset("p", exs + [exs[0], forged], {"src": checkout(repo)}, out, SPLIT, {"sources": {}}, {})
    assert m["stats"]["build"]["dropped_duplicate"] == 1
    assert m["stats"]["build"]["dropped_replay_mismatch"] == 1
    assert m["counts"]["total"] == 30
    lines = {s: (out / f"{s}.jsonl").read_text().splitlines() for s in ("train", "valid", "test")}
    assert sum(map(len, lines.values())) == 30 and all(lines.values())
    for rows in lines.values():
        for r in rows:
            assert set(json.loads(r)) == {"messages", "tools"}
    by_path = {}
    for e in m["examples"]:
        assert by_path.setdefault((e["source"], e["path"]), e["split"]) == e["split"]
        assert e["split"] == split_of(e["source"], e["path"], 0.2, 0.2, "s")
    assert "# Dataset card: p" in (out / "README.md").read_text()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".") and p.name != ".locks"]


def test_rebuild_replaces_atomically_and_keeps_old_on_failure(tmp_path: Path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.py").write_text("class A:\n    pass\n")
    out = tmp_path / "p"
    ex = grep_example(repo, "class A", "a.py")
    build_dataset("p", [ex], {"src": checkout(repo)}, out, SPLIT, {"sources": {}}, {})
    before = (out / "manifest.json").read_text()
    import codeadapt.dataset as ds

    def boom(m):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ds, "data_card", boom)
    try:
        build_dataset("p", [], {"src": checkout(repo)}, out, SPLIT, {"sources": {}}, {})
    except RuntimeError:
        pass
    assert (out / "manifest.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != ".locks"] == []


def test_secrets_are_redacted_and_still_replay(tmp_path: Path):
    repo = tmp_path / "repo"
    repo.mkdir()
    key = "AKIA" + "IOSFODNN7EXAMPLE"
    (repo / "conf.py").write_text(f'AWS_KEY = "{key}"\n')
    ex = grep_example(repo, "AWS_KEY", "conf.py", answer=f"the key is {key}")
    out = tmp_path / "p"
    m = build_dataset("p", [ex], {"src": checkout(repo)}, out, SPLIT, {"sources": {}}, {})
    text = "".join((out / f"{s}.jsonl").read_text() for s in ("train", "valid", "test"))
    assert key not in text and REDACTED in text
    assert m["counts"]["total"] == 1 and m["stats"]["build"]["secrets_redacted"] == 2


def test_redact_private_key_block_and_tokens():
    text = "a\n-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nabc\n-----END RSA PRIVATE KEY-----\nb"
    out, n = redact_text(text)
    assert out == f"a\n{REDACTED}\nb" and n >= 1
    token = "ghp_" + "a" * 36
    assert redact_text(f"t = '{token}'")[0] == f"t = '{REDACTED}'"
    assert redact_text("def password(self): return self._pw")[1] == 0


def test_unchanged_inputs_are_not_rebuilt_and_damage_is_repaired(tmp_path: Path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.py").write_text("class A:\n    pass\n")
    out = tmp_path / "p"
    ex = grep_example(repo, "class A", "a.py")
    first = build_dataset("p", [ex], {"src": checkout(repo)}, out, SPLIT, {"sources": {"a": {"commit": "1"}}}, {})
    assert first["rebuilt"]
    again = build_dataset("p", [ex], {"src": checkout(repo)}, out, SPLIT, {"sources": {"a": {"commit": "1"}}}, {})
    assert not again["rebuilt"] and again["inputs_hash"] == first["inputs_hash"]
    moved = build_dataset("p", [ex], {"src": checkout(repo)}, out, SPLIT, {"sources": {"a": {"commit": "2"}}}, {})
    assert moved["rebuilt"] and moved["inputs_hash"] != first["inputs_hash"]
    (out / "train.jsonl").write_text("damaged\n")
    assert build_dataset("p", [ex], {"src": checkout(repo)}, out, SPLIT, {"sources": {"a": {"commit": "2"}}}, {})["rebuilt"]


def test_without_sources_drops_held_out_sources_from_training_only(tmp_path: Path):
    from codeadapt.dataset import without_sources

    repos = {}
    for src in ("keep", "held"):
        repos[src] = tmp_path / src
        repos[src].mkdir()
        for i in range(20):
            (repos[src] / f"m{i}.py").write_text(f"class C{i}:\n    pass\n")
    exs = [grep_example(repos[s], f"class C{i}\\b", f"m{i}.py", source=s) for s in repos for i in range(20)]
    cos = {s: checkout(r, s) for s, r in repos.items()}
    full = build_dataset("p", exs, cos, tmp_path / "p", SPLIT, {"sources": {}}, {})
    out = without_sources(tmp_path / "p", tmp_path / "p-holdout", ["held"])
    m = json.loads((out / "manifest.json").read_text())
    assert {e["source"] for e in m["examples"] if e["split"] != "test"} == {"keep"}
    assert [e for e in m["examples"] if e["split"] == "test"] == [e for e in full["examples"] if e["split"] == "test"]
    for split in ("train", "valid"):
        n = len((out / f"{split}.jsonl").read_text().splitlines())
        assert n == sum(e["split"] == split for e in m["examples"]) > 0
        assert '"held' not in (out / f"{split}.jsonl").read_text()


def test_definition_anchor_is_the_top_level_definition_with_its_decorators():
    from codeadapt.dataset import definition_anchor

    lines = ["import x", "", "@dec", "@dec2(1)", "class A:", "    def m(self):", "        return 1",
             "", "async def f():", "    pass", "y = 1"]
    assert [definition_anchor(lines, n) for n in range(1, 12)] == [1, 1, 3, 3, 3, 3, 3, 3, 9, 9, 9]
    assert definition_anchor([], 5) == 1 and definition_anchor(lines, 99) == 9


def test_a_small_source_split_by_symbol_gets_test_examples_and_keeps_definitions_whole(tmp_path: Path):
    # Two files, thirty classes each: by file, a source this small puts everything in at most
    # two splits; split by definition, every split gets its share and a definition stays whole.
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in ("a", "b"):
        (repo / f"{f}.py").write_text("".join(f"class {f.upper()}{i}:\n    x = 1\n\n" for i in range(30)))
    exs = []
    for f in ("a", "b"):
        for i in range(30):
            for pat in (f"class {f.upper()}{i}\\b", f"{f.upper()}{i}:"):
                ex = grep_example(repo, pat, f"{f}.py")
                exs.append(Example(*[getattr(ex, k) for k in ("messages", "tools", "source", "commit", "path")],
                                   3 * i + 1 + (pat.endswith(":") and 1), 3 * i + 2, "grep_class", "1"))
    by_file = build_dataset("p", exs, {"src": checkout(repo)}, tmp_path / "f", SPLIT, {"sources": {}}, {})
    assert len(set(by_file["counts"]["split"])) <= 2
    cfg = {**SPLIT, "by_symbol": ["g"]}
    m = build_dataset("p", exs, {"src": checkout(repo)}, tmp_path / "s", cfg, {"sources": {}}, {})
    assert all(m["counts"]["split"].get(s, 0) >= 5 for s in ("train", "valid", "test"))
    groups: dict[str, str] = {}
    for e in m["examples"]:
        assert e["group"] == f"{e['path']}:{e['start_line'] - (e['start_line'] - 1) % 3}"
        assert groups.setdefault(e["group"], e["split"]) == e["split"]
