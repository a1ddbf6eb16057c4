"""The tiny base model: files mlx-lm loads, the chat template, tool parsing, loss masking.

Regenerate the golden file with CODEADAPT_UPDATE_GOLDEN=1 after an intended template change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import MICRO_BASE

from codeadapt import base, chat

GOLDEN = Path(__file__).parent / "golden" / "chat_template_example.txt"
TINY = base.TinyBaseArgs(**MICRO_BASE)


def _corpus() -> list[str]:
    pkg = Path(importlib.util.find_spec("flask").origin).parent
    return [p.read_text("utf-8") for p in sorted(pkg.glob("*.py"))[:6]]


def _example() -> dict[str, Any]:
    return {
        "messages": [
            chat.system("flask"),
            chat.user("Where is the Flask class defined?"),
            chat.tool_call("call_1", "grep", {"pattern": "^class Flask\\b", "glob": "*.py"}),
            chat.tool_result("call_1", "grep", "src/flask/app.py:109:class Flask(App):"),
            chat.assistant("`Flask` is defined in src/flask/app.py at line 109."),
        ],
        "tools": list(chat.tool_schemas()),
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return base.make_tiny_base(tmp_path_factory.mktemp("base") / "tiny", _corpus(), TINY)


@pytest.fixture(scope="module")
def loaded(built: Path) -> tuple[Any, Any]:
    import mlx_lm

    return mlx_lm.load(str(built))


def _trained_ids(tokenizer: Any, example: dict[str, Any]) -> list[int]:
    """Target ids that mlx-lm's default loss counts for one example with mask_prompt=True."""
    import mlx.core as mx
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import iterate_batches

    dataset = CacheDataset(ChatDataset([example], tokenizer, mask_prompt=True))
    batch, lengths = next(iterate_batches(dataset, 1, 4096))
    targets = batch[:, 1:]
    # Same mask as mlx_lm.tuner.trainer.default_loss.
    steps = mx.arange(1, targets.shape[1] + 1)
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
    return [t for t, m in zip(targets[0].tolist(), mask[0].tolist()) if m]


