"""Training: the assistant-turn mask, LoRA and full runs, resume after SIGKILL, the BLAS worker.

A micro base (2 layers, width 32) and a dozen short records keep every run to seconds.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import MICRO_BASE

from codeadapt import base, chat, worker
from codeadapt.mixing import first_step, mix_shares, mix_weights
from codeadapt.models import fastpath
from codeadapt.train import (
    DROPPED_TOO_LONG,
    PAD_TO,
    TrainSpec,
    _open_work,
    encode_record,
    epoch_batches,
    file_sha256,
    is_current,
    load_split,
    loss_inputs,
    masked_loss,
    plot_losses,
    to_batch,
    train_adapter,
    train_in_worker,
)

MICRO = base.TinyBaseArgs(**MICRO_BASE)
# Dropout > 0 so that resuming must restore the RNG key, not just weights and optimizer.
SPEC = TrainSpec(iters=40, learning_rate=1e-3, batch_size=2, max_seq_length=512,
                 lora_dropout=0.1, steps_per_report=5, steps_per_eval=20, save_every=10)


@pytest.fixture(scope="module", autouse=True)
def _unpatched_mlx_lm_afterwards() -> Any:
    """In-process train_adapter installs codeadapt.models.fastpath (TrainSpec.fast_kernels) and
    leaves it installed; undo that so later test modules see stock mlx-lm."""
    yield
    fastpath.uninstall()


def _record(i: int, long: bool = False) -> dict[str, Any]:
    hits = "\n".join(f"src/app.py:{n}:def handler_{n}(request):" for n in range(40 if long else 1))
    return {"messages": [
        chat.system("flask"),
        chat.user(f"Where is handler_{i} defined?"),
        chat.tool_call(f"call_{i}", "grep", {"pattern": f"def handler_{i}\\b", "glob": "*.py"}),
        chat.tool_result(f"call_{i}", "grep", hits),
        chat.assistant(f"`handler_{i}` is defined in src/app.py at line {i}."),
    ]}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def micro_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pkg = Path(importlib.util.find_spec("flask").origin).parent
    corpus = [p.read_text("utf-8") for p in sorted(pkg.glob("*.py"))[:6]]
    return base.make_tiny_base(tmp_path_factory.mktemp("base") / "micro", corpus, MICRO)


@pytest.fixture(scope="module")
def tokenizer(micro_base: Path) -> Any:
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(micro_base)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("data") / "phase"
    d.mkdir()
    _write_jsonl(d / "train.jsonl", [_record(i) for i in range(9)] + [_record(99, long=True)])
    _write_jsonl(d / "valid.jsonl", [_record(i) for i in range(20, 23)])
    (d / "manifest.json").write_text('{"phase": "test"}\n')
    return d


@pytest.fixture(scope="module")
def lora_run(micro_base: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, dict[str, Any], list[dict[str, Any]]]:
    """One uninterrupted in-process LoRA run, shared by several tests."""
    events: list[dict[str, Any]] = []
    out = tmp_path_factory.mktemp("adapters") / "lora"
    metrics = train_adapter(micro_base, data_dir, out, SPEC, progress=events.append)
    return out, metrics, events


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def test_mask_covers_exactly_the_assistant_turns(tokenizer: Any) -> None:
    record = {"messages": [
        chat.system("flask"),
        chat.user("Where is the Flask class defined?"),
        chat.tool_call("call_1", "grep", {"pattern": "^class Flask\\b", "glob": "*.py"}),
        chat.tool_result("call_1", "grep", "src/flask/app.py:109:class Flask(App):"),
        chat.tool_call("call_2", "read_file", {"path": "src/flask/app.py", "start_line": 109,
                                               "end_line": 110}),
        chat.tool_result("call_2", "read_file", "109\tclass Flask(App):\n110\t    pass"),
        chat.assistant("`Flask` is defined in src/flask/app.py at line 109."),
    ], "tools": list(chat.tool_schemas())}
    enc = encode_record(tokenizer, record, "rec")
    trained = [tokenizer.decode(enc.tokens[a:b].tolist()) for a, b in _spans(enc.mask)]
    assert trained == [
        '<tool_call>\n{"name": "grep", "arguments": {"pattern": "^class Flask\\\\b", '
        '"glob": "*.py"}}\n</tool_call><|im_end|>\n',
        '<tool_call>\n{"name": "read_file", "arguments": {"path": "src/flask/app.py", '
        '"start_line": 109, "end_line": 110}}\n</tool_call><|im_end|>\n',
        "`Flask` is defined in src/flask/app.py at line 109.<|im_end|>\n",
    ]
    rest = tokenizer.decode(enc.tokens[~enc.mask].tolist())
    assert rest.endswith("<|im_start|>assistant\n") and "# Tools" in rest and "<tool_response>" in rest


def test_call_weight_weighs_the_loss_of_call_turns_only(tokenizer: Any) -> None:
    """`train.call_weight`: the tokens of turns that call a tool weigh w in the loss, answer
    tokens 1, everything else 0; at 1.0 the option is out of the spec key (no retraining)."""
    from codeadapt.train import collate, loss_inputs, spec_key

    enc = encode_record(tokenizer, _record(3), "rec")
    tokens, mask = collate([enc], 4096, call_weight=3.0)
    row = mask[0, : len(enc.tokens)]
    spans = _spans(enc.mask)
    assert len(spans) == 2 and set(row[spans[0][0]:spans[0][1]]) == {3.0}
    assert set(row[spans[1][0]:spans[1][1]]) == {1.0} and row[~enc.mask].sum() == 0
    _, positions, _, weights = loss_inputs(tokens, mask)
    n = int(enc.mask.sum())
    assert sorted(set(weights[:n].tolist())) == [1.0, 3.0] and not weights[n:].any()
    assert (collate([enc], 4096)[1][0, : len(enc.tokens)] == enc.mask).all()
    assert "call_weight" not in spec_key(SPEC)
    assert spec_key(SPEC.model_copy(update={"call_weight": 3.0}))["call_weight"] == 3.0
    # where the frozen states are kept does not change what is trained
    assert spec_key(SPEC.model_copy(update={"frozen_store_gib": 0.0})) == spec_key(SPEC)


class _UnstableTemplate:
    """Renders the generation prompt with a token the full conversation does not have."""

    def apply_chat_template(self, msgs: list, add_generation_prompt: bool = False, **_: Any
                            ) -> list[int]:
        return [1] * (2 * len(msgs)) + ([7] if add_generation_prompt else [])


def test_template_that_is_not_prefix_stable_fails_naming_the_record() -> None:
    with pytest.raises(ValueError, match=r"train.jsonl:3: .*not .*token prefix.*turn 2"):
        encode_record(_UnstableTemplate(), _record(0), "train.jsonl:3")


def test_too_long_records_are_dropped_and_counted(tokenizer: Any, data_dir: Path) -> None:
    kept, stats = load_split(data_dir / "train.jsonl", tokenizer, 512)
    assert dict(stats) == {"total": 10, "kept": 9, DROPPED_TOO_LONG: 1}
    assert all(len(e.tokens) <= 512 for e in kept)


def test_batch_order_is_a_function_of_seed_and_epoch() -> None:
    lengths = [10 + (7 * i) % 13 for i in range(11)]
    first = epoch_batches(lengths, 2, seed=3, epoch=0)
    assert first == epoch_batches(lengths, 2, seed=3, epoch=0)
    assert first != epoch_batches(lengths, 2, seed=3, epoch=1)
    assert first != epoch_batches(lengths, 2, seed=4, epoch=0)
    flat = [j for b in first for j in b]
    assert len(first) == 5 and all(len(b) == 2 for b in first) and len(set(flat)) == 10


def _first(call: dict[str, Any] | None) -> list[dict[str, Any]]:
    turn = chat.tool_call("c1", call["name"], call["arguments"]) if call else chat.assistant("Yes.")
    return [chat.system("pkg"), chat.user("q"), turn]


def test_first_step_masks_names_and_keeps_the_search_shape() -> None:
    def grep(pattern: str) -> str:
        return first_step(_first({"name": "grep", "arguments": {"pattern": pattern, "glob": "*.py"}}))

    assert grep(r"^\s*(class|def|async def) Foo\b") == grep(r"^\s*(class|def|async def) bar_2\b")
    assert grep(r"^\s*class \w+\(.*\bFoo\b") == "grep " + r"^\s*X \w+\(.*\bX\b"
    assert grep(r"^\s*class \w+\(.*\bFoo\b") != grep(r"^\s*(class|def|async def) Foo\b")
    assert first_step(_first({"name": "read_file", "arguments": {"path": "a.py"}})) == "read_file"
    assert first_step(_first(None)) == "answer"


def test_mix_weights_move_draws_toward_rare_first_steps() -> None:
    groups = ["common"] * 90 + ["rare"] * 10
    assert mix_weights(groups, 1.0) is None  # the data as built
    for exponent, rare_share in ((0.0, 0.5), (0.5, 0.25)):  # sqrt: 10^.5 / (90^.5 + 10^.5)
        w = mix_weights(groups, exponent)
        assert w.sum() == pytest.approx(1.0)
        assert w[90:].sum() == pytest.approx(rare_share)
        assert mix_shares(groups, w)["rare"] == pytest.approx(rare_share, abs=1e-4)
    drawn = [j for e in range(20) for b in epoch_batches([5] * 100, 4, 0, e, mix_weights(groups, 0.0))
             for j in b]
    assert len(drawn) == 2000 and 0.45 < sum(j >= 90 for j in drawn) / len(drawn) < 0.55
    assert epoch_batches([5] * 100, 4, 0, 3, mix_weights(groups, 0.0)) == epoch_batches(
        [5] * 100, 4, 0, 3, mix_weights(groups, 0.0))


def test_spec_validation() -> None:
    assert TrainSpec().max_seq_length >= 1024  # system + tools prompt is ~510 tokens
    for bad in ({"lora_layers": 0}, {"save_every": 15, "steps_per_report": 10},
                {"mode": "dora"}, {"batch_size": 0}, {"unknown": 1}):
        with pytest.raises(ValueError):
            TrainSpec(**bad)


def test_stale_work_dir_from_other_arguments_is_discarded(tmp_path: Path) -> None:
    work = tmp_path / ".out.work"
    assert _open_work(work, {"spec": 1}) is None
    (work / "ckpt-0000010").mkdir()
    assert _open_work(work, {"spec": 1}) == work / "ckpt-0000010"
    assert _open_work(work, {"spec": 2}) is None and not (work / "ckpt-0000010").exists()


def test_lora_run_lowers_loss_publishes_and_loads(lora_run: tuple, micro_base: Path,
                                                  tmp_path: Path) -> None:
    import mlx.core as mx
    import mlx_lm

    out, metrics, events = lora_run
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapters.safetensors", "loss.png", "metrics.json"]
    assert not [p for p in out.parent.glob(".*") if p.name != ".locks"]  # no work or temp dirs left
    assert json.loads((out / "metrics.json").read_text()) == metrics
    train = [p["loss"] for p in metrics["train_losses"]]
    assert [p["step"] for p in metrics["train_losses"]] == list(range(5, 41, 5))
    assert train[-1] < train[0] - 1.0
    assert [p["step"] for p in metrics["valid_losses"]] == [0, 20, 40]
    assert metrics["final_valid_loss"] == metrics["valid_losses"][-1]["loss"]
    assert metrics["final_valid_loss"] < metrics["valid_losses"][0]["loss"]
    assert metrics[DROPPED_TOO_LONG] == 1 and metrics["examples"]["train"]["kept"] == 9
    assert metrics["resumed_from"] == [] and metrics["trained_tokens"] > 0
    assert metrics["tokens_per_sec"] > 0 and metrics["blas"]
    assert metrics["data_manifest_sha256"] and metrics["base_weights_sha256"]
    assert {e["step"] for e in events if "train_loss" in e} == set(range(5, 41, 5))
    assert all(e["iters"] == 40 and e["tokens_per_sec"] > 0 for e in events if "train_loss" in e)
    assert [e["step"] for e in events if "val_loss" in e] == [0, 20, 40]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["fine_tune_type"], config["num_layers"]) == ("lora", -1)

    model, _ = mlx_lm.load(str(micro_base), adapter_path=str(out))
    base_model, _ = mlx_lm.load(str(micro_base))
    x = mx.array([[2, 40, 41, 42]])
    assert not mx.allclose(model(x), base_model(x)).item()  # the adapter is applied
    png = plot_losses(metrics, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stock_cli_generates_with_the_adapter(lora_run: tuple, micro_base: Path) -> None:
    out = lora_run[0]
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", str(micro_base),
         "--adapter-path", str(out), "--prompt", "hi", "--max-tokens", "5"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_resume_after_sigkill_matches_an_uninterrupted_run(
        lora_run: tuple, micro_base: Path, data_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import mlx.core as mx

    baseline_out, baseline, _ = lora_run
    # The same BLAS as the in-process baseline, so results can match exactly.
    lib = baseline["blas"].partition("(")[2].rstrip(")")
    monkeypatch.setenv(worker.BLAS_ENV, lib if lib.startswith("/") else "reference")
    out = tmp_path / "lora"
    work = tmp_path / ".lora.work"
    payload = {"base_dir": str(micro_base), "data_dir": str(data_dir), "out_dir": str(out),
               "spec": SPEC.model_dump()}
    proc = subprocess.Popen([sys.executable, "-m", "codeadapt.worker"], env=worker.worker_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    proc.stdin.write(json.dumps({"kind": "train", "payload": payload}).encode())
    proc.stdin.close()
    deadline = time.monotonic() + 120
    while not list(work.glob("ckpt-*")):
        assert proc.poll() is None, "the worker ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    killed_at = int(sorted(work.glob("ckpt-*"))[-1].name.split("-")[1])
    assert 0 < killed_at < SPEC.iters

    metrics = worker.run_in_worker("train", payload)
    assert metrics["resumed_from"] == [killed_at]
    assert metrics["blas"] == baseline["blas"]
    assert not work.exists()
    assert metrics["train_losses"] == baseline["train_losses"]
    assert metrics["valid_losses"] == baseline["valid_losses"]
    resumed = mx.load(str(out / "adapters.safetensors"))
    expected = mx.load(str(baseline_out / "adapters.safetensors"))
    assert resumed.keys() == expected.keys()
    for name, w in expected.items():
        assert mx.array_equal(resumed[name], w).item(), name


def test_full_fine_tune_in_worker_writes_a_loadable_model(
        micro_base: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlx.core as mx
    import mlx_lm

    monkeypatch.delenv(worker.BLAS_ENV, raising=False)
    events: list[dict[str, Any]] = []
    spec = TrainSpec(mode="full", iters=10, learning_rate=1e-3, batch_size=2,
                     max_seq_length=512, steps_per_report=5, steps_per_eval=10, save_every=5)
    metrics = train_in_worker(micro_base, data_dir, tmp_path / "full", spec, events.append)
    if worker.OPENBLAS.exists():
        assert metrics["blas"].startswith("openblas")
    assert [e["step"] for e in events if "train_loss" in e] == [5, 10]
    assert metrics["train_losses"][-1]["loss"] < metrics["train_losses"][0]["loss"]
    names = {p.name for p in (tmp_path / "full").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "metrics.json"} <= names and "adapter_config.json" not in names
    model, tok = mlx_lm.load(str(tmp_path / "full"))
    trained = mx.load(str(tmp_path / "full" / "model.safetensors"))
    before = mx.load(str(micro_base / "model.safetensors"))
    assert trained.keys() == before.keys()
    assert not mx.array_equal(trained["model.norm.weight"], before["model.norm.weight"]).item()
    assert tok.apply_chat_template([chat.user("hi")], add_generation_prompt=True)


def test_worker_env_selects_blas(tmp_path: Path) -> None:
    lib = tmp_path / "libblas.so.3"
    lib.write_bytes(b"")
    env = worker.worker_env({"LD_PRELOAD": "/x.so"}, openblas=lib)
    assert env["LD_PRELOAD"] == f"{lib} /x.so" and env["DO_NOT_TRACK"] == "1"
    assert "LD_PRELOAD" not in worker.worker_env({}, openblas=tmp_path / "missing.so")
    assert "LD_PRELOAD" not in worker.worker_env({worker.BLAS_ENV: "reference"}, openblas=lib)
    with pytest.raises(FileNotFoundError, match="CODEADAPT_BLAS"):
        worker.worker_env({worker.BLAS_ENV: str(tmp_path / "nope.so")})


def test_worker_env_keeps_big_buffers_in_the_heap() -> None:
    """The child's malloc settings take effect: re-allocating a 100 MB mlx array costs a
    fraction of the page faults it costs with glibc's defaults (a fresh mmap each time)."""
    if not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"):
        pytest.skip("glibc malloc settings")
    env = worker.worker_env({"PATH": os.environ.get("PATH", "")})
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(4 << 30) and env["MALLOC_TRIM_THRESHOLD_"] == str(16 << 30)
    assert worker.worker_env({"MALLOC_TRIM_THRESHOLD_": "7"})["MALLOC_TRIM_THRESHOLD_"] == "7"
    probe = ("import resource, mlx.core as mx\n"
             "def f(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
             "y = mx.ones((25 << 20,)) + 1; mx.eval(y); del y\n"
             "a = f()\n"
             "for _ in range(10):\n    y = mx.ones((25 << 20,)) + 1; mx.eval(y); del y\n"
             "print((f() - a) // 10)")
    default = {k: v for k, v in env.items() if k not in worker.MALLOC_ENV}

    def faults(e: dict[str, str]) -> int:
        return int(subprocess.run([sys.executable, "-c", probe], env=e, check=True,
                                  capture_output=True, text=True).stdout)

    tuned, plain = faults(env), faults(default)
    assert plain > 20_000 and tuned < plain / 4, (tuned, plain)  # 100 MB = 25,600 pages


