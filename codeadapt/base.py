"""A tiny base model built from scratch: a byte-level BPE tokenizer trained on local code, a
Llama-style config, seeded random weights, and our Qwen2.5-style chat template. The output
directory loads with `mlx_lm.load`, so training and evaluation treat it like any downloaded
model."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from codeadapt.fsutil import publish_dir, write_json

BASE_VERSION = "1"  # bump when the files written for the same inputs change

PAD = "<|pad|>"
END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE_START = "<tool_response>"
TOOL_RESPONSE_END = "</tool_response>"
# Ids follow this order: mlx-lm pads batches with id 0, so the pad token must come first.
SPECIAL_TOKENS = (
    PAD,
    END_OF_TEXT,
    IM_START,
    IM_END,
    TOOL_CALL_START,
    TOOL_CALL_END,
    TOOL_RESPONSE_START,
    TOOL_RESPONSE_END,
)
# Like Qwen2.5, the tool tags are single tokens but not "special": decode(skip_special_tokens=True)
# keeps them, so tool calls survive any decoder setting.
TEXT_TOKENS = frozenset({TOOL_CALL_START, TOOL_CALL_END, TOOL_RESPONSE_START, TOOL_RESPONSE_END})
EOS_TOKEN = IM_END

# Qwen2's pre-tokenizer split: single digits (line numbers), punctuation runs, newline runs.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
INFO_FILE = "codeadapt_base.json"


@dataclass(frozen=True, slots=True)
class TinyBaseArgs:
    """Size and seed of a tiny Llama-style base model.

    Args:
        vocab_size: Target tokenizer size, special tokens and the 256 byte symbols included.
            The model's embedding matches the trained tokenizer, which is smaller only when
            the corpus runs out of merges.
        hidden_size: Model width.
        num_hidden_layers: Transformer blocks.
        intermediate_size: SwiGLU MLP width.
        num_attention_heads: Query heads; hidden_size must divide by it.
        num_key_value_heads: Key/value heads (grouped-query attention).
        max_position_embeddings: Longest context the tokenizer config advertises.
        rope_theta: RoPE base; 10k suits short contexts.
        rms_norm_eps: RMSNorm epsilon.
        tie_word_embeddings: Share input embedding and output head (halves vocab weights).
        seed: Seeds the weight initialisation.
    """

    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 4
    intermediate_size: int = 768
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size {self.vocab_size} is below {MIN_VOCAB_SIZE}")
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} does not divide by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("head dimension must be even for RoPE")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} does not divide by "
                f"num_key_value_heads {self.num_key_value_heads}"
            )


def chat_template() -> str:
    """The Qwen2.5-style chat template shipped in codeadapt/templates."""
    return resources.files("codeadapt").joinpath("templates/chat_template.jinja").read_text("utf-8")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """Train a byte-level BPE tokenizer; SPECIAL_TOKENS take ids 0.. in order."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} is below {MIN_VOCAB_SIZE}")
    tok = tokenizers.Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for text in texts:
            seen += 1
            yield text

    tok.train_from_iterator(counted(), trainer=trainer)
    if seen == 0:
        raise ValueError("the tokenizer corpus is empty")
    # The trainer marks all its tokens special; clear the flag on the tool tags (see TEXT_TOKENS).
    data = json.loads(tok.to_str())
    for added in data["added_tokens"]:
        added["special"] = added["content"] not in TEXT_TOKENS
    tok = tokenizers.Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise ValueError(f"special token {t!r} got id {tok.token_to_id(t)}, expected {i}")
    return tok


def model_config(args: TinyBaseArgs, vocab_size: int, eos_ids: list[int]) -> dict[str, Any]:
    """config.json for mlx-lm's (and transformers') llama architecture."""
    # Not qwen2: for model_type qwen2, transformers 5 ignores tokenizer.json's pipeline and
    # rebuilds Qwen2Tokenizer's (NFC normaliser), so ids would differ from `tokenizers`.
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers,
        "intermediate_size": args.intermediate_size,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "max_position_embeddings": args.max_position_embeddings,
        "rope_theta": args.rope_theta,
        "rms_norm_eps": args.rms_norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        # mlx-lm and transformers default this differently; always say it.
        "tie_word_embeddings": args.tie_word_embeddings,
        "bos_token_id": None,
        "eos_token_id": eos_ids,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }


def tokenizer_config(args: TinyBaseArgs) -> dict[str, Any]:
    """tokenizer_config.json: the template embedded, ChatML eos, pad at id 0, no BOS."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": chat_template(),
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": args.max_position_embeddings,
        "errors": "replace",
    }


def init_weights(args: TinyBaseArgs, config: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Seeded random weights for `config` as a flat name → array dict, and the parameter count."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    mx.random.seed(args.seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    return weights, sum(w.size for w in weights.values())


def make_tiny_base(out_dir: Path, corpus: Iterable[str], args: TinyBaseArgs) -> Path:
    """Build the tokenizer, config and random weights into `out_dir`, replacing what is there."""
    import mlx.core as mx

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    stats = {"documents": 0, "characters": 0}

    def hashed() -> Iterator[str]:
        for text in corpus:
            stats["documents"] += 1
            stats["characters"] += len(text)
            digest.update(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
            yield text

    tok = train_tokenizer(hashed(), args.vocab_size)
    vocab_size = tok.get_vocab_size()
    eos_ids = [tok.token_to_id(IM_END), tok.token_to_id(END_OF_TEXT)]
    config = model_config(args, vocab_size, eos_ids)
    weights, n_params = init_weights(args, config)


    def fill(tmp: Path) -> None:
        tok.save(str(tmp / "tokenizer.json"), pretty=True)
        write_json(tmp / "tokenizer_config.json", tokenizer_config(args))
        write_json(tmp / "config.json", config)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        write_json(tmp / INFO_FILE, {
            "base_version": BASE_VERSION,
            "args": asdict(args),
            "vocab_size": vocab_size,
            "parameters": n_params,
            "corpus_sha256": digest.hexdigest(),
            "corpus_documents": stats["documents"],
            "corpus_characters": stats["characters"],
        })

    return publish_dir(out_dir, fill)