def test_output_dir_files_and_config(built: Path) -> None:
    assert sorted(p.name for p in built.iterdir()) == sorted(
        [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            base.INFO_FILE,
        ]
    )
    config = json.loads((built / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["vocab_size"] == 512
    tok_config = json.loads((built / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == base.chat_template()
    assert (tok_config["eos_token"], tok_config["pad_token"]) == ("<|im_end|>", "<|pad|>")
    info = json.loads((built / base.INFO_FILE).read_text())
    assert info["base_version"] == base.BASE_VERSION
    assert info["corpus_documents"] == len(_corpus())
    assert not [p for p in built.parent.iterdir() if p.name.startswith(".") and p.name != ".locks"]  # no temp dirs left


def test_special_tokens_are_single_ids_and_pad_is_zero(built: Path, loaded: tuple) -> None:
    _, tokenizer = loaded
    for i, token in enumerate(base.SPECIAL_TOKENS):
        assert tokenizer.encode(token, add_special_tokens=False) == [i]
        assert tokenizer.encode(f"x{token}y", add_special_tokens=False)[1] == i
    assert tokenizer.pad_token_id == 0 and tokenizer.bos_token is None
    assert tokenizer.convert_ids_to_tokens(0) == "<|pad|>"
    assert tokenizer.eos_token_ids == {3, 1}  # <|im_end|>, <|endoftext|>
    # Tool tags are not "special": skip_special_tokens must not eat a tool call.
    ids = tokenizer.encode('<tool_call>\n{"a": 1}\n</tool_call><|im_end|>')
    assert tokenizer.decode(ids, skip_special_tokens=True) == '<tool_call>\n{"a": 1}\n</tool_call>'


def test_transformers_tokenizer_matches_tokenizer_json(built: Path, loaded: tuple) -> None:
    # Regression: with model_type qwen2, transformers 5 rebuilt the pipeline with NFC.
    import tokenizers

    _, tokenizer = loaded
    raw = tokenizers.Tokenizer.from_file(str(built / "tokenizer.json"))
    text = "def café(x):\n    return x + 123  # cafe\u0301 <tool_call>\n"
    assert tokenizer.encode(text) == raw.encode(text).ids
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_loads_and_generates(loaded: tuple) -> None:
    import mlx_lm

    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template(
        [chat.user("hello")], add_generation_prompt=True, return_dict=False
    )
    text = mlx_lm.generate(model, tokenizer, prompt, max_tokens=4)
    assert isinstance(text, str)


def test_chat_template_golden(loaded: tuple) -> None:
    _, tokenizer = loaded
    ex = _example()
    text = tokenizer.apply_chat_template(ex["messages"], tools=ex["tools"], tokenize=False)
    if os.environ.get("CODEADAPT_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
    assert text == GOLDEN.read_text(encoding="utf-8")


def test_string_arguments_render_as_is(loaded: tuple) -> None:
    _, tokenizer = loaded
    ex = _example()
    as_string = json.loads(json.dumps(ex["messages"]))
    fn = as_string[2]["tool_calls"][0]["function"]
    fn["arguments"] = json.dumps(fn["arguments"])

    def render(messages: list[dict[str, Any]]) -> str:
        return tokenizer.apply_chat_template(messages, tools=ex["tools"], tokenize=False)

    assert render(as_string) == render(ex["messages"])


def test_generation_prompt_and_no_tools(loaded: tuple) -> None:
    _, tokenizer = loaded
    text = tokenizer.apply_chat_template(
        [chat.user("hi")], add_generation_prompt=True, tokenize=False
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_mlx_lm_detects_json_tool_parser_and_parses_a_call(loaded: tuple) -> None:
    from mlx_lm.generate import make_text_state_machine

    _, tokenizer = loaded
    assert tokenizer.has_tool_calling
    assert (tokenizer.tool_call_start, tokenizer.tool_call_end) == ("<tool_call>", "</tool_call>")
    # Stream a completion the way mlx_lm.server does: detokenize, split states, parse "tool" text.
    ex = _example()
    call = ex["messages"][2]["tool_calls"][0]["function"]
    completion = tokenizer.apply_chat_template(
        ex["messages"][:3], tools=ex["tools"], tokenize=False
    )
    completion = completion.rsplit("<|im_start|>assistant\n", 1)[1].removesuffix("<|im_end|>\n")
    machine = make_text_state_machine(tokenizer)
    state = machine.make_state()
    detok = tokenizer.detokenizer
    detok.reset()
    tool_text = ""
    for token in tokenizer.encode(completion, add_special_tokens=False):
        detok.add_token(token)
        state, segments = machine.split(state, detok.last_segment)
        tool_text += "".join(t for s, t in segments if s == "tool")
    assert tokenizer.tool_parser(tool_text, ex["tools"]) == {
        "name": call["name"],
        "arguments": call["arguments"],
    }


def test_mask_prompt_trains_only_the_last_assistant_message(loaded: tuple) -> None:
    # mlx-lm's ChatDataset(mask_prompt=True) masks everything before the final message, so the
    # intermediate tool-call turn is never trained. It also trains one pad target (id 0).
    _, tokenizer = loaded
    ex = _example()
    trained = _trained_ids(tokenizer, ex)
    answer = ex["messages"][-1]["content"]
    assert tokenizer.decode(trained) == f"{answer}<|im_end|>\n<|pad|>"
    assert base.SPECIAL_TOKENS.index("<tool_call>") not in trained


def test_prefix_ending_at_a_tool_call_trains_that_call(loaded: tuple) -> None:
    # The way to train tool calls with stock mlx-lm: one record per assistant turn.
    _, tokenizer = loaded
    ex = _example()
    prefix = {"messages": ex["messages"][:3], "tools": ex["tools"]}
    trained = tokenizer.decode(_trained_ids(tokenizer, prefix))
    assert trained == (
        '<tool_call>\n{"name": "grep", "arguments": {"pattern": "^class Flask\\\\b", '
        '"glob": "*.py"}}\n</tool_call><|im_end|>\n<|pad|>'
    )


def test_prompt_tokens_are_a_prefix_of_the_full_example(loaded: tuple) -> None:
    # mask_prompt's offset is only right if the prompt tokenizes to a prefix of the full text.
    _, tokenizer = loaded
    ex = _example()
    for end in (3, 5):
        msgs = ex["messages"][:end]
        full = tokenizer.apply_chat_template(msgs, tools=ex["tools"], return_dict=False)
        prompt = tokenizer.apply_chat_template(
            msgs[:-1], tools=ex["tools"], add_generation_prompt=True, return_dict=False
        )
        assert full[: len(prompt)] == prompt


def test_same_corpus_and_seed_build_identical_files(built: Path, tmp_path: Path) -> None:
    again = base.make_tiny_base(tmp_path / "again", _corpus(), TINY)
    for name in ("tokenizer.json", "model.safetensors", "config.json", base.INFO_FILE):
        assert _sha256(again / name) == _sha256(built / name), name
    other = base.make_tiny_base(tmp_path / "other", _corpus(), dataclasses.replace(TINY, seed=1))
    assert _sha256(other / "tokenizer.json") == _sha256(built / "tokenizer.json")
    assert _sha256(other / "model.safetensors") != _sha256(built / "model.safetensors")


def test_rebuild_replaces_existing_dir(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    base.make_tiny_base(out, _corpus()[:2], TINY)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != ".locks"] == ["tiny"]


def test_train_tokenizer_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        base.train_tokenizer(iter([]), 512)
    with pytest.raises(ValueError, match="vocab_size"):
        base.train_tokenizer(["x"], 100)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"vocab_size": 10}, "vocab_size"),
        ({"hidden_size": 30}, "num_attention_heads"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ],
)
def test_args_validation(changes: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        base.TinyBaseArgs(**changes)