@pytest.mark.parametrize("choice", ["auto", "reference"])
def test_worker_reports_the_blas_it_loaded(choice: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if choice == "auto" and not worker.OPENBLAS.exists():
        pytest.skip(f"{worker.OPENBLAS} not installed")
    monkeypatch.setenv(worker.BLAS_ENV, choice)
    blas = worker.run_in_worker("blas", {})["blas"]
    assert blas.startswith("openblas" if choice == "auto" else "reference"), blas


def test_worker_errors_raise_in_the_parent_with_the_child_traceback(tmp_path: Path) -> None:
    payload = {"base_dir": str(tmp_path), "data_dir": str(tmp_path), "out_dir": str(tmp_path / "o")}
    with pytest.raises(FileNotFoundError, match=r"(?s)config.json not found.*worker traceback.*"
                                                r"in train_adapter"):
        worker.run_in_worker("train", payload)
    with pytest.raises(ValueError, match="unknown worker kind"):
        worker.run_in_worker("nope", {})


# ---- the selective-head loss --------------------------------------------------------------


def _micro_llama(tie: bool) -> Any:
    import mlx.core as mx
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", rms_norm_eps=1e-6, tie_word_embeddings=tie,
                           **{k: v for k, v in MICRO_BASE.items() if k != "max_position_embeddings"})
    mx.random.seed(1)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


