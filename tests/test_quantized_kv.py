"""`kernels.quantized_kv`: an int8 / int4 KV cache and the `"agillm_qkv"` attention that decodes from its codes.

Checked against plain-PyTorch references (fp32):
    - quantization: every state within half a step of its group's range; int4 codes take half a byte per channel;
      the optional HQQ-style offset refinement is never worse than min-max rounding and steps as hqq's own code;
      appending quantizes only the new tokens, into a buffer that is not copied every step;
    - attention over the quantized cache equals softmax attention over the dequantized cache (GQA, one and several
      queries, no mask / boolean mask with left padding / additive mask, a sliding window), int8 and int4, per-head
      and smaller channel groups; the Triton kernel equals the PyTorch path, split or not, and in generation (on
      CPU under `TRITON_INTERPRET=1`, in a subprocess: torch imports triton before a test could set it);
    - a decode step through `"agillm_qkv"` never makes a full-precision tensor the size of a layer's cache (a
      dispatch mode records every floating-point tensor any operation returns; under sdpa, which dequantizes, the
      same probe sees the full cache, so the check can fail);
    - greedy generation with left padding through `QuantizedKVCache` equals generation through a reference cache that
      stores the same rounding in plain PyTorch (`FakeQuantizedLayer`) under sdpa, tokens and scores; int8 greedy
      equals the fp32 cache's greedy output over 20 tokens; other attention implementations read the cache correctly;
    - cache bookkeeping (crop, batch selection, beam reorder) and `ValueError`s on unsupported settings.
"""

import importlib
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers.cache_utils import Cache, DynamicLayer

import kernels
from kernels import quantized_kv
from kernels.quantized_kv import QuantizedKV, QuantizedKVCache, QuantizedKVLayer, dequantize, quantize


INIT_STD = 0.1  # as in test_kv_cache.py: a random tiny model whose greedy output depends on its context
BATCH, KV_HEADS, HEADS, WIDTH = 2, 2, 4, 8  # the tiny model's attention shapes (GQA 4 / 2, head_dim 8)


@pytest.fixture(scope="module", autouse=True)
def registered():
    kernels.enable()
    yield
    kernels.disable()  # the RMSNorm patch must not reach models that later test files load as remote code


def fake_quantize(states: torch.Tensor, nbits: int, group_size: int | None = None) -> torch.Tensor:
    """Plain-PyTorch reference rounding: min-max per token, head and group of channels, no packing."""
    group_size = group_size or states.shape[-1]
    groups = states.float().unflatten(-1, (-1, group_size))
    minimum, maximum = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (maximum - minimum) / (2**nbits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = ((groups - minimum) / scale).round().clamp(0, 2**nbits - 1)
    return (codes * scale + minimum).flatten(-2).to(states.dtype)


def reference_attention(query, keys, values, mask, scaling, sliding_window=None) -> torch.Tensor:
    """Eager softmax attention `[B, Q, H, D]` over full-precision `keys`/`values` `[B, H_kv, T, D]`; no mask means
    causal aligned to the last key (and the window, if any)."""
    repeats = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(repeats, 1), values.repeat_interleave(repeats, 1)
    scores = query @ keys.transpose(-1, -2) * scaling
    q_len, kv_len = scores.shape[-2:]
    if mask is None:
        query_positions = torch.arange(kv_len - q_len, kv_len)[:, None]
        mask = torch.arange(kv_len)[None, :] <= query_positions
        if sliding_window is not None:
            mask &= torch.arange(kv_len)[None, :] > query_positions - sliding_window
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, -math.inf)
    else:
        scores = scores + mask
    return (scores.softmax(-1) @ values).transpose(1, 2)


def filled_layer(nbits, group_size=None, past=37, new=1, width=WIDTH, seed=0):
    """A layer holding `past` random tokens, and the `QuantizedKV` keys/values its update with `new` more returns."""
    generator = torch.Generator().manual_seed(seed)
    layer = QuantizedKVLayer(nbits, group_size)
    layer.update(torch.randn(BATCH, KV_HEADS, past, width, generator=generator),
                 torch.randn(BATCH, KV_HEADS, past, width, generator=generator))  # fmt: skip
    keys, values = layer.update(torch.randn(BATCH, KV_HEADS, new, width, generator=generator),
                                torch.randn(BATCH, KV_HEADS, new, width, generator=generator))  # fmt: skip
    return layer, keys, values


