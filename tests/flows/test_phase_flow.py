"""End to end: the phase flows on a real Prefect server, real Git, real tree-sitter."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import REPO_ROOT, git, make_repo

from codeadapt.dataset import content_key, replay_mismatches
from codeadapt.records import Example

pytestmark = pytest.mark.slow
PHASES = ("phase5", "phase6", "phase7")


def rows(phase_dir: Path) -> list[tuple[dict, dict]]:
    """(manifest entry, JSONL record) pairs for every example of a phase."""
    m = json.loads((phase_dir / "manifest.json").read_text())
    recs = {s: [json.loads(line) for line in (phase_dir / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "valid", "test")}
    pos = {s: 0 for s in recs}
    out = []
    for e in m["examples"]:
        out.append((e, recs[e["split"]][pos[e["split"]]]))
        pos[e["split"]] += 1
    assert all(pos[s] == len(recs[s]) for s in recs)
    return out


@pytest.fixture(scope="module")
def built(prefect_server, tmp_path_factory) -> Path:
    from flows.phase import phase7

    data = tmp_path_factory.mktemp("data")
    result = phase7(config=str(REPO_ROOT / "pipeline.toml"), models=False,
                    overrides=[f"paths.data='{data}'", f"paths.repos='{data / 'repos'}'"])
    assert set(result) == set(PHASES)
    assert all(not r["failed_sources"] for r in result.values())
    return data


def test_phase7_builds_three_datasets_from_the_ten_projects(built: Path):
    m = {p: json.loads((built / p / "manifest.json").read_text()) for p in PHASES}
    assert set(m["phase5"]["counts"]["source"]) == {"svcs"}
    ten = {"fastapi", "flask", "pytest", "typer", "click", "httpx", "starlette", "pydantic", "attrs", "structlog"}
    assert set(m["phase6"]["counts"]["source"]) == ten | {"svcs"}
    assert set(m["phase7"]["counts"]["source"]) == ten | {"svcs", "html"}
    kinds = set(m["phase6"]["counts"]["kind"])
    assert {"grep_class", "read_function", "explain_symbol", "handwritten_read"} <= kinds
    assert m["phase7"]["counts"]["source"]["html"] >= 30
    assert sum(v for k, v in m["phase6"]["counts"]["kind"].items() if k.startswith("grep")) >= 250
    for p in PHASES:
        assert (built / p / "README.md").read_text().startswith(f"# Dataset card: {p}")
        for e in m[p]["examples"]:
            assert e["commit"] == m[p]["inputs"]["sources"][e["source"]]["commit"]


def test_every_tool_result_replays_identically(built: Path):
    n = 0
    for entry, rec in rows(built / "phase7"):
        ex = Example(tuple(rec["messages"]), tuple(rec["tools"]), entry["source"], entry["commit"],
                     entry["path"], entry["start_line"], entry["end_line"], entry["kind"], "")
        assert replay_mismatches(ex, built / "repos" / entry["source"]) == [], entry
        n += sum(m["role"] == "tool" for m in rec["messages"])
    assert n > 500


def test_splits_are_stable_across_phases_dedup_holds_and_files_do_not_leak(built: Path):
    per = {p: {e["id"]: e["split"] for e, _ in rows(built / p)} for p in PHASES}
    for older, newer in (("phase5", "phase6"), ("phase6", "phase7")):
        assert per[older].items() <= per[newer].items()
    for p in PHASES:
        pairs = rows(built / p)
        keys = [content_key(Example(tuple(r["messages"]), (), "", "", "", 0, 0, "", "")) for _, r in pairs]
        assert len(keys) == len(set(keys))
        group_split: dict[tuple[str, str], str] = {}
        for e, _ in pairs:  # the group: the file, or the definition in svcs (split.by_symbol)
            assert e["group"] == e["path"] or (e["source"] == "svcs" and e["group"].startswith(e["path"] + ":"))
            assert group_split.setdefault((e["source"], e["group"]), e["split"]) == e["split"]


def test_datasets_load_through_mlx_lm_with_a_chat_template(built: Path, tmp_path: Path):
    from types import SimpleNamespace

    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.utils import load_tokenizer

    from codeadapt.base import TinyBaseArgs, make_tiny_base

    corpus = [p.read_text() for p in sorted((built / "repos" / "flask").rglob("*.py"))[:8]]
    base = make_tiny_base(tmp_path / "base", corpus, TinyBaseArgs(vocab_size=512, hidden_size=32,
                          num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
                          num_key_value_heads=1))
    tok = load_tokenizer(base)
    args = SimpleNamespace(data=str(built / "phase7"), train=True, test=True, mask_prompt=True,
                           hf_dataset=False)
    train, valid, test = load_dataset(args, tok)
    assert len(train) > 500 and len(valid) > 0 and len(test) > 0
    tokens, offset = train.process(train[0])
    text = tok.decode(tokens)
    assert "<tool_call>" in text or "<|im_start|>assistant" in text
    assert 0 < offset < len(tokens)


def test_bad_inputs_are_named_while_other_sources_finish(prefect_server, tmp_path: Path):
    from flows.phase import phase5

    good = tmp_path / "up" / "messy"
    make_repo(good, {
        "pkg/__init__.py": '"""A package."""\n',
        "pkg/core.py": 'class Engine:\n    """Runs things for the messy test project."""\n\n    def start(self):\n        return 1\n',
        "pkg/broken.py": "class Broken(:\n    def ok(self):\n        pass\ndef fine():\n    return 2\n",
        "pkg/latin1.py": "name = '\xe9t\xe9'\n".encode("latin-1"),
        "pkg/blob.py": b"\x00\x01\x02binary",
        "pkg/huge.py": "x = 1\n" * (5 * 1024 * 1024 // 6 + 1),
    })
    os.symlink("/etc/passwd", good / "pkg" / "evil.py")
    git(good, "add", "-A")
    git(good, "commit", "-qm", "symlink")
    make_repo(tmp_path / "up" / "nopy", {"README.md": "no python here\n"})
    (tmp_path / "up" / "empty").mkdir()
    git(tmp_path / "up" / "empty", "init", "-q")
    bad_jsonl = tmp_path / "hand.jsonl"
    bad_jsonl.write_text('{"messages": [}\n')
    up = tmp_path / "up"
    cfg = tmp_path / "p.toml"
    cfg.write_text(f"""