class _Opaque:
    """A causal LM that only maps tokens to logits: no `.model` to split off the head."""

    def __init__(self, model: Any) -> None:
        self._m = model

    def __call__(self, inputs: Any) -> Any:
        return self._m(inputs)


def _hand_batch() -> tuple[np.ndarray, np.ndarray]:
    """Two rows of 14 tokens: assistant spans in the middle and at the end, one row padded."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, MICRO_BASE["vocab_size"], size=(2, 14)).astype(np.int32)
    mask = np.zeros((2, 14), np.float32)
    mask[0, 4:7] = mask[0, 10:14] = 1
    mask[1, 2:5] = 1
    tokens[1, 9:] = 0  # padding, mask 0
    return tokens, mask


def _reference_loss(model: Any, tokens: np.ndarray, mask: np.ndarray) -> float:
    """Mean cross-entropy over assistant targets from the full logits, in float64."""
    import mlx.core as mx

    logits = np.array(model(mx.array(tokens[:, :-1])), dtype=np.float64)
    targets, weights = tokens[:, 1:], mask[:, 1:]
    top = logits.max(-1, keepdims=True)
    lse = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
    ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return float((ce * weights).sum() / weights.sum())


@pytest.mark.parametrize("tie", [True, False], ids=["tied-head", "lm_head"])
def test_masked_loss_equals_full_logits_cross_entropy_over_assistant_targets(tie: bool) -> None:
    """Asserts: the selective-head loss (tied embedding or lm_head), the full-logits fallback (a
    model without `.model`) and a float64 cross-entropy from `model(tokens[:, :-1])` agree to 1e-5;
    ntoks counts the assistant targets; extra weight-0 positions (any index, any target) change
    neither the loss nor its gradients."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    model = _micro_llama(tie)
    tokens, mask = _hand_batch()
    want = _reference_loss(model, tokens, mask)
    batch = to_batch(tokens, mask)
    loss, ntoks = masked_loss(model, *batch)
    assert ntoks.item() == mask[:, 1:].sum() == 10
    assert loss.item() == pytest.approx(want, abs=1e-5)
    fallback, n2 = masked_loss(_Opaque(model), *batch)
    assert fallback.item() == pytest.approx(want, abs=1e-5) and n2.item() == 10

    inputs, positions, targets, weights = loss_inputs(tokens, mask)
    n = int(weights.sum())
    more = np.arange(2 * PAD_TO, dtype=np.int32) % positions.max()  # real positions, weight 0
    variants = {
        "unpadded": (positions[:n], targets[:n], weights[:n]),
        "extra padding": (np.concatenate([positions, more]),
                          np.concatenate([targets, (more * 7 + 3) % MICRO_BASE["vocab_size"]]),
                          np.concatenate([weights, np.zeros(len(more), np.float32)])),
    }

    def grads(p: np.ndarray, t: np.ndarray, w: np.ndarray) -> tuple[float, dict[str, Any]]:
        args = (mx.array(inputs), mx.array(p), mx.array(t), mx.array(w))
        fn = nn.value_and_grad(model, lambda *a: masked_loss(model, *a)[0])
        value, g = fn(*args)
        return value.item(), dict(tree_flatten(g))

    base_value, base_grads = grads(positions, targets, weights)
    assert base_value == pytest.approx(want, abs=1e-5)
    for name, (p, t, w) in variants.items():
        value, g = grads(p, t, w)
        assert value == pytest.approx(base_value, abs=1e-6), name
        for k, v in base_grads.items():
            assert mx.allclose(g[k], v, rtol=1e-5, atol=1e-6).item(), (name, k)


