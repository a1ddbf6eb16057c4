"""Minute-scale end to end on a micro model: datasets → tiny base → pre-train → LoRA per phase
(serialised by the `gpu` slot) → eval → report, on a real Prefect server and real mlx-lm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from codeadapt.train import file_sha256

pytestmark = pytest.mark.slow
MICRO_TRAIN = "{{iters = {iters}, batch_size = 2, max_seq_length = 1024, steps_per_report = 2, steps_per_eval = 4, val_batches = 1, save_every = 2, learning_rate = 0.001}}"


def micro_overrides(data: Path) -> list[str]:
    budgets = {"domain": (4, 2, 2), "popular": (20, 10, 10), "base": (12, 6, 6)}
    out = [f"paths.data='{data}'", f"paths.repos='{data / 'repos'}'",
           f"paths.adapters='{data / 'adapters'}'",
           "base.model='tiny'",
           "base.tiny={vocab_size = 512, hidden_size = 32, num_hidden_layers = 1, "
           "intermediate_size = 64, num_attention_heads = 2, num_key_value_heads = 1}",
           f"base.pretrain={MICRO_TRAIN.format(iters=4)[:-1]}, mode = 'full'}}",
           f"train={MICRO_TRAIN.format(iters=4)[:-1]}, continue_chain = true}}",
           *(f"phases.{p}.train_iters=4" for p in ("phase5", "phase6", "phase7")),
           "eval.max_tokens=8", "eval.batch_size=4",
           "eval.held_out_phase=''",  # with the tiny base, phase "base" pre-trains it
           "agentic.tasks=6", "agentic.max_calls=2", "agentic.max_tokens=8",
           # Sets this small share template 8-grams by chance; the check has its own unit tests.
           "eval.max_contamination=1.0"]
    for g, (grep, read, explain) in budgets.items():
        out.append(f"groups.{g}.budget={{grep = {grep}, read = {read}, explain = {explain}}}")
    return out


def task_runs(name_prefix: str) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=name_prefix)))
    return [r for r in runs if r.name.startswith(name_prefix)]


@pytest.fixture(scope="module")
def run(prefect_server, tmp_path_factory) -> tuple[Path, dict]:
    from flows.phase import phase7

    data = tmp_path_factory.mktemp("models")
    result = phase7(config=str(REPO_ROOT / "pipeline.toml"), overrides=micro_overrides(data))
    return data, result


def test_phase7_goes_from_repos_to_a_report(run):
    data, result = run
    report = Path(result["models"]["report"])
    text = report.read_text()
    for row in ("base", "rules", "phase5", "phase6", "phase7"):
        assert f"| {row} |" in text
    assert (report.parent / "accuracy.png").stat().st_size > 1000
    table = result["models"]["table"]
    assert [r["phase"] for r in table] == ["base", "rules", "phase5", "phase6", "phase7"]
    assert len({r["prompts"] for r in table}) == 1  # same prompts for every row
    assert table[0]["adapter_bytes"] is None and all(r["adapter_bytes"] > 0 for r in table[2:])
    # Agentic: every row ran the same tasks with the real tools, and the report has the table.
    assert {r["agentic_tasks"] for r in table} == {6}
    assert "## Agentic tasks" in text and "| rules | 6 |" in text
    # The rules call the real tools (which tasks they solve depends on the sample: unit-tested).
    assert table[1]["agentic_summary"]["all"]["calls_per_task"] > 0


def test_adapters_record_their_dataset_and_load_in_stock_mlx_lm(run):
    data, _ = run
    for phase in ("phase5", "phase6", "phase7"):
        out = data / "adapters" / phase
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["data_manifest_sha256"] == file_sha256(data / phase / "manifest.json")
        assert (out / "adapter_config.json").is_file() and (out / "loss.png").is_file()
        assert not list((data / "adapters").glob(f".{phase}*"))  # no temp or work dirs left
        assert metrics["iters"] == 4


def test_each_phase_continues_the_previous_phases_adapter(run):
    """continue_chain: phase6 starts from phase5's adapter, phase7 from phase6's (the file that
    was promoted), and phase5 from the base."""
    data, result = run
    adapters = data / "adapters"
    chain = {p: json.loads((adapters / p / "metrics.json").read_text())
             for p in ("phase5", "phase6", "phase7")}
    assert chain["phase5"]["init_adapter_sha256"] is None
    for prev, p in (("phase5", "phase6"), ("phase6", "phase7")):
        assert chain[p]["init_adapter_sha256"] == file_sha256(adapters / prev / "adapters.safetensors")
    training = {r["phase"]: r["training"] for r in result["models"]["table"]}
    assert training == {"base": None, "rules": "regexes on the question", "phase5": "4 steps from base",
                        "phase6": "4 steps from phase5", "phase7": "4 steps from phase6"}
    base = json.loads((data / "adapters" / "phase7" / "metrics.json").read_text())["base_dir"]
    proc = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", base,
                           "--adapter-path", str(data / "adapters" / "phase7"), "--prompt", "hi",
                           "--max-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_trainings_submitted_together_ran_one_after_another(run):
    runs = sorted(task_runs("fit[phase"), key=lambda r: r.start_time)
    assert len(runs) == 3 and all(r.state.is_completed() for r in runs)
    for earlier, later in zip(runs, runs[1:]):
        assert later.start_time >= earlier.end_time, (earlier.name, later.name)


def test_artifacts_show_progress_loss_and_phase_table(run):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(exists_=True)))}
    assert {"phase-table", "phase-report", "train-phase7-progress", "train-phase7-loss",
            "dataset-counts-phase7"} <= keys


def test_unchanged_inputs_do_not_retrain(run):
    from flows.phase import phase7

    data, _ = run
    before = len(task_runs("fit["))
    phase7(config=str(REPO_ROOT / "pipeline.toml"), overrides=micro_overrides(data))
    assert len(task_runs("fit[")) == before