[paths]
data = "{tmp_path / 'data'}"
repos = "{tmp_path / 'data' / 'repos'}"
[groups.g]
budget = {{ grep = 4, read = 2, explain = 2 }}
handwritten = ["{bad_jsonl}"]
[phases.phase5]
groups = ["g"]
[sources]
messy = {{ kind = "git", url = "{good}", ref = "main", group = "g" }}
unreachable = {{ kind = "git", url = "{up / 'no-such-repo'}", group = "g" }}
missingref = {{ kind = "git", url = "{good}", ref = "no-such-ref", group = "g" }}
empty = {{ kind = "git", url = "{up / 'empty'}", group = "g" }}
nopy = {{ kind = "git", url = "{up / 'nopy'}", ref = "main", group = "g" }}
""")
    result = phase5(config=str(cfg), models=False)["phase5"]
    failed = result["failed_sources"]
    assert set(failed) == {"unreachable", "missingref", "empty", os.path.relpath(bad_jsonl, tmp_path)}
    assert "cannot reach" in failed["unreachable"] and "no-such-repo" in failed["unreachable"]
    assert "ref 'no-such-ref' not found" in failed["missingref"]
    assert "is empty" in failed["empty"]
    assert f"{bad_jsonl}:1:" in failed[os.path.relpath(bad_jsonl, tmp_path)]
    m = json.loads((tmp_path / "data" / "phase5" / "manifest.json").read_text())
    assert m["counts"]["source"].get("messy", 0) > 0
    assert "nopy" not in m["counts"]["source"] and m["stats"]["nopy"]["extract_files_seen"] == 0
    st = m["stats"]["messy"]
    assert st["extract_syntax_errors"] == 1 and st["extract_dropped_non_utf8"] == 1
    assert st["extract_dropped_binary"] == 1 and st["extract_dropped_oversize"] == 1
    assert st["extract_dropped_symlink"] == 1
    text = "".join((tmp_path / "data" / "phase5" / f"{s}.jsonl").read_text() for s in ("train", "valid", "test"))
    assert "root:x:0:0" not in text and "evil.py" not in text
    assert {e["path"] for e in m["examples"]} <= {"pkg/core.py", "pkg/broken.py", "pkg/__init__.py"}


def test_cli_rejects_a_source_name_that_escapes(tmp_path: Path, capsys):
    from codeadapt.cli import main

    cfg = tmp_path / "p.toml"
    cfg.write_text('[groups.g]\n[phases.phase5]\ngroups=["g"]\n[sources."../x"]\nkind="path"\npath="."\ngroup="g"\n')
    assert main(["run", "phase5", "--config", str(cfg)]) == 2
    assert "invalid source name '../x'" in capsys.readouterr().err


FAKE_SECRETS = {
    "password": "hunter2-correct-horse-battery",
    "SECRET_KEY": "django-insecure-q8w7e6r5t4y3u2i1o0p9",
    "API_KEY": "0123456789abcdef0123456789abcdef",
    "GITHUB": "ghp_" + "Ab1Cd2Ef3Gh4Ij5Kl6Mn7Op8Qr9St0Uv1Wx2",
    "ANTHROPIC": "sk-ant-api03-" + "Zq7" * 14,
    "AWS": "AKIAIOSFODNN7EXAMPLE",
    "REDIS": "redis://:s3cr3t-redis-pass@cache:6379/0",
    "JWT": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
}


def test_fake_credentials_in_a_repository_reach_no_output(prefect_server, tmp_path: Path):
    """Every class holds credentials of common shapes; after a data build none of them is in
    any file under data/ or in Prefect's persisted task results."""
    from flows.phase import phase5

    body = "".join(f'    {k.lower()} = "{v}"\n' for k, v in FAKE_SECRETS.items())
    files = {f"vault/c{i}.py": f'class Store{i}:\n    """Keeps the credentials of service {i} for the demo."""\n\n'
             f"{body}\n    def get{i}(self):\n        return self.password\n" for i in range(6)}
    make_repo(tmp_path / "up" / "vault", files)
    cfg = tmp_path / "p.toml"
    cfg.write_text(f"""
[paths]
data = "{tmp_path / 'data'}"
repos = "{tmp_path / 'data' / 'repos'}"
[groups.g]
budget = {{ grep = 6, read = 6, explain = 4 }}
[phases.phase5]
groups = ["g"]
[sources]
vault = {{ kind = "git", url = "{tmp_path / 'up' / 'vault'}", ref = "main", group = "g" }}
""")
    result = phase5(config=str(cfg), models=False)["phase5"]
    assert not result["failed_sources"]
    m = json.loads((tmp_path / "data" / "phase5" / "manifest.json").read_text())
    assert any(k.startswith("read_") for k in m["counts"]["kind"])  # the class bodies were read
    assert m["stats"]["vault"]["secrets_redacted_at_generation"] > 0
    sinks = [tmp_path / "data" / p for p in ("phase5", "cache")] + [Path(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"])]
    scanned = 0
    for sink in sinks:
        for f in (p for p in sink.rglob("*") if p.is_file()) if sink.is_dir() else []:
            blob = f.read_bytes()
            scanned += 1
            for name, value in FAKE_SECRETS.items():
                secret = value.split("://:")[-1].split("@")[0] if name == "REDIS" else value
                assert secret.encode() not in blob, (name, f)
    assert scanned >= 5


def test_two_phase_runs_at_once_share_outputs_without_collisions(built: Path, tmp_path: Path):
    """Asserts: phase6 and phase7 started together on one data directory (both sync the same
    checkouts and build phase5 and phase6) both finish, and every dataset they leave is
    byte-identical to the one a single run built; no temp or `.old` directory is left."""
    import threading

    from flows.phase import phase6, phase7

    data = tmp_path / "data"
    over = [f"paths.data='{data}'", f"paths.repos='{data / 'repos'}'"]
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def run(flow) -> None:
        try:
            results[flow.name] = flow(config=str(REPO_ROOT / "pipeline.toml"), models=False, overrides=over)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f,)) for f in (phase6, phase7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    assert not errors and set(results) == {"phase6", "phase7"}, errors
    for phase in PHASES:
        for split in ("train", "valid", "test"):
            assert (data / phase / f"{split}.jsonl").read_bytes() == (built / phase / f"{split}.jsonl").read_bytes()
    assert not [p.name for p in data.iterdir() if p.name.startswith(".") and p.name != ".locks"]