def test_masked_loss_gradients_match_the_full_logits_loss() -> None:
    """Asserts: d(loss)/d(weights) of the selective head equals that of the plain full-logits
    masked mean cross-entropy (1e-5), so training follows the same path."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    model = _micro_llama(True)
    tokens, mask = _hand_batch()

    def full(tok: Any, m: Any) -> Any:
        ce = nn.losses.cross_entropy(model(tok[:, :-1]), tok[:, 1:]) * m[:, 1:]
        return ce.sum() / m[:, 1:].sum()

    v_ref, g_ref = nn.value_and_grad(model, full)(mx.array(tokens), mx.array(mask))
    v, g = nn.value_and_grad(model, lambda *a: masked_loss(model, *a)[0])(*to_batch(tokens, mask))
    assert v.item() == pytest.approx(v_ref.item(), abs=1e-5)
    g, g_ref = dict(tree_flatten(g)), dict(tree_flatten(g_ref))
    assert g.keys() == g_ref.keys()
    for k in g_ref:
        assert mx.allclose(g[k], g_ref[k], rtol=1e-4, atol=1e-6).item(), k


@pytest.mark.parametrize("n_targets", [0, 1, PAD_TO, PAD_TO + 1, 2 * PAD_TO + 5])
def test_loss_inputs_are_the_assistant_target_positions_padded_to_pad_to(n_targets: int) -> None:
    """Asserts: positions are exactly the flat indices where mask[:, 1:] is 1 (row-major, in
    order), then zeros up to the next multiple of PAD_TO (at least PAD_TO); weights are 1 for
    those and 0 after; targets are the next tokens at those positions; inputs are tokens[:, :-1]."""
    rng = np.random.default_rng(n_targets)
    tokens = rng.integers(1, 500, size=(3, 41)).astype(np.int32)
    mask = np.zeros_like(tokens, dtype=np.float32)
    flat = np.sort(rng.choice(3 * 40, size=n_targets, replace=False))
    rows, cols = np.divmod(flat, 40)
    mask[rows, cols + 1] = 1  # target flat index r * 40 + c is token (r, c + 1)
    mask[:, 0] = 1  # the first token is never a target, even in an assistant span
    inputs, positions, targets, weights = loss_inputs(tokens, mask)
    k = max(PAD_TO, PAD_TO * -(-n_targets // PAD_TO))
    assert positions.dtype == np.int32 and len(positions) == len(weights) == len(targets) == k
    assert k % PAD_TO == 0
    assert positions[:n_targets].tolist() == np.flatnonzero(mask[:, 1:]).tolist() == flat.tolist()
    assert not positions[n_targets:].any()
    assert weights.tolist() == [1.0] * n_targets + [0.0] * (k - n_targets)
    assert targets[:n_targets].tolist() == tokens[:, 1:].reshape(-1)[flat].tolist()
    assert np.array_equal(inputs, tokens[:, :-1])


# ---- continuing from a previous adapter ----------------------------------------------------

TWO_STEPS = TrainSpec(iters=2, learning_rate=1e-3, batch_size=2, max_seq_length=512, lora_rank=4,
                      steps_per_report=1, steps_per_eval=2, save_every=2, val_batches=1)


@pytest.fixture(scope="module")
def first_adapter(micro_base: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("chain") / "phase5"
    return out, train_adapter(micro_base, data_dir, out, TWO_STEPS)


def test_training_from_an_init_adapter_records_and_checks_it(
        first_adapter: tuple[Path, dict[str, Any]], micro_base: Path, data_dir: Path,
        tmp_path: Path) -> None:
    """Asserts: a 2-step LoRA run from the first run's adapter starts from its weights (a tiny
    learning rate leaves them ~unchanged, a fresh LoRA would have lora_b = 0), records its path
    and sha256 in metrics.json; is_current holds with that init only (not without one, not with
    another adapter), and the first run's metrics record no init."""
    import mlx.core as mx

    first, m1 = first_adapter
    assert m1["init_adapter"] is None and m1["init_adapter_sha256"] is None
    assert is_current(first, micro_base, data_dir, TWO_STEPS)
    assert not is_current(first, micro_base, data_dir, TWO_STEPS, first)

    spec = TWO_STEPS.model_copy(update={"learning_rate": 1e-6})
    second = tmp_path / "phase6"
    m2 = train_adapter(micro_base, data_dir, second, spec, init_adapter=first)
    sha = file_sha256(first / "adapters.safetensors")
    assert m2["init_adapter"] == str(first.resolve()) and m2["init_adapter_sha256"] == sha
    assert json.loads((second / "metrics.json").read_text())["init_adapter_sha256"] == sha

    w1 = mx.load(str(first / "adapters.safetensors"))
    w2 = mx.load(str(second / "adapters.safetensors"))
    assert w1.keys() == w2.keys()
    assert max(mx.abs(w).max().item() for k, w in w1.items() if k.endswith("lora_b")) > 5e-4
    for k, w in w1.items():
        assert mx.allclose(w2[k], w, atol=1e-4, rtol=0).item(), k
        assert w2[k].shape == w.shape, k
    assert any(not mx.array_equal(w2[k], w).item() for k, w in w1.items())  # it did train

    assert is_current(second, micro_base, data_dir, spec, first)
    assert is_current(second, micro_base, data_dir, spec, str(first))
    assert not is_current(second, micro_base, data_dir, spec)
    assert not is_current(second, micro_base, data_dir, spec, second)  # another adapter
    other = tmp_path / "other"
    shutil.copytree(first, other)
    assert is_current(second, micro_base, data_dir, spec, other)  # same file, same sha
    mx.save_safetensors(str(other / "adapters.safetensors"),
                        {k: w + 1 for k, w in w1.items()})
    assert not is_current(second, micro_base, data_dir, spec, other)  # changed weights


