"""Nightly, incremental: nothing changed → every per-source task is a cache hit and nothing
trains; one source moved → only that source is recomputed, only its phases retrain."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO_ROOT, commit_files, make_repo

pytestmark = pytest.mark.slow
PER_SOURCE = ("extract_repo[", "make_examples[", "html_examples[")
MICRO = ("{iters = 4, batch_size = 2, max_seq_length = 1024, steps_per_report = 2, steps_per_eval = 4, "
         "val_batches = 1, save_every = 2, learning_rate = 0.001")


def write_config(tmp: Path) -> Path:
    up = tmp / "up"
    for name, cls in (("alpha", "Engine"), ("beta", "Wheel")):
        make_repo(up / name, {f"{name}/__init__.py": f'"""The {name} package."""\n',
                              f"{name}/core.py": f'class {cls}:\n    """A {cls.lower()} for the nightly test."""\n\n'
                              f'    def run(self):\n        return 1\n\n\ndef make_{name}():\n    """Make a {name}."""\n    return {cls}()\n',
                              f"{name}/util.py": f"from {name}.core import {cls}\n\n\nclass Fast{cls}({cls}):\n    pass\n"})
    cfg = tmp / "pipeline.toml"
    cfg.write_text(f"""
[paths]
data = "{tmp / 'data'}"
repos = "{tmp / 'data' / 'repos'}"
adapters = "{tmp / 'adapters'}"
[groups.domain]
budget = {{ grep = 4, read = 2, explain = 2 }}
[groups.popular]
budget = {{ grep = 6, read = 2, explain = 2 }}
[groups.html]
[groups.base]
budget = {{ grep = 12, read = 4, explain = 4 }}
[phases.phase5]
groups = ["domain"]
[phases.phase6]
extends = "phase5"
groups = ["popular"]
[phases.phase7]
extends = "phase6"
groups = ["html"]
[phases.base]
groups = ["base"]
[sources]
svcs = {{ kind = "installed", dist = "svcs", group = "domain" }}
alpha = {{ kind = "git", url = "{up / 'alpha'}", ref = "main", group = "popular" }}
beta = {{ kind = "git", url = "{up / 'beta'}", ref = "main", group = "popular" }}
html = {{ kind = "path", path = "{REPO_ROOT / 'data' / 'html'}", group = "html", generator = "html" }}
itsdangerous = {{ kind = "installed", dist = "itsdangerous", group = "base" }}
h11 = {{ kind = "installed", dist = "h11", group = "base" }}
[base]
model = "tiny"
tiny = {{ vocab_size = 512, hidden_size = 32, num_hidden_layers = 1, intermediate_size = 64, num_attention_heads = 2, num_key_value_heads = 1 }}
pretrain = {MICRO}, mode = "full" }}
[train]
{MICRO[1:].replace(', ', chr(10))}
[eval]
max_tokens = 8
fixed_set = ""
max_contamination = 1.0  # question templates dominate sets this small; not what this test checks
[agentic]
tasks = 4
max_calls = 2
max_tokens = 8
""")
    return cfg


def task_states(flow_run_id) -> dict[str, str]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state.name for r in runs}


def run_nightly(cfg: Path) -> tuple[dict, dict[str, str]]:
    from flows.nightly import nightly

    state = nightly(config=str(cfg), return_state=True)
    assert state.is_completed(), state
    return state.result(), task_states(state.state_details.flow_run_id)


def per_source(states: dict[str, str]) -> dict[str, str]:
    return {n: s for n, s in states.items() if n.startswith(PER_SOURCE)}


def test_nightly_recomputes_only_what_changed(prefect_server, tmp_path: Path):
    cfg = write_config(tmp_path)
    first, states = run_nightly(cfg)
    assert {n for n in states if n.startswith("fit[")} == {"fit[base-pretrain]", "fit[phase5]", "fit[phase6]", "fit[phase7]"}
    assert (tmp_path / "adapters" / "REPORT.md").is_file()

    _, states = run_nightly(cfg)
    assert per_source(states) and set(per_source(states).values()) == {"Cached"}, per_source(states)
    assert not [n for n in states if n.startswith("fit[")]

    commit_files(tmp_path / "up" / "beta", {"beta/extra.py": 'def spin():\n    """Spin the wheel."""\n    return 2\n'})
    result, states = run_nightly(cfg)
    moved = per_source(states)
    assert moved["extract_repo[beta]"] == "Completed" and moved["make_examples[beta]"] == "Completed"
    assert {s for n, s in moved.items() if "[beta]" not in n} == {"Cached"}
    assert {n for n in states if n.startswith("fit[")} == {"fit[phase6]", "fit[phase7]"}
    assert set(result["changes"]["moved"]) == {"beta"}
    assert not result["changes"]["phases"]["phase5"]["changed"]
