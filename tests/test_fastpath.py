"""codeadapt.models.fastpath: the training-only attention and SwiGLU must compute what mlx does
(values and gradients), and install()/uninstall() must patch only the cache-free prompt path
of mlx-lm's llama/qwen2 modules and then restore them exactly."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import MICRO_BASE

from codeadapt.models import fastpath


def _stock() -> tuple[Any, Any]:
    """mlx-lm's own attention and SwiGLU, which the model modules import by name."""
    from mlx_lm.models import activations, base

    return base.scaled_dot_product_attention, activations.swiglu


def _assert_unpatched() -> None:
    sdpa, act = _stock()
    for name in fastpath.MODULES:
        mod = importlib.import_module(name)
        assert mod.scaled_dot_product_attention is sdpa, name
        assert mod.swiglu is act, name


@pytest.fixture
def unpatched() -> Iterator[None]:
    """Starts and ends with mlx-lm unpatched, whatever the test does in between."""
    fastpath.uninstall()  # e.g. an in-process train_adapter of another test module installed it
    _assert_unpatched()
    yield
    fastpath.uninstall()
    _assert_unpatched()


def _qkv(b: int, h: int, hk: int, n: int, d: int, seed: int) -> tuple[Any, Any, Any]:
    keys = mx.random.split(mx.random.key(seed), 3)
    return (mx.random.normal((b, h, n, d), key=keys[0]), mx.random.normal((b, hk, n, d), key=keys[1]),
            mx.random.normal((b, hk, n, d), key=keys[2]))


# (heads, kv heads, length, block): GQA with a length that is not a multiple of the block, one
# shorter than the block, an exact multiple, one row, plain multi-head, and the default block.
SHAPES = [(4, 2, 11, 4), (4, 2, 3, 4), (4, 1, 8, 4), (4, 2, 1, 4), (2, 2, 9, 4),
          (4, 2, 150, fastpath.BLOCK)]