def test_init_adapter_of_another_shape_or_mode_is_refused(
        first_adapter: tuple[Path, dict[str, Any]], micro_base: Path, data_dir: Path,
        tmp_path: Path) -> None:
    """Asserts: starting from an adapter of another LoRA rank, or one adapting fewer layers,
    raises ValueError naming the adapter dir and publishes nothing; init_adapter with mode "full"
    or a dir without adapters.safetensors is refused before loading anything."""
    first = first_adapter[0]
    named = re.escape(str(first.resolve()))
    for update in ({"lora_rank": 8}, {"lora_layers": 1}):
        out = tmp_path / f"bad-{next(iter(update))}"
        with pytest.raises(ValueError, match=named):
            train_adapter(micro_base, data_dir, out, TWO_STEPS.model_copy(update=update),
                          init_adapter=first)
        assert not out.exists()
    with pytest.raises(ValueError, match="needs mode 'lora'"):
        train_adapter(micro_base, data_dir, tmp_path / "full",
                      TWO_STEPS.model_copy(update={"mode": "full"}), init_adapter=first)
    with pytest.raises(FileNotFoundError, match="adapters.safetensors"):
        train_adapter(micro_base, data_dir, tmp_path / "x", TWO_STEPS, init_adapter=tmp_path)


def test_fast_kernels_train_like_stock_mlx(first_adapter: tuple[Path, dict[str, Any]],
                                           micro_base: Path, data_dir: Path, tmp_path: Path) -> None:
    """Asserts: the same 2-step run with fast_kernels off (stock mlx-lm attention and SwiGLU)
    reports the same train and validation losses to 1e-4 as the fast-kernel run."""
    fast = first_adapter[1]
    fastpath.uninstall()  # an earlier in-process run installed it
    slow = train_adapter(micro_base, data_dir, tmp_path / "slow",
                         TWO_STEPS.model_copy(update={"fast_kernels": False}))
    for key in ("train_losses", "valid_losses"):
        assert [p["step"] for p in slow[key]] == [p["step"] for p in fast[key]]
        for a, b in zip(slow[key], fast[key]):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), key