def padded_mask(q_len: int, kv_len: int, pad: int = 5, additive: bool = False) -> torch.Tensor:
    """sdpa-style `[B, 1, Q, T]` mask: causal, the first sequence left-padded by `pad` tokens."""
    mask = torch.ones(BATCH, 1, q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    mask[0, :, :, :pad] = False
    return torch.where(mask, 0.0, torch.finfo(torch.float32).min) if additive else mask


# --------------------------------------------------------------------------------------------------- storage


@pytest.mark.parametrize("nbits, group_size", [(8, None), (4, None), (4, 4), (4, 2)])
def test_quantize_round_trip_is_within_half_a_step(nbits, group_size):
    states = torch.randn(3, 2, 11, WIDTH) * 4
    group_size_used = group_size or WIDTH
    codes, scale, offset = quantize(states, nbits, group_size_used)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == WIDTH * nbits // 8  # int4: two channels per byte
    assert scale.shape[-1] == WIDTH // group_size_used
    restored = dequantize(codes, scale, offset, nbits)
    step = scale.repeat_interleave(group_size_used, dim=-1)
    assert ((restored - states).abs() <= step / 2 + 1e-5).all()
    torch.testing.assert_close(restored, fake_quantize(states, nbits, group_size), rtol=0, atol=1e-6)


def test_refined_offsets_are_never_worse_and_step_like_hqq(make_config):
    """HQQ-style offset refinement: each group's mean absolute error is at most plain min-max rounding's (and lower
    for most groups of outlier-heavy states); one step equals hqq's own `optimize_weights_proximal_legacy_step`."""
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(4, 3, 6, 32, generator=generator) * torch.rand(4, 3, 6, 32, generator=generator).pow(4) * 5
    errors = {}
    for iterations in (0, 20):
        codes, scale, offset = quantize(states, 4, 16, refine_iterations=iterations)
        restored = dequantize(codes, scale, offset, 4)
        errors[iterations] = (restored - states).abs().unflatten(-1, (2, 16)).mean(-1)
    assert (errors[20] <= errors[0] + 1e-7).all()
    assert (errors[20] < errors[0] - 1e-4).float().mean() > 0.5

    hqq_optimize = pytest.importorskip("hqq.core.optimize")
    groups = states.unflatten(-1, (2, 16))
    minimum = groups.amin(-1, keepdim=True)
    scale = (groups.amax(-1, keepdim=True) - minimum) / 15
    restored, offset = quantized_kv.refine_offset_step(groups, scale, minimum, 15)
    hqq_restored, _, hqq_zero, _ = hqq_optimize.optimize_weights_proximal_legacy_step(
        groups, 1 / scale, -minimum / scale, [0, 15], beta=10.0, lp_norm=0.7, axis=-1
    )
    torch.testing.assert_close(restored, hqq_restored, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(offset, -hqq_zero * scale, rtol=1e-5, atol=1e-5)

    layer = QuantizedKVCache(make_config(), nbits=4, group_size=16, refine_zero_points=True).layers[0]
    layer.update(states, states)
    torch.testing.assert_close(layer.quantized_keys.offset, quantize(states, 4, 16, refine_iterations=20)[2])


def test_update_quantizes_only_new_tokens_without_copying_the_cache(monkeypatch):
    quantized_lengths = []
    real_quantize = quantized_kv.quantize
    monkeypatch.setattr(quantized_kv, "quantize", lambda states, *a: quantized_lengths.append(states.shape[-2]) or
                        real_quantize(states, *a))  # fmt: skip
    layer = QuantizedKVLayer(nbits=8)
    prompt = torch.randn(BATCH, KV_HEADS, 10, WIDTH)
    assert layer.update(prompt, prompt)[0] is prompt  # a prefill attends to its exact states
    buffers = []
    for _ in range(6):
        token = torch.randn(BATCH, KV_HEADS, 1, WIDTH)
        keys, values = layer.update(token, token)
        assert isinstance(keys, QuantizedKV) and keys.shape == (BATCH, KV_HEADS, layer.get_seq_length(), WIDTH)
        assert keys.recent is token  # this call's states come back exact
        buffers.append(layer.quantized_keys.codes.data_ptr())
    assert quantized_lengths == [10, 10] + [1, 1] * 6  # keys and values: the prompt once, then one token per step
    assert buffers == [buffers[0]] * 6  # capacity doubled to 20 at the first step, never copied after that


# --------------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("nbits, group_size", [(8, None), (4, None), (4, 4)])
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_attention_equals_reference_on_dequantized_cache(nbits, group_size, q_len, mask_kind):
    _, keys, values = filled_layer(nbits, group_size, new=q_len)
    query = torch.randn(BATCH, HEADS, q_len, WIDTH)
    kv_len = keys.shape[2]
    mask = None if mask_kind == "none" else padded_mask(q_len, kv_len, additive=mask_kind == "additive")
    expected = reference_attention(query, keys.dequantize_all(), values.dequantize_all(), mask, WIDTH**-0.5)
    output = quantized_kv.quantized_attention_torch(query, keys, values, mask, WIDTH**-0.5, tile_size=8)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


def test_attention_applies_the_sliding_window_without_a_mask():
    _, keys, values = filled_layer(8, new=2)
    query = torch.randn(BATCH, HEADS, 2, WIDTH)
    expected = reference_attention(query, keys.dequantize_all(), values.dequantize_all(), None, 0.3, sliding_window=9)
    output = quantized_kv.quantized_attention_torch(query, keys, values, None, 0.3, sliding_window=9, tile_size=8)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


class LargestFloatTensor(TorchDispatchMode):
    """Records the element count of the largest floating-point tensor any operation returns or reads whole: a
    `QuantizedKV` that reaches an operation is read as its full dequantized tensor (built inside its own dispatch,
    where this mode does not look, so it is counted at the door)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        read_whole = [tensor for tensor in tree_flatten((args, kwargs))[0] if isinstance(tensor, QuantizedKV)]
        result = func(*args, **kwargs)
        returned = [tensor for tensor in tree_flatten(result)[0]
                    if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()]  # fmt: skip
        for tensor in read_whole + returned:
            self.largest = max(self.largest, tensor.numel())
        return result


@torch.no_grad()
def test_decode_step_never_builds_a_full_precision_cache(make_model, monkeypatch):
    monkeypatch.setattr(quantized_kv, "TILE_SIZE", 64)
    model = make_model(seed=0, initializer_range=INIT_STD, max_position_embeddings=1024)
    prompt = torch.randint(4, 128, (BATCH, 512), generator=torch.Generator().manual_seed(0))
    layer_cache_numel = BATCH * KV_HEADS * 513 * WIDTH  # one layer's keys after the step, at full precision
    largest = {}
    for implementation in ("agillm_qkv", "sdpa"):
        model.set_attn_implementation(implementation)
        cache = QuantizedKVCache(model.config, nbits=8)
        model(prompt, past_key_values=cache)
        probe = LargestFloatTensor()
        with probe:
            model(prompt[:, -1:], past_key_values=cache)
        largest[implementation] = probe.largest
    assert largest["sdpa"] >= layer_cache_numel  # sdpa reads the cache through its dequantized copy
    assert largest["agillm_qkv"] <= layer_cache_numel // 4  # a tile of 64 tokens is an eighth of it


# --------------------------------------------------------------------------------------------------- generation


class FakeQuantizedLayer(DynamicLayer):
    """Reference cache layer in plain PyTorch: stores each token already rounded (`fake_quantize`), returns the
    earlier tokens rounded and this call's states exact, as `QuantizedKVLayer` does."""

    def __init__(self, nbits: int, group_size: int | None):
        super().__init__()
        self.nbits, self.group_size = nbits, group_size

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(fake_quantize(key_states, self.nbits, self.group_size),
                                      fake_quantize(value_states, self.nbits, self.group_size))  # fmt: skip
        new = key_states.shape[-2]
        return (torch.cat([keys[..., :-new, :], key_states], dim=-2),
                torch.cat([values[..., :-new, :], value_states], dim=-2))  # fmt: skip


@pytest.fixture
def model(make_model):
    return make_model(seed=0, initializer_range=INIT_STD)


@pytest.fixture
def padded_prompt():
    prompt = torch.randint(4, 128, (BATCH, 10), generator=torch.Generator().manual_seed(100))
    attention_mask = torch.ones_like(prompt)
    attention_mask[0, :3] = 0  # the first sequence is left-padded
    return prompt, attention_mask


def greedy(model, prompt, attention_mask, cache, new_tokens=8):
    return model.generate(prompt, attention_mask=attention_mask, past_key_values=cache, max_new_tokens=new_tokens,
                          do_sample=False, output_scores=True, return_dict_in_generate=True)  # fmt: skip


@pytest.mark.parametrize("nbits, group_size", [(8, None), (4, None), (4, 4)])
def test_generation_equals_plain_pytorch_reference(model, padded_prompt, nbits, group_size):
    prompt, attention_mask = padded_prompt
    model.set_attn_implementation("sdpa")
    layers = [FakeQuantizedLayer(nbits, group_size) for _ in range(model.config.num_hidden_layers)]
    expected = greedy(model, prompt, attention_mask, Cache(layers=layers))
    model.set_attn_implementation("agillm_qkv")
    result = greedy(model, prompt, attention_mask, QuantizedKVCache(model.config, nbits, group_size))
    torch.testing.assert_close(result.sequences, expected.sequences, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(result.scores), torch.stack(expected.scores), rtol=1e-4, atol=1e-4)


def test_int8_greedy_equals_fp32_cache_greedy(model, padded_prompt):
    """Measured on seed 0: int8 and int4 (per-head groups) both equal the fp32 cache over 20 tokens; int4 is only
    held to the plain-PyTorch reference above, as a flipped near-tie changes the rest of a continuation."""
    prompt, attention_mask = padded_prompt
    fp32 = greedy(model, prompt, attention_mask, None, new_tokens=20)
    model.set_attn_implementation("agillm_qkv")
    int8 = greedy(model, prompt, attention_mask, QuantizedKVCache(model.config, nbits=8), new_tokens=20)
    torch.testing.assert_close(int8.sequences, fp32.sequences, rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_other_attention_implementations_read_the_dequantized_cache(model, padded_prompt, implementation):
    prompt, attention_mask = padded_prompt
    logits = {}
    for name in ("agillm_qkv", implementation):
        model.set_attn_implementation(name)
        cache = QuantizedKVCache(model.config, nbits=4)
        model(prompt[:, :7], attention_mask=attention_mask[:, :7], past_key_values=cache)
        logits[name] = model(prompt[:, 7:], attention_mask=attention_mask, past_key_values=cache).logits
    torch.testing.assert_close(logits["agillm_qkv"], logits[implementation], rtol=1e-5, atol=1e-5)


def test_sliding_window_model_matches_reference(make_model, padded_prompt):
    """A sliding layer keeps every token here; its window comes from the mask."""
    model = make_model(seed=0, initializer_range=INIT_STD, layer_types=["sliding_attention", "full_attention"],
                       sliding_window=4)  # fmt: skip
    prompt, attention_mask = padded_prompt
    layers = [FakeQuantizedLayer(8, None) for _ in range(2)]
    expected = greedy(model, prompt, attention_mask, Cache(layers=layers))
    model.set_attn_implementation("agillm_qkv")
    result = greedy(model, prompt, attention_mask, QuantizedKVCache(model.config, 8))
    torch.testing.assert_close(result.sequences, expected.sequences, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(result.scores), torch.stack(expected.scores), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------- bookkeeping


def test_crop_select_and_reorder_act_on_codes():
    layer, keys, _ = filled_layer(4, past=9, new=1)
    states = keys.dequantize_all()[:, :, :9]  # the first nine tokens as stored
    layer.crop(-3)
    assert layer.get_seq_length() == 7
    layer.reorder_cache(torch.tensor([1, 0]))
    layer.batch_select_indices(torch.tensor([0]))
    token = torch.randn(1, KV_HEADS, 1, WIDTH)
    cropped, _ = layer.update(token, token)
    torch.testing.assert_close(cropped.dequantize_all()[:, :, :7], states[1:, :, :7], rtol=0, atol=0)
    layer.batch_repeat_interleave(3)
    assert layer.quantized_keys.codes.shape[0] == 3 and layer.get_seq_length() == 8


def test_unsupported_settings_raise(model):
    with pytest.raises(ValueError, match="nbits"):
        QuantizedKVLayer(nbits=3)
    with pytest.raises(ValueError, match="group_size"):
        QuantizedKVLayer(8, group_size=3).update(torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8))
    with pytest.raises(ValueError, match="even"):
        QuantizedKVLayer(4).update(torch.randn(1, 1, 2, 7), torch.randn(1, 1, 2, 7))
    _, keys, values = filled_layer(8)
    attention = model.model.layers[0].self_attn.train()
    with pytest.raises(ValueError, match="dropout"):
        quantized_kv.quantized_kv_attention(attention, torch.randn(BATCH, HEADS, 1, WIDTH), keys, values, None,
                                            dropout=0.1)  # fmt: skip


# --------------------------------------------------------------------------------------------------- Triton


def triton_runs_here() -> bool:
    """Triton kernels run in this process on a GPU, or on CPU when `TRITON_INTERPRET=1` was set before triton was
    first imported (torch imports it early, so the CPU runs happen in a subprocess started with it set)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


needs_triton = pytest.mark.skipif(not triton_runs_here(),
                                  reason="no GPU, TRITON_INTERPRET unset: run by the subprocess test")  # fmt: skip


@pytest.fixture
def triton_kernel():
    return importlib.import_module("kernels.triton_quantized_kv")


def test_kernels_run_under_the_triton_interpreter_in_a_subprocess():
    """Runs this file's `test_triton_*` tests in a fresh interpreter with `TRITON_INTERPRET=1` (CPU CI)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if triton_runs_here():
        pytest.skip("the Triton tests run in this process")
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", __file__, "-k", "test_triton_"]  # pyproject's addopts: -q, -ra
    run = subprocess.run(command, cwd=Path(__file__).parent.parent, env=environment, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert re.search(rf"\b{TRITON_TEST_COUNT} passed\b", summary) and "skipped" not in summary, summary


# (nbits, group_size, width, mask kind): widths 8 (broadcast products) and 32 (`tl.dot`), every mask kind
TRITON_KERNEL_CASES = [(4, 4, 8, "none"), (4, 4, 8, "bool"), (4, 4, 8, "additive"), (8, None, 8, "bool"),
                       (4, None, 8, "none"), (8, None, 32, "bool"), (4, 8, 32, "additive")]  # fmt: skip
TRITON_TEST_COUNT = len(TRITON_KERNEL_CASES) + 2


@needs_triton
@pytest.mark.parametrize("nbits, group_size, width, mask_kind", TRITON_KERNEL_CASES)
def test_triton_kernel_equals_pytorch_path(triton_kernel, nbits, group_size, width, mask_kind):
    q_len = 2
    _, keys, values = filled_layer(nbits, group_size, new=q_len, width=width)
    query = torch.randn(BATCH, HEADS, q_len, width)
    mask = None if mask_kind == "none" else padded_mask(q_len, keys.shape[2], additive=mask_kind == "additive")
    expected = quantized_kv.quantized_attention_torch(query, keys, values, mask, 0.3)
    output = quantized_kv.quantized_attention_torch(query, keys, values, mask, 0.3, use_triton=True)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_splits_merge_to_one_pass(triton_kernel):
    """37 quantized tokens in tiles of 16 (a ragged last tile) in one pass and in 3 splits merged by log-sum-exp."""
    q_len = 2
    _, keys, values = filled_layer(4, 4, new=q_len)
    query = torch.randn(BATCH, HEADS, q_len, WIDTH)
    mask = padded_mask(q_len, keys.shape[2])
    rows = quantized_kv.group_queries(query * 0.3, KV_HEADS)
    grouped_mask = quantized_kv.group_mask(mask, KV_HEADS, HEADS // KV_HEADS)
    arguments = (rows, keys, values, grouped_mask, q_len, keys.shape[2], None)
    single, single_lse = triton_kernel.quantized_attention_triton(*arguments, block_n=16, num_splits=1)
    split, split_lse = triton_kernel.quantized_attention_triton(*arguments, block_n=16, num_splits=3)
    torch.testing.assert_close(split, single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split_lse, single_lse, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_path_generation_equals_pytorch_path(triton_kernel, model, padded_prompt):
    prompt, attention_mask = padded_prompt
    model.set_attn_implementation("agillm_qkv")
    expected = greedy(model, prompt, attention_mask, QuantizedKVCache(model.config, 4), new_tokens=6)
    quantized_kv.use_triton(True)
    try:
        result = greedy(model, prompt, attention_mask, QuantizedKVCache(model.config, 4), new_tokens=6)
    finally:
        quantized_kv.use_triton(None)
    torch.testing.assert_close(result.sequences, expected.sequences, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(result.scores), torch.stack(expected.scores), rtol=1e-4, atol=1e-4)
