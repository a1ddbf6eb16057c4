"""Train a LoRA adapter or a full fine-tune on a codeadapt chat dataset with mlx-lm.

Every assistant turn is trained (tool calls and final answers); system, user and tool tokens
are masked. A run checkpoints into `.<name>.work/` beside its output and resumes from there
when called again with the same arguments; the output directory appears only once complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from codeadapt.config import TrainSpec
from codeadapt.fsutil import read_json, replace_dir, write_json
from codeadapt.mixing import first_step, mix_shares, mix_weights

TRAIN_VERSION = "2"  # bump when checkpoints or outputs for the same inputs change
PAD_TO = 32  # batch widths are 1 + a multiple of this, like mlx-lm, so compiled shapes repeat
BUCKET_BATCHES = 16  # batches per length-sorted window: less padding, order still shuffled
DROPPED_TOO_LONG = "dropped_too_long"
WEIGHT_GLOBS = ("*.safetensors", "*.safetensors.index.json")
ProgressFn = Callable[[dict[str, Any]], None]
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenized record; `mask` is True on tokens of assistant turns."""

    tokens: np.ndarray
    mask: np.ndarray
    group: str = ""  # its first step (codeadapt.mixing.first_step): what the mix balances
    calls: np.ndarray | None = None  # True on tokens of assistant turns that call a tool


def encode_record(tokenizer: Any, record: dict[str, Any], where: str) -> Encoded:
    """Render with the chat template; mask exactly the assistant turns (fails if not prefix-stable)."""
    messages, tools = record.get("messages"), record.get("tools") or None
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")

    def render(msgs: list[dict[str, Any]], prompt: bool = False) -> list[int]:
        return list(tokenizer.apply_chat_template(
            msgs, tools=tools, add_generation_prompt=prompt, tokenize=True, return_dict=False))

    full = render(messages)
    mask = np.zeros(len(full), dtype=bool)
    calls = np.zeros(len(full), dtype=bool)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        if i == 0:
            raise ValueError(f"{where}: messages[0] is an assistant turn with no prompt before it")
        prompt = render(messages[:i], prompt=True)
        turn = full if i + 1 == len(messages) else render(messages[: i + 1])
        if full[: len(prompt)] != prompt or full[: len(turn)] != turn:
            raise ValueError(f"{where}: the chat template does not render messages[:{i}] as a "
                             "token prefix of the whole conversation, so assistant turn "
                             f"{i} cannot be masked")
        mask[len(prompt) : len(turn)] = True
        calls[len(prompt) : len(turn)] = bool(m.get("tool_calls"))
    if not mask.any():
        raise ValueError(f"{where}: no assistant turn to train")
    return Encoded(np.asarray(full, dtype=np.int32), mask, first_step(messages), calls)


def load_split(path: Path, tokenizer: Any, max_seq_length: int) -> tuple[list[Encoded], Counter[str]]:
    """Encode a JSONL split; records over `max_seq_length` tokens are dropped and counted."""
    stats: Counter[str] = Counter(total=0, kept=0, **{DROPPED_TOO_LONG: 0})
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON: {exc}") from None
            stats["total"] += 1
            enc = encode_record(tokenizer, record, where)
            if len(enc.tokens) > max_seq_length:
                stats[DROPPED_TOO_LONG] += 1
                continue
            stats["kept"] += 1
            out.append(enc)
    return out, stats


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  weights: np.ndarray | None = None) -> list[list[int]]:
    """One epoch's batches: shuffle (or, with `weights`, draw as many records with those
    probabilities, codeadapt.mixing), sort windows by length, shuffle the batches; a pure
    function."""
    rng = np.random.default_rng([seed, epoch])
    order = (rng.permutation(len(lengths)) if weights is None
             else rng.choice(len(lengths), size=len(lengths), p=weights))
    order = order[: len(order) - len(order) % batch_size]  # the dropped tail changes every epoch
    window = batch_size * BUCKET_BATCHES
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window].tolist(), key=lambda j: lengths[j])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[k] for k in rng.permutation(len(batches))]