# ---- the frozen-bottom cache ---------------------------------------------------------------


def test_loss_and_gradients_from_cached_frozen_states_equal_the_full_model() -> None:
    """Asserts: masked_loss on the hidden states after the bottom blocks (frozen.bottom) with
    n_frozen equals masked_loss on the tokens (1e-5), and so do the gradients of the top
    blocks' weights; padding rows beyond a record's length do not change its loss."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from codeadapt.models import frozen

    model = _micro_llama(True)
    tokens, mask = _hand_batch()
    n_frozen = frozen.split_point(model, 1)
    assert n_frozen == len(model.model.layers) - 1
    inputs, *rest = to_batch(tokens, mask)
    cache = frozen.FrozenBottom(model, n_frozen)
    rows = [tokens[0, :14], tokens[1, :9]]
    hidden = cache.hidden(rows, inputs.shape[1])
    assert cache.misses == 2
    assert cache.hidden(rows[::-1], 14).shape == (2, 14, hidden.shape[-1])
    assert cache.hits == 2

    def value_grads(fn: Any, x: Any) -> tuple[float, dict[str, Any]]:
        v, g = nn.value_and_grad(model, lambda *a: fn(model, *a)[0])(x, *rest)
        return v.item(), dict(tree_flatten(g))

    v_full, g_full = value_grads(masked_loss, inputs)
    v_top, g_top = value_grads(functools.partial(masked_loss, n_frozen=n_frozen), hidden)
    assert v_top == pytest.approx(v_full, abs=1e-5)
    top_keys = [k for k in g_full if k.startswith(f"model.layers.{n_frozen}.")]
    assert top_keys
    for k in top_keys:
        assert mx.allclose(g_top[k], g_full[k], rtol=1e-4, atol=1e-6).item(), k


def test_training_on_cached_frozen_states_matches_the_uncached_run(
        micro_base: Path, data_dir: Path, tmp_path: Path) -> None:
    """Asserts: three epochs with LoRA on the top block, cache on and off, report the same train
    losses (1e-4); the cached run computed each example's bottom once (9 usable records: at most 9 misses, the rest hits)."""
    spec = TrainSpec(iters=12, learning_rate=1e-3, batch_size=2, max_seq_length=512,
                     lora_layers=1, steps_per_report=2, steps_per_eval=100, save_every=100,
                     fast_kernels=False)
    on = train_adapter(micro_base, data_dir, tmp_path / "on", spec)
    off = train_adapter(micro_base, data_dir, tmp_path / "off", spec.model_copy(update={"cache_frozen": False}))
    assert off["frozen_cache"] is None
    cache = on["frozen_cache"]
    # 24 training draws, plus the two validations (start and end) of up to 4 records each
    assert cache["hits"] + cache["misses"] >= 12 * 2 and cache["misses"] <= 9 + 4 and cache["blocks"] == 1
    assert cache["loaded"] == 0 and cache["store"] is None
    assert [p["loss"] for p in on["train_losses"]] == pytest.approx(
        [p["loss"] for p in off["train_losses"]], abs=1e-4)