@pytest.mark.parametrize("h, hk, n, block", SHAPES)
def test_causal_attention_matches_mlx_values_and_gradients(h: int, hk: int, n: int, block: int) -> None:
    """Asserts: out and d(out·w)/d(q, k, v) equal mx.fast.scaled_dot_product_attention(mask="causal")
    to 1e-5."""
    q, k, v = _qkv(2, h, hk, n, 8, seed=n + 7 * h + hk)
    scale = 8 ** -0.5
    w = mx.random.normal(q.shape, key=mx.random.key(99))

    def ours(q: Any, k: Any, v: Any) -> Any:
        return fastpath.causal_attention(q, k, v, scale, block)

    def ref(q: Any, k: Any, v: Any) -> Any:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")

    got, want = ours(q, k, v), ref(q, k, v)
    assert got.shape == want.shape == q.shape and got.dtype == want.dtype
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item(), mx.abs(got - want).max().item()
    g_ours = mx.grad(lambda *a: (ours(*a) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    g_ref = mx.grad(lambda *a: (ref(*a) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_ours, g_ref):
        assert mx.all(mx.isfinite(a)).item(), name
        assert mx.allclose(a, b, rtol=1e-5, atol=1e-5).item(), (name, mx.abs(a - b).max().item())


def test_causal_attention_is_causal() -> None:
    """Asserts: changing the last position's keys/values leaves every earlier output unchanged."""
    q, k, v = _qkv(1, 4, 2, 10, 8, seed=3)
    out = fastpath.causal_attention(q, k, v, 0.5, block=4)
    k2 = mx.concatenate([k[:, :, :-1], k[:, :, -1:] + 5], axis=2)
    v2 = mx.concatenate([v[:, :, :-1], v[:, :, -1:] - 5], axis=2)
    out2 = fastpath.causal_attention(q, k2, v2, 0.5, block=4)
    assert mx.array_equal(out[:, :, :-1], out2[:, :, :-1]).item()
    assert not mx.allclose(out[:, :, -1], out2[:, :, -1]).item()


def test_swiglu_matches_silu_times_x() -> None:
    """Asserts: swiglu(g, x) and its gradients equal nn.silu(g) * x's (1e-5) over gates from -30
    to 30."""
    g = mx.linspace(-30, 30, 241).reshape(1, -1)
    x = mx.random.normal(g.shape, key=mx.random.key(1))
    got, want = fastpath.swiglu(g, x), nn.silu(g) * x
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-6).item(), mx.abs(got - want).max().item()
    g_ours = mx.grad(lambda g, x: fastpath.swiglu(g, x).sum(), argnums=(0, 1))(g, x)
    g_ref = mx.grad(lambda g, x: (nn.silu(g) * x).sum(), argnums=(0, 1))(g, x)
    for a, b in zip(g_ours, g_ref):
        assert mx.allclose(a, b, rtol=1e-5, atol=1e-6).item(), mx.abs(a - b).max().item()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_swiglu_gradient_is_finite_for_very_negative_gates(dtype: str) -> None:
    """Asserts: for gates far below zero (2^(-g·log2 e) overflows: g < -89 in float32/bfloat16,
    g < -11 in float16) swiglu is ~0 with a finite gradient equal to silu's, not NaN: one NaN
    gradient would poison the whole LoRA/Adam state."""
    dt = getattr(mx, dtype)
    g = mx.array([-1000.0, -200.0, -100.0, -90.0, -20.0, -12.0, -1.0, 0.0, 3.0], dtype=dt)
    x = mx.ones_like(g)
    assert mx.allclose(fastpath.swiglu(g, x).astype(mx.float32),
                       (nn.silu(g) * x).astype(mx.float32), rtol=1e-2, atol=1e-3).item()
    grad = mx.grad(lambda g: fastpath.swiglu(g, x).sum())(g)
    ref = mx.grad(lambda g: (nn.silu(g) * x).sum())(g)
    assert mx.all(mx.isfinite(grad)).item(), grad.tolist()
    assert mx.allclose(grad.astype(mx.float32), ref.astype(mx.float32), rtol=2e-2, atol=1e-3).item()


def _micro_llama(seed: int = 0) -> Any:
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", rms_norm_eps=1e-6, tie_word_embeddings=True,
                           **{k: v for k, v in MICRO_BASE.items() if k != "max_position_embeddings"})
    mx.random.seed(seed)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def test_install_keeps_prompt_logits_and_the_cache_path_uses_mlx(unpatched: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Asserts: install() puts a wrapper (not mlx-lm's function) into llama and qwen2; a cache-free
    forward pass through it matches the unpatched logits to 1e-4 without calling mlx-lm's
    attention; a forward pass with a KV cache calls mlx-lm's attention in every layer and gives
    the unpatched logits (1e-5; only swiglu differs there); uninstall() restores what install()
    found."""
    from mlx_lm.models import llama
    from mlx_lm.models.cache import make_prompt_cache

    model = _micro_llama()
    prompt = mx.array([[2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 3]])
    before = model(prompt)
    cache = make_prompt_cache(model)
    before_cached = [model(prompt[:, :6], cache=cache), model(prompt[:, 6:], cache=cache)]
    mx.eval(before, before_cached)

    stock_sdpa, _ = _stock()
    calls: list[tuple[Any, str]] = []

    def spy(q: Any, k: Any, v: Any, cache: Any, scale: float, mask: Any, sinks: Any = None) -> Any:
        calls.append((cache, mask if isinstance(mask, str) else type(mask).__name__))
        return stock_sdpa(q, k, v, cache, scale=scale, mask=mask, sinks=sinks)

    # A fresh record of originals, so install() captures the spy as llama's original.
    monkeypatch.setattr(fastpath, "_ORIGINAL", {})
    monkeypatch.setattr(llama, "scaled_dot_product_attention", spy)
    assert sorted(fastpath.install()) == sorted(fastpath.MODULES)
    for name in fastpath.MODULES:
        mod = importlib.import_module(name)
        assert mod.scaled_dot_product_attention not in (spy, stock_sdpa), name
        assert mod.swiglu is fastpath.swiglu, name

    after = model(prompt)
    assert calls == []  # the prompt without a cache took causal_attention
    assert mx.allclose(after, before, rtol=1e-4, atol=1e-4).item(), mx.abs(after - before).max().item()

    cache = make_prompt_cache(model)
    after_cached = [model(prompt[:, :6], cache=cache), model(prompt[:, 6:], cache=cache)]
    assert len(calls) == 2 * MICRO_BASE["num_hidden_layers"]  # 2 calls x each layer
    assert all(c is not None for c, _ in calls)
    for a, b in zip(after_cached, before_cached):
        assert mx.allclose(a, b, rtol=1e-5, atol=1e-5).item()
    fastpath.uninstall()
    assert llama.scaled_dot_product_attention is spy  # uninstall restores what install found


def test_install_is_idempotent_and_uninstall_restores_mlx_lm(unpatched: None) -> None:
    """Asserts: two install() calls wrap mlx-lm's function (not the first wrapper), the cache path
    of the wrapper returns exactly what mlx-lm's function returns, and uninstall() restores mlx-lm's
    objects in both modules."""
    from mlx_lm.models import llama
    from mlx_lm.models.cache import KVCache

    stock_sdpa, stock_act = _stock()
    fastpath.install()
    first = llama.scaled_dot_product_attention
    fastpath.install()
    assert fastpath._ORIGINAL["mlx_lm.models.llama"] == (stock_sdpa, stock_act)
    wrapper = llama.scaled_dot_product_attention
    assert wrapper is not stock_sdpa and first is not stock_sdpa

    q, k, v = _qkv(1, 4, 2, 6, 8, seed=5)
    cache = KVCache()
    k, v = cache.update_and_fetch(k, v)
    got = wrapper(q, k, v, cache=cache, scale=0.3, mask="causal")
    want = stock_sdpa(q, k, v, cache=cache, scale=0.3, mask="causal")
    assert mx.array_equal(got, want).item()
    # Without a cache: the block kernel, equal to mlx to float rounding.
    got = wrapper(q, k, v, cache=None, scale=0.3, mask="causal")
    want = stock_sdpa(q, k, v, cache=None, scale=0.3, mask="causal")
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item()
    fastpath.uninstall()
    _assert_unpatched()


def _masks(b: int, n: int, m: int) -> list[Any]:
    """mlx-lm's mask forms: none, "causal", boolean (padding-style, per batch row) and additive."""
    keys = mx.random.split(mx.random.key(n * 31 + m), 3)
    allowed = mx.random.uniform(shape=(b, 1, n, m), key=keys[0]) > 0.3
    allowed = mx.concatenate([allowed[..., :-1], mx.ones((b, 1, n, 1), dtype=mx.bool_)], axis=-1)
    square = mx.random.uniform(shape=(n, m), key=keys[1]) > 0.2
    square = mx.concatenate([square[:, :-1], mx.ones((n, 1), dtype=mx.bool_)], axis=-1)
    return [None, "causal", allowed, square, mx.random.normal((b, 1, n, m), key=keys[2])]


# (batch, heads, kv heads, queries, keys): a prompt chunk after a cache, one decode step, a
# prompt without a cache, plain multi-head.
CACHED_SHAPES = [(1, 9, 3, 5, 20), (2, 4, 2, 1, 7), (3, 4, 1, 6, 6), (2, 4, 4, 3, 9)]


@pytest.mark.parametrize("b, h, hk, n, m", CACHED_SHAPES)
def test_masked_attention_matches_mlx_for_every_mask_form(b: int, h: int, hk: int, n: int, m: int) -> None:
    """Asserts: masked_attention equals mx.fast.scaled_dot_product_attention (1e-5) with no mask,
    "causal" (queries are the last n of m positions), a per-row boolean mask, a square boolean
    mask and an additive mask, for GQA and plain multi-head shapes."""
    ks = mx.random.split(mx.random.key(b + 10 * n + 100 * m), 3)
    q, k, v = (mx.random.normal((b, h, n, 8), key=ks[0]), mx.random.normal((b, hk, m, 8), key=ks[1]),
               mx.random.normal((b, hk, m, 8), key=ks[2]))
    for mask in _masks(b, n, m):
        got = fastpath.masked_attention(q, k, v, 0.3, mask)
        want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
        assert got.shape == want.shape
        assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item(), (mask if isinstance(mask, str)
                                                                      else type(mask), mx.abs(got - want).max().item())


def test_masked_attention_keeps_fully_masked_rows_finite() -> None:
    """Asserts: a query row whose keys are all masked (left padding in a batch) comes out finite,
    and the other rows are unchanged by it."""
    q, k, v = _qkv(1, 4, 2, 4, 8, seed=11)
    mask = mx.array([[False] * 4, [True, False, False, False], [True, True, False, False],
                     [True, True, True, True]])
    out = fastpath.masked_attention(q, k, v, 0.5, mask)
    assert mx.all(mx.isfinite(out)).item()
    want = mx.fast.scaled_dot_product_attention(q[:, :, 1:], k, v, scale=0.5, mask=mask[1:])
    assert mx.allclose(out[:, :, 1:], want, rtol=1e-5, atol=1e-5).item()


def test_cached_install_routes_generation_through_the_fast_kernel(unpatched: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Asserts: after install(cached=True) a prompt split over a KV cache and mlx-lm's
    BatchGenerator (two prompts of different lengths: left-padding masks) go through
    masked_attention, with the unpatched logits (1e-4) and the same greedy completions."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models.cache import make_prompt_cache

    model = _micro_llama(seed=4)
    prompt = mx.array([[2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 3]])

    def cached_logits() -> Any:
        cache = make_prompt_cache(model)
        out = [model(prompt[:, :6], cache=cache), model(prompt[:, 6:], cache=cache)]
        return mx.concatenate(out, axis=1)

    def greedy() -> list[list[int]]:
        gen = BatchGenerator(model, stop_tokens=[[1]], completion_batch_size=2)
        uids = gen.insert([[2, 40, 41, 42, 43, 44, 45], [2, 50, 51]], [12, 12])
        outs: dict[int, list[int]] = {u: [] for u in uids}
        while responses := gen.next_generated():
            for r in responses:
                outs[r.uid].append(r.token)
        gen.close()
        return [outs[u] for u in uids]

    before, before_tokens = cached_logits(), greedy()
    masks: list[Any] = []
    kernel = fastpath.masked_attention

    def spy(q: Any, k: Any, v: Any, scale: float, mask: Any) -> Any:
        masks.append(mask if mask is None or isinstance(mask, str) else mask.dtype)
        return kernel(q, k, v, scale, mask)

    monkeypatch.setattr(fastpath, "masked_attention", spy)
    fastpath.install(cached=True)
    after, after_tokens = cached_logits(), greedy()
    assert "causal" in masks and mx.bool_ in masks  # a cached prompt chunk; padded batch steps
    assert mx.allclose(after, before, rtol=1e-4, atol=1e-4).item(), mx.abs(after - before).max().item()
    assert after_tokens == before_tokens and all(before_tokens)