def collate(items: Sequence[Encoded], max_seq_length: int,
            call_weight: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Pad with id 0 (mask 0) to 1 + a multiple of PAD_TO, capped at max_seq_length. The
    mask is each token's loss weight: 1 on assistant tokens, `call_weight` on those of turns
    that call a tool, 0 elsewhere."""
    longest = max(len(e.tokens) for e in items)
    width = min(1 + PAD_TO * -(-longest // PAD_TO), max_seq_length)
    tokens = np.zeros((len(items), width), np.int32)
    mask = np.zeros((len(items), width), np.float32)
    for row, e in enumerate(items):
        tokens[row, : len(e.tokens)] = e.tokens
        mask[row, : len(e.tokens)] = e.mask
        if call_weight != 1.0 and e.calls is not None:
            mask[row, : len(e.tokens)] *= np.where(e.calls, call_weight, 1.0)
    return tokens, mask


def loss_inputs(tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
    """(inputs, positions, targets, weights): the flat positions whose next token is an
    assistant token, padded to a multiple of PAD_TO (weight 0) so compiled shapes repeat."""
    inputs, target_mask = tokens[:, :-1], mask[:, 1:]
    positions = np.flatnonzero(target_mask).astype(np.int32)
    k = max(PAD_TO * -(-len(positions) // PAD_TO), PAD_TO)
    padded = np.zeros(k, np.int32)
    padded[: len(positions)] = positions
    weights = np.zeros(k, np.float32)
    weights[: len(positions)] = target_mask.reshape(-1)[positions]
    return inputs, padded, tokens[:, 1:].reshape(-1)[padded], weights


def _hidden_and_head(model: Any) -> tuple[Any, Any] | None:
    """(body, head) of an mlx-lm causal LM whose body returns final hidden states."""
    body = getattr(model, "model", None)
    if body is None:
        return None
    if getattr(model, "lm_head", None) is not None:
        return body, model.lm_head
    if getattr(getattr(model, "args", None), "tie_word_embeddings", False):
        return body, body.embed_tokens.as_linear
    return None


def masked_loss(model: Any, inputs: Any, positions: Any, targets: Any, weights: Any,
                n_frozen: int = 0) -> tuple[Any, Any]:
    """Mean cross-entropy over target tokens that belong to assistant turns.

    Only those positions go through the output head: with a 49k vocabulary the head is ~20%
    of a 135M model's compute, and ~75% of a chat's tokens are prompt and tool output.
    `inputs` are token ids, or (float) hidden states after the first `n_frozen` blocks
    (`codeadapt.models.frozen`).
    """
    import mlx.core as mx
    import mlx.nn as nn

    split = _hidden_and_head(model)
    if mx.issubdtype(inputs.dtype, mx.floating):  # hidden states from a FrozenBottom cache
        from codeadapt.models.frozen import top

        hidden = top(model, inputs, n_frozen)
        head = split[1]
        picked = head(mx.take(hidden.reshape(-1, hidden.shape[-1]), positions, axis=0))
    elif split is None:  # an architecture we cannot split: full logits, then pick
        logits = model(inputs)
        picked = mx.take(logits.reshape(-1, logits.shape[-1]), positions, axis=0)
    else:
        body, head = split
        hidden = body(inputs)
        picked = head(mx.take(hidden.reshape(-1, hidden.shape[-1]), positions, axis=0))
    ce = nn.losses.cross_entropy(picked, targets) * weights
    return ce.astype(mx.float32).sum() / weights.sum(), (weights > 0).sum()


def to_batch(tokens: np.ndarray, mask: np.ndarray) -> tuple[Any, ...]:
    """The arrays `masked_loss` takes, as mlx arrays."""
    import mlx.core as mx

    return tuple(mx.array(a) for a in loss_inputs(tokens, mask))


def validation_batches(dataset: Sequence[Encoded], batch_size: int, max_seq_length: int,
                       **_: Any) -> Iterator[tuple[Any, ...]]:
    """File order, last batch partial: the same batches at every evaluation."""
    for b in range(0, len(dataset), batch_size):
        yield to_batch(*collate(dataset[b : b + batch_size], max_seq_length))


def frozen_validation_batches(cache: Any, dataset: Sequence[Encoded], batch_size: int,
                              max_seq_length: int, **_: Any) -> Iterator[tuple[Any, ...]]:
    """`validation_batches` with the inputs replaced by the frozen bottom's cached states."""
    for b in range(0, len(dataset), batch_size):
        items = dataset[b : b + batch_size]
        inputs, *rest = to_batch(*collate(items, max_seq_length))
        yield (cache.hidden([e.tokens for e in items], inputs.shape[1]), *rest)


def lr_schedule(spec: TrainSpec) -> Any:
    """The learning rate as mlx wants it: a float, or a schedule of the optimizer's step."""
    import mlx.optimizers as optim

    if spec.warmup_steps == 0 and spec.schedule == "constant":
        return spec.learning_rate
    rest = max(spec.iters - spec.warmup_steps, 1)
    after = (optim.cosine_decay(spec.learning_rate, rest, spec.learning_rate * 0.1)
             if spec.schedule == "cosine" else lambda step: spec.learning_rate)
    if spec.warmup_steps == 0:
        return after
    warm = optim.linear_schedule(0.0, spec.learning_rate, spec.warmup_steps)
    return optim.join_schedules([warm, after], [spec.warmup_steps])


def spec_key(spec: TrainSpec) -> dict[str, Any]:
    """The options a training records and is matched on: an option at the value that trains
    as before it existed is left out, so adding it does not retrain finished adapters."""
    key = spec.model_dump()
    del key["frozen_store_gib"]  # where states are kept, not what is trained
    for option in ("mix_exponent", "call_weight"):
        if key[option] == 1.0:
            del key[option]
    return key


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(model_dir: Path) -> str:
    """One hash over a model dir's weight files: name and sha256 of each."""
    files = sorted({p for g in WEIGHT_GLOBS for p in Path(model_dir).glob(g)})
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    listing = "".join(f"{p.name}\0{file_sha256(p)}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


class _Run:
    """The loop state mlx-lm's `train()` does not keep: step hooks, curves, checkpoints."""

    def __init__(self, spec: TrainSpec, model: Any, optimizer: Any, train_set: list[Encoded],
                 valid_set: list[Encoded], work: Path, state: dict[str, Any],
                 progress: ProgressFn | None, wall0: float) -> None:
        self.spec, self.model, self.optimizer, self.work = spec, model, optimizer, work
        self.train_set, self.valid_set, self.progress, self.state = train_set, valid_set, progress, state
        self.start = state["step"]
        self.lengths = [len(e.tokens) for e in train_set]
        self.draws = mix_weights([e.group for e in train_set], spec.mix_exponent)
        self.reports: list[tuple[int, float]] = []
        self.window = [0, 0.0]  # input tokens, seconds since the last report
        self.mark = 0.0
        self.epochs: dict[int, list[list[int]]] = {}
        self.wall0, self.wall_before = wall0, state["wall_seconds"]
        self.ids: list[int] = []
        self.frozen: Any = None  # a codeadapt.models.frozen.FrozenBottom when spec.cache_frozen
        self.loss_fn: Any = masked_loss

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.wall0

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self.epochs:
            self.epochs = {epoch: epoch_batches(self.lengths, self.spec.batch_size,
                                                self.spec.seed, epoch, self.draws)}
        return self.epochs[epoch]

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The batch of 1-based global `step`: a function of (seed, step) only, so resume-safe."""
        epoch, pos = divmod(step - 1, len(self.train_set) // self.spec.batch_size)
        self.ids = self._epoch(epoch)[pos]
        items = [self.train_set[j] for j in self.ids]
        tokens, mask = collate(items, self.spec.max_seq_length, self.spec.call_weight)
        n_in = sum(len(e.tokens) for e in items)
        self.state["input_tokens"] += n_in
        self.state["trained_tokens"] += int((mask[:, 1:] > 0).sum())
        self.window[0] += n_in
        return tokens, mask

    def iterate_batches(self, *_: Any, **__: Any) -> Iterator[tuple[Any, ...]]:
        """Passed to mlx-lm's `train()`; runs `after_step` between steps, where state is settled."""
        step = self.start
        while True:
            self.after_step(step)
            step += 1
            tokens, mask = self.batch(step)
            if self.frozen is None:
                yield to_batch(tokens, mask)
                continue
            inputs, *rest = to_batch(tokens, mask)
            hidden = self.frozen.hidden([self.train_set[j].tokens for j in self.ids], inputs.shape[1])
            yield (hidden, *rest)

    def on_train_loss_report(self, info: dict[str, Any]) -> None:
        self.reports.append((self.start + info["iteration"], float(info["train_loss"])))

    def on_val_loss_report(self, info: dict[str, Any]) -> None:
        pass

    def after_step(self, step: int) -> None:
        now = time.perf_counter()
        if step > self.start:
            self.state["train_seconds"] += now - self.mark
            self.window[1] += now - self.mark
        self.state["step"] = step
        for at, loss in self.reports:
            tps = self.window[0] / self.window[1] if self.window[1] else 0.0
            self.state["train_losses"].append({"step": at, "loss": loss})
            self._emit({"step": at, "iters": self.spec.iters, "train_loss": loss,
                        # Input tokens (prompt included) per second of step time; trained = assistant tokens.
        "tokens_per_sec": round(tps, 1)})
            self.window = [0, 0.0]
        self.reports.clear()
        done = {p["step"] for p in self.state["valid_losses"]}
        due = step == 0 or step % self.spec.steps_per_eval == 0 or step == self.spec.iters
        if due and step not in done and self.valid_set and self.spec.val_batches:
            loss = self.validate()
            self.state["valid_losses"].append({"step": step, "loss": loss})
            self._emit({"step": step, "iters": self.spec.iters, "val_loss": loss})
        if self.start < step < self.spec.iters and step % self.spec.save_every == 0:
            self.save_checkpoint(step)
        self.mark = time.perf_counter()

    def validate(self) -> float:
        from mlx_lm.tuner.trainer import evaluate

        batches = validation_batches
        if self.frozen is not None:
            batches = functools.partial(frozen_validation_batches, self.frozen)
        loss = evaluate(self.model, self.valid_set, self.spec.batch_size, self.spec.val_batches,
                        self.spec.max_seq_length, loss=self.loss_fn, iterate_batches=batches)
        self.model.train()
        return float(loss)

    def _emit(self, event: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress(event)

    def save_checkpoint(self, step: int) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        tmp = self.work / f".tmp-{step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        mx.save_safetensors(str(tmp / "weights.safetensors"),
                            dict(tree_flatten(self.model.trainable_parameters())))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"),
                            dict(tree_flatten(self.optimizer.state)))
        self.state["wall_seconds"] = self.wall_seconds()
        state = {**self.state, "rng_key": mx.random.state[0].tolist()}
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
        os.replace(tmp, self.work / f"ckpt-{step:07d}")  # a ckpt-* dir is always complete
        for old in self.work.glob("ckpt-*"):
            if old.name != f"ckpt-{step:07d}":
                shutil.rmtree(old)


def _open_work(work: Path, fingerprint: dict[str, Any]) -> Path | None:
    """Keep `work` only if an identical run made it; return its latest checkpoint."""
    run_file = work / "run.json"
    if work.exists():
        old = read_json(run_file)  # a truncated run.json is another run's: start afresh
        if old != fingerprint:
            log.warning("discarding %s: it belongs to a run with other arguments", work)
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for tmp in work.glob(".tmp-*"):
        shutil.rmtree(tmp)
    write_json(run_file, fingerprint, indent=1)
    checkpoints = sorted(work.glob("ckpt-*"))
    return checkpoints[-1] if checkpoints else None


def _restore(ckpt: Path, model: Any, optimizer: Any) -> dict[str, Any]:
    """Load weights, optimizer state and the RNG key saved by `save_checkpoint`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    weights = mx.load(str(ckpt / "weights.safetensors"))
    expected = {k for k, _ in tree_flatten(model.trainable_parameters())}
    if set(weights) != expected:
        raise ValueError(f"{ckpt}: checkpoint weights do not match the trainable parameters")
    model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(ckpt / "optimizer.safetensors")).items()))
    optimizer.init(model.trainable_parameters())  # marks it initialised; keeps loaded moments
    state = json.loads((ckpt / "state.json").read_text())
    hi, lo = state.pop("rng_key")
    mx.random.seed((hi << 32) | lo)  # a 64-bit seed becomes the key [hi, lo]
    if mx.random.state[0].tolist() != [hi, lo]:
        raise RuntimeError("this mlx version cannot restore the RNG key of a checkpoint")
    return state


def _make_trainable(model: Any, spec: TrainSpec) -> None:
    from mlx_lm.tuner.utils import linear_to_lora_layers

    if spec.lora_layers > len(model.layers):
        raise ValueError(f"lora_layers {spec.lora_layers} exceeds the model's "
                         f"{len(model.layers)} layers")
    model.freeze()
    if spec.mode == "lora":
        linear_to_lora_layers(model, spec.lora_layers, {
            "rank": spec.lora_rank, "dropout": spec.lora_dropout, "scale": spec.lora_scale})
    elif spec.lora_layers == -1:
        model.unfreeze()
    else:
        for layer in model.layers[-spec.lora_layers :]:
            layer.unfreeze()


def _write_outputs(tmp: Path, model: Any, spec: TrainSpec, base_dir: Path, data_dir: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import save_config, save_model

    if spec.mode == "full":
        save_model(tmp, model)
        for p in base_dir.iterdir():  # config and tokenizer files, as the base has them
            if p.is_file() and not any(p.match(g) for g in WEIGHT_GLOBS):
                shutil.copy2(p, tmp / p.name)
        return
    mx.save_safetensors(str(tmp / "adapters.safetensors"),
                        dict(tree_flatten(model.trainable_parameters())))
    save_config({  # the keys mlx-lm's lora.py writes and `load_adapters` reads
        "model": str(base_dir), "data": str(data_dir), "fine_tune_type": "lora",
        "num_layers": spec.lora_layers, "lora_parameters": {
            "rank": spec.lora_rank, "dropout": spec.lora_dropout, "scale": spec.lora_scale},
        "optimizer": "adam", "learning_rate": spec.learning_rate, "iters": spec.iters,
        "batch_size": spec.batch_size, "max_seq_length": spec.max_seq_length,
        "seed": spec.seed, "mask": "assistant_turns",
    }, tmp / "adapter_config.json")


def _init_from(model: Any, adapter_dir: Path) -> None:
    """Start from a previous adapter of the same shape (phase N+1 continues phase N)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = mx.load(str(adapter_dir / "adapters.safetensors"))
    # Names and shapes: another rank has the same names, and load_weights(strict=False)
    # does not check shapes.
    expected = {k: v.shape for k, v in tree_flatten(model.trainable_parameters())}
    if {k: v.shape for k, v in weights.items()} != expected:
        raise ValueError(f"{adapter_dir}: its adapter weights do not match this training's "
                         "trainable parameters (other lora_layers or rank?)")
    model.load_weights(list(weights.items()), strict=False)


def init_sha256(init_adapter: str | Path | None) -> str | None:
    return None if init_adapter is None else file_sha256(Path(init_adapter) / "adapters.safetensors")


def train_adapter(base_dir: str | Path, data_dir: str | Path, out_dir: str | Path,
                  spec: TrainSpec = TrainSpec(), progress: ProgressFn | None = None,
                  init_adapter: str | Path | None = None,
                  frozen_store: str | Path | None = None) -> dict[str, Any]:
    """Train on `data_dir` from `base_dir` (LoRA: from `init_adapter`'s weights when given),
    publish `out_dir` with metrics.json; return metrics. `frozen_store`: a directory where the
    frozen blocks' states outlive this training (codeadapt.models.frozen), e.g. for the next
    phase; None keeps them in memory only."""
    base_dir, data_dir, out_dir = Path(base_dir).resolve(), Path(data_dir).resolve(), Path(out_dir)
    init_adapter = Path(init_adapter).resolve() if init_adapter is not None else None
    if init_adapter is not None and spec.mode != "lora":
        raise ValueError("init_adapter needs mode 'lora'")
    for need in (base_dir / "config.json", data_dir / "train.jsonl",
                 *([init_adapter / "adapters.safetensors"] if init_adapter else [])):
        if not need.is_file():
            raise FileNotFoundError(f"{need} not found")
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.trainer import TrainingArgs, train

    from codeadapt.models import frozen
    from codeadapt.worker import blas_in_use

    if spec.fast_kernels:
        from codeadapt.models import fastpath

        fastpath.install()
    wall0 = time.perf_counter()
    manifest = data_dir / "manifest.json"
    if not manifest.is_file():
        log.warning("%s not found; metrics will not name the dataset's manifest", manifest)
    split_files = {s: data_dir / f"{s}.jsonl" for s in ("train", "valid")}
    if not split_files["valid"].is_file():
        log.warning("%s not found; training without validation", split_files["valid"])
        del split_files["valid"]
    fingerprint = {
        "train_version": TRAIN_VERSION, "spec": spec_key(spec),
        "base_weights_sha256": weights_sha256(base_dir),
        "data_sha256": {f"{s}.jsonl": file_sha256(p) for s, p in split_files.items()},
        "init_adapter_sha256": init_sha256(init_adapter),
    }
    model, tokenizer = load(str(base_dir))
    sets, stats = {"valid": []}, {}
    for split, path in split_files.items():
        sets[split], stats[split] = load_split(path, tokenizer, spec.max_seq_length)
    if len(sets["train"]) < spec.batch_size:
        raise ValueError(f"{split_files['train']}: {len(sets['train'])} usable records, fewer "
                         f"than batch_size {spec.batch_size} (max_seq_length "
                         f"{spec.max_seq_length} dropped {stats['train'][DROPPED_TOO_LONG]})")
    for split, s in stats.items():
        if s[DROPPED_TOO_LONG]:
            log.warning("%s: dropped %d of %d records longer than %d tokens", split,
                        s[DROPPED_TOO_LONG], s["total"], spec.max_seq_length)

    mx.random.seed(spec.seed)
    _make_trainable(model, spec)
    if init_adapter is not None:
        _init_from(model, init_adapter)
    optimizer = optim.Adam(learning_rate=lr_schedule(spec))
    optimizer.init(model.trainable_parameters())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = out_dir.parent / f".{out_dir.name}.work"
    ckpt = _open_work(work, fingerprint)
    if ckpt is None:
        state: dict[str, Any] = {"step": 0, "train_losses": [], "valid_losses": [],
                                 "input_tokens": 0, "trained_tokens": 0, "train_seconds": 0.0,
                                 "wall_seconds": 0.0, "resumed_from": []}
    else:
        state = _restore(ckpt, model, optimizer)
        state["resumed_from"].append(state["step"])
        log.info("resuming %s from step %d", out_dir, state["step"])
    run = _Run(spec, model, optimizer, sets["train"], sets["valid"], work, state, progress, wall0)
    n_frozen = frozen.split_point(model, spec.lora_layers) if spec.mode == "lora" else None
    store = None
    if spec.cache_frozen and n_frozen is not None and _hidden_and_head(model) is not None:
        if frozen_store is not None and spec.frozen_store_gib > 0:
            store = frozen.store_dir(frozen_store, fingerprint["base_weights_sha256"], n_frozen,
                                     "fast" if spec.fast_kernels else "mlx")
        run.frozen = frozen.FrozenBottom(model, n_frozen, store)
        run.loss_fn = functools.partial(masked_loss, n_frozen=n_frozen)
    args = TrainingArgs(
        batch_size=spec.batch_size, iters=spec.iters - state["step"],
        steps_per_report=spec.steps_per_report, steps_per_eval=spec.iters + 1,
        steps_per_save=spec.iters + 1, max_seq_length=spec.max_seq_length,
        adapter_file=str(work / "last_trainable.safetensors"))
    model.train()
    train(model, optimizer, sets["train"], None, args=args, loss=run.loss_fn,
          iterate_batches=run.iterate_batches, training_callback=run)
    run.after_step(spec.iters)

    secs = state["train_seconds"]
    metrics = {
        "train_version": TRAIN_VERSION, "mode": spec.mode, "spec": spec_key(spec),
        "iters": spec.iters, "base_dir": str(base_dir),
        "base_weights_sha256": fingerprint["base_weights_sha256"], "data_dir": str(data_dir),
        "data_manifest_sha256": file_sha256(manifest) if manifest.is_file() else None,
        "data_sha256": fingerprint["data_sha256"], "blas": blas_in_use(),
        "init_adapter": str(init_adapter) if init_adapter else None,
        "init_adapter_sha256": fingerprint["init_adapter_sha256"],
        "train_losses": state["train_losses"], "valid_losses": state["valid_losses"],
        "final_valid_loss": state["valid_losses"][-1]["loss"] if state["valid_losses"] else None,
        "input_tokens": state["input_tokens"], "trained_tokens": state["trained_tokens"],
        # Input tokens (prompt included) per second of step time; trained = assistant tokens.
        "tokens_per_sec": round(state["input_tokens"] / secs, 1) if secs else None,
        "trained_tokens_per_sec": round(state["trained_tokens"] / secs, 1) if secs else None,
        "train_seconds": round(secs, 3), "resumed_from": state["resumed_from"],
        "trainable_parameters": sum(v.size for _, v in tree_flatten(model.trainable_parameters())),
        "examples": {s: dict(c) for s, c in stats.items()},
        "mix": mix_shares([e.group for e in sets["train"]], run.draws),
        "frozen_cache": None if run.frozen is None else {
            "blocks": run.frozen.n_frozen, "hits": run.frozen.hits, "misses": run.frozen.misses,
            "loaded": run.frozen.loaded, "store": str(store) if store else None,
            "mib": round(run.frozen.nbytes() / 2**20, 1)},
        DROPPED_TOO_LONG: sum(c[DROPPED_TOO_LONG] for c in stats.values()),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_outputs(tmp, model, spec, base_dir, data_dir)
        metrics["wall_seconds"] = round(run.wall_seconds(), 3)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        plot_losses(metrics, tmp / "loss.png")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(work)
    if store is not None:
        frozen.prune(store.parent, int(spec.frozen_store_gib * 2**30))
    return metrics


def train_job(payload: dict[str, Any], progress: ProgressFn | None = None) -> dict[str, Any]:
    """The worker's "train" kind: `train_adapter` with JSON arguments."""
    return train_adapter(payload["base_dir"], payload["data_dir"], payload["out_dir"],
                         TrainSpec.model_validate(payload.get("spec", {})), progress,
                         payload.get("init_adapter"), payload.get("frozen_store"))


def train_in_worker(base_dir: str | Path, data_dir: str | Path, out_dir: str | Path,
                    spec: TrainSpec = TrainSpec(), progress: ProgressFn | None = None,
                    init_adapter: str | Path | None = None,
                    frozen_store: str | Path | None = None) -> dict[str, Any]:
    """`train_adapter` in a child process with the fast BLAS preloaded (see codeadapt.worker)."""
    from codeadapt.worker import run_in_worker

    payload = {"base_dir": str(base_dir), "data_dir": str(data_dir), "out_dir": str(out_dir),
               "spec": spec.model_dump(), "init_adapter": str(init_adapter) if init_adapter else None,
               "frozen_store": str(frozen_store) if frozen_store else None}
    return run_in_worker("train", payload, progress)


def plot_losses(metrics: dict[str, Any], path: Path) -> Path:
    """PNG of the train and valid loss curves in `metrics`."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    for key, label, style in (("train_losses", "train", "-"), ("valid_losses", "valid", "o-")):
        points = metrics.get(key) or []
        if points:
            ax.plot([p["step"] for p in points], [p["loss"] for p in points], style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(f"{metrics.get('mode', '')} · {metrics.get('iters', '?')} iters")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return Path(path)


def is_current(out_dir: str | Path, base_dir: str | Path, data_dir: str | Path, spec: TrainSpec,
               init_adapter: str | Path | None = None) -> bool:
    """True when `out_dir` holds a finished training of exactly these inputs (skip retraining)."""
    m = read_json(Path(out_dir) / "metrics.json")
    if not isinstance(m, dict):  # missing or corrupt: train again
        return False
    files = {s: Path(data_dir) / f"{s}.jsonl" for s in ("train", "valid")}
    data = {f"{s}.jsonl": file_sha256(p) for s, p in files.items() if p.is_file()}
    return (m.get("train_version") == TRAIN_VERSION and m.get("spec") == spec_key(spec)
            and m.get("base_weights_sha256") == weights_sha256(Path(base_dir).resolve())
            and m.get("data_sha256") == data
            and m.get("init_adapter_sha256") == init_sha256(init_adapter))