def test_frozen_store_shares_states_across_caches_and_survives_a_bad_file(tmp_path: Path) -> None:
    """Asserts: a second FrozenBottom on the same store reads (not computes) what the first
    wrote, equal to it; an example's states do not depend on the batch it came in (computed
    alone, at its own length); a truncated or wrong-shape file is recomputed and rewritten; the
    store's key changes with the base weights and the frozen depth; prune deletes the least
    recently used files down to the cap."""
    import mlx.core as mx

    from codeadapt.models import frozen

    model = _micro_llama(True)
    tokens, _ = _hand_batch()
    a, b = tokens[0, :14], tokens[1, :9]
    store = frozen.store_dir(tmp_path, "w" * 64, 1, "mlx")
    assert store != frozen.store_dir(tmp_path, "v" * 64, 1, "mlx")
    assert store != frozen.store_dir(tmp_path, "w" * 64, 2, "mlx")
    first = frozen.FrozenBottom(model, 1, store)
    ha = first.hidden([a, b], 14)
    assert first.misses == 2 and len(list(store.glob("*.npy"))) == 2
    assert all(p.suffix == ".npy" and not p.name.startswith(".") for p in store.iterdir())  # no temp left
    alone = frozen.FrozenBottom(model, 1).hidden([b], 9)
    assert mx.array_equal(alone[0], ha[1, :9]).item()

    second = frozen.FrozenBottom(model, 1, store)
    hb = second.hidden([b, a], 14)
    assert (second.loaded, second.misses) == (2, 0)
    assert mx.array_equal(hb[1], ha[0]).item() and mx.array_equal(hb[0], ha[1]).item()

    bad = store / f"{frozen.tokens_key(a)}.npy"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    np.save(store / f"{frozen.tokens_key(b)}.npy", np.zeros((3, 2), np.float32))  # wrong shape
    third = frozen.FrozenBottom(model, 1, store)
    hc = third.hidden([a, b], 14)
    assert (third.loaded, third.misses) == (0, 2)
    assert mx.array_equal(hc, ha).item()
    assert frozen.FrozenBottom(model, 1, store).hidden([a], 14) is not None

    import os
    files = sorted(store.glob("*.npy"))
    os.utime(files[0], (1, 1))  # the oldest
    size = files[1].stat().st_size
    assert frozen.prune(tmp_path, size) == 1
    assert sorted(store.glob("*.npy")) == files[1:]
    assert frozen.prune(tmp_path, 10**9) == 0


def test_a_phase_reuses_the_frozen_states_of_the_one_before(
        micro_base: Path, data_dir: Path, tmp_path: Path) -> None:
    """Asserts: a training with a frozen store writes each example's states once; a second
    training on the same data and store (as phase N+1 over phase N's examples) reads them all
    (no computing) and reports the same train and validation losses as a memory-only run."""
    spec = TrainSpec(iters=6, learning_rate=1e-3, batch_size=2, max_seq_length=512,
                     lora_layers=1, steps_per_report=2, steps_per_eval=100, save_every=100,
                     fast_kernels=False)
    store = tmp_path / "frozen"
    first = train_adapter(micro_base, data_dir, tmp_path / "a", spec, frozen_store=store)
    written = list(store.glob("*/*.npy"))
    assert first["frozen_cache"]["misses"] == len(written) > 0
    again = train_adapter(micro_base, data_dir, tmp_path / "b", spec, frozen_store=store)
    alone = train_adapter(micro_base, data_dir, tmp_path / "c", spec)
    assert again["frozen_cache"]["misses"] == 0
    assert again["frozen_cache"]["loaded"] == len(written)
    for key in ("train_losses", "valid_losses"):
        assert [p["loss"] for p in again[key]] == pytest.approx([p["loss"] for p in alone[key]], abs=1e-6)
        assert [p["loss"] for p in again[key]] == pytest.approx([p["loss"] for p in first[key]], abs=1e-6)
