"""Quantised KV cache at generate time (int8 and int4, HQQ backend) and `bench.kv_cache.cache_bytes`.

AGILLM needs no code of its own for this: `generate(cache_implementation="quantized", cache_config={"backend": "hqq",
"nbits": 8 | 4, ...})` builds transformers' `QuantizedCache` of `HQQQuantizedLayer`s, which quantises the states
group-wise (HQQ: min-max scale, refined zero-point, int4 packed two per byte) and keeps the newest tokens in a
full-precision residual window. Checked here on a tiny random model:
    - int8 greedy output equals the dynamic cache's; int8 and int4 logits stay within bounds measured over 20 seeds;
    - the dequantised cache lies within half a quantisation step of the exact keys and values;
    - `cache_bytes` equals the storage the shapes imply, for the dynamic, int8 and int4 caches;
    - bad `nbits` and sliding-window layers (which `QuantizedCache` cannot hold) raise `ValueError`.
And the scoring of `bench.kv_table` (perplexity read through a cache):
    - through the fp32 dynamic cache it equals a plain full forward's loss on the same tokens;
    - replaying one prefill's K/V into a cache gives exactly what a prefill forward through that cache gives, for
      every cache kind, and the quantised caches do change the scores;
    - the bf16-storage layer holds bfloat16 and returns the new states exact;
    - the KIVI layer groups keys per channel over tokens (within half a step of that range), values per token, and
      rejects flushes that are not whole token groups; HQQ groups that do not divide the cached widths (MLA) raise.
"""

import pytest
import torch
from torch.testing._internal.two_tensor import TwoTensor
from transformers import DynamicCache, QuantizedCache
from transformers.cache_utils import DummyLayer, HQQQuantizedLayer

from bench.kv_cache import cache_bytes, cache_bytes_per_token
from bench.kv_table import (
    CACHE_DESCRIPTIONS,
    Bf16StorageLayer,
    KiviKeysHQQLayer,
    Plan,
    exact_prefix_cache,
    make_cache,
    replay_prefix,
    score_continuation,
)


# With the default std of 0.02 a random tiny model's greedy output ignores its context (it repeats one or two
# tokens whatever the cache holds, so even a 2-bit cache "agrees"); 0.1 makes the logits depend on the cached states.
INIT_STD = 0.1
BATCH, PROMPT_LEN, NEW_TOKENS = 2, 10, 12
RESIDUAL_LENGTH = 4  # small, so that the 11 decode steps flush the residual window into the quantised states twice


def quantized_cache_config(config, nbits: int) -> dict:
    """`cache_config` for `generate`: HQQ groups along the channels of one head (axis 1, one group per head and
    token), so any sequence length splits into whole groups; transformers' default (axis 0, 64) needs the element
    count of every flush to divide by 64."""
    return {"backend": "hqq", "nbits": nbits, "axis_key": 1, "axis_value": 1, "q_group_size": config.head_dim,
            "residual_length": RESIDUAL_LENGTH}


@pytest.fixture
def model(make_model):
    return make_model(seed=0, initializer_range=INIT_STD)


@pytest.fixture
def prompt():
    generator = torch.Generator().manual_seed(100)
    return torch.randint(4, 128, (BATCH, PROMPT_LEN), generator=generator)


def generate(model, prompt, **kwargs):
    return model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, **kwargs)


@pytest.fixture
def dynamic_run(model, prompt):
    return generate(model, prompt)


@pytest.fixture
def quantized_runs(model, prompt):
    return {nbits: generate(model, prompt, cache_implementation="quantized",
                            cache_config=quantized_cache_config(model.config, nbits)) for nbits in (8, 4)}


def test_quantized_generate_builds_hqq_cache(model, quantized_runs):
    for nbits, run in quantized_runs.items():
        cache = run.past_key_values
        assert isinstance(cache, QuantizedCache)
        assert all(isinstance(layer, HQQQuantizedLayer) and layer.nbits == nbits for layer in cache.layers)
        assert cache.get_seq_length() == PROMPT_LEN + NEW_TOKENS - 1  # the last generated token is never fed back
        assert run.sequences.shape == (BATCH, PROMPT_LEN + NEW_TOKENS)


def test_int8_greedy_output_matches_dynamic_cache(dynamic_run, quantized_runs):
    """Measured: int8 equals the dynamic cache on 20 of 20 seeds (2 prompts x 12 tokens each); int4 on 15 of 20, as
    a flipped near-tie then changes the rest of the continuation. int4 is held to a logits bound below instead."""
    torch.testing.assert_close(quantized_runs[8].sequences, dynamic_run.sequences, rtol=0, atol=0)


def teacher_forced_logits(model, sequences, cache) -> torch.Tensor:
    """Next-token logits at every generated position, feeding `sequences` through `cache` one token at a time after
    the prompt, as `generate` does; the same tokens for every cache, so an early flip cannot amplify the error."""
    logits = [model(sequences[:, :PROMPT_LEN], past_key_values=cache).logits[:, -1]]
    for position in range(PROMPT_LEN, sequences.shape[1] - 1):
        logits.append(model(sequences[:, position : position + 1], past_key_values=cache).logits[:, -1])
    return torch.stack(logits, dim=1)


# Largest |logit error| / largest |logit|, measured over seeds 0-19 with this setup: int8 3.1e-3 (seed 0: 1.8e-3),
# int4 5.6e-2 (seed 0: 1.9e-2). The bounds leave ~1.5x over the worst seed; int4's step is 17x int8's (255 / 15).
RELATIVE_LOGITS_BOUND = {8: 5e-3, 4: 8e-2}


@pytest.mark.parametrize("nbits", [8, 4])
@torch.no_grad()
def test_quantized_logits_error_is_bounded(model, dynamic_run, nbits):
    sequences = dynamic_run.sequences
    exact = model(sequences).logits[:, PROMPT_LEN - 1 : -1]
    config = quantized_cache_config(model.config, nbits)
    cache = QuantizedCache(config=model.config, **config)
    quantized = teacher_forced_logits(model, sequences, cache)
    relative_error = ((quantized - exact).abs().max() / exact.abs().max()).item()
    assert 0 < relative_error < RELATIVE_LOGITS_BOUND[nbits]


@pytest.mark.parametrize("nbits", [8, 4])
@torch.no_grad()
def test_dequantized_states_lie_within_half_a_step(model, dynamic_run, nbits):
    """Layer 0 sees the same input under both caches, so its dequantised keys and values must be the exact ones up
    to the quantisation itself: half a step of each group's (one head, one token) min-max range. Round-to-nearest
    guarantees that; HQQ keeps the min-max scale but may shift the zero-point to lower the mean error, and measured
    here it still stays within (worst 0.9991 half-steps on seed 0, at most one half-step over seeds 0-19)."""
    sequences = dynamic_run.sequences
    exact_cache = DynamicCache(config=model.config)
    quantized_cache = QuantizedCache(config=model.config, **quantized_cache_config(model.config, nbits))
    teacher_forced_logits(model, sequences, exact_cache)
    teacher_forced_logits(model, sequences, quantized_cache)
    exact_layer, quantized_layer = exact_cache.layers[0], quantized_cache.layers[0]
    for exact, packed in ((exact_layer.keys, quantized_layer._quantized_keys),
                          (exact_layer.values, quantized_layer._quantized_values)):
        dequantized = quantized_layer._dequantize(packed)
        exact = exact[:, :, : dequantized.shape[-2]]  # the newest tokens sit in the full-precision residual window
        half_step = (exact.amax(-1, keepdim=True) - exact.amin(-1, keepdim=True)) / (2**nbits - 1) / 2
        error = (dequantized - exact).abs()
        assert error.max() > 0
        # 1e-6 absorbs fp32 rounding of values that sit exactly half a step from a level
        assert (error <= half_step + 1e-6).all(), f"worst error {(error / half_step).max():.4f} half-steps"


def expected_dynamic_bytes(config, tokens: int) -> int:
    """Keys and values of every layer: batch x kv heads x tokens x head_dim, in the model's dtype (fp32 here)."""
    elements = BATCH * config.num_key_value_heads * tokens * config.head_dim
    return config.num_hidden_layers * 2 * elements * torch.float32.itemsize


def expected_quantized_bytes(config, nbits: int) -> int:
    """What `QuantizedLayer` + HQQ store after `generate`: the prompt is quantised whole at prefill, each decode step
    adds one token to the residual window, and a step that fills it (`residual_length` tokens) moves everything into
    the quantised states. Those are `nbits` per element packed into uint8, plus an fp32 scale and zero-point per
    group of `head_dim` elements; the residual window is fp32."""
    decode_steps = NEW_TOKENS - 1
    residual_tokens = decode_steps % RESIDUAL_LENGTH
    quantized_tokens = PROMPT_LEN + decode_steps - residual_tokens
    per_token = BATCH * config.num_key_value_heads * config.head_dim
    quantized_elements = per_token * quantized_tokens
    packed = quantized_elements * nbits // 8
    scale_and_zero = 2 * (quantized_elements // config.head_dim) * torch.float32.itemsize
    residual = per_token * residual_tokens * torch.float32.itemsize
    return config.num_hidden_layers * 2 * (packed + scale_and_zero + residual)


def test_cache_bytes_match_the_storage_the_shapes_imply(model, dynamic_run, quantized_runs):
    config = model.config
    tokens = PROMPT_LEN + NEW_TOKENS - 1
    measured = {"dynamic": cache_bytes(dynamic_run.past_key_values)}
    expected = {"dynamic": expected_dynamic_bytes(config, tokens)}
    for nbits, run in quantized_runs.items():
        measured[f"int{nbits}"] = cache_bytes(run.past_key_values)
        expected[f"int{nbits}"] = expected_quantized_bytes(config, nbits)
    assert measured == expected
    assert expected["int4"] < expected["int8"] < expected["dynamic"]
    per_token = cache_bytes_per_token(dynamic_run.past_key_values, batch_size=BATCH)
    assert per_token == expected["dynamic"] / (tokens * BATCH)


def test_cache_bytes_counts_each_buffer_once_and_empty_layers_as_zero(make_config):
    config = make_config()
    cache = DynamicCache(config=config)
    keys, values = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    cache.update(keys, values, layer_idx=0)
    one_layer = keys.nbytes + values.nbytes
    assert cache_bytes(cache) == one_layer  # layer 1 was never updated: it holds nothing

    cache.layers[1] = DummyLayer()  # a KV-shared layer (keys = values = None)
    assert cache_bytes(cache) == one_layer

    # A layer whose cache is another layer's tensors (KV sharing), and keys that are also the values (tie_kv-like)
    shared = DynamicCache(config=config)
    shared.update(keys, values, layer_idx=0)
    shared.update(keys, values, layer_idx=1)
    shared.layers[1].keys = shared.layers[1].values = shared.layers[0].keys
    assert cache_bytes(shared) == one_layer


def test_cache_bytes_counts_the_whole_buffer_behind_a_view(make_config):
    """A sliding-window layer keeps its window as a view of the states it last concatenated, so the whole
    concatenation stays alive until the next update; its window size is an int64 scalar tensor."""
    config = make_config(layer_types=["sliding_attention", "full_attention"], sliding_window=4)
    cache = DynamicCache(config=config)
    cache.update(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), layer_idx=0)
    cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), layer_idx=0)
    layer = cache.layers[0]
    assert layer.keys.shape[-2] == config.sliding_window - 1  # a view of the last 3 of 4 concatenated positions
    concatenated = 2 * 1 * 2 * (config.sliding_window - 1 + 1) * 8 * torch.float32.itemsize
    assert cache_bytes(cache) == concatenated + layer._sliding_window_tensor.nbytes


def test_cache_bytes_reads_inside_tensor_subclasses(make_config):
    """Wrapper subclasses (quanto's packed tensors) have an empty storage of their own; the bytes are in the inner
    tensors that `__tensor_flatten__` names."""
    cache = DynamicCache(config=make_config())
    first, second = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    cache.update(TwoTensor(first, second), torch.randn(1, 2, 5, 8), layer_idx=0)
    assert cache_bytes(cache) == 3 * first.nbytes


def test_cache_bytes_rejects_what_is_not_a_filled_cache(make_config):
    with pytest.raises(TypeError, match="transformers `Cache`"):
        cache_bytes([(torch.zeros(1), torch.zeros(1))])
    with pytest.raises(ValueError, match="cache is empty"):
        cache_bytes_per_token(DynamicCache(config=make_config()), batch_size=1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        cache_bytes_per_token(DynamicCache(config=make_config()), batch_size=0)


@pytest.mark.parametrize("nbits", [5, 16])
def test_unsupported_nbits_raise(model, prompt, nbits):
    config = {**quantized_cache_config(model.config, 8), "nbits": nbits}
    with pytest.raises(ValueError, match=rf"`nbits` for `HQQ` backend has to be one of .* but got {nbits}"):
        model.generate(prompt, max_new_tokens=2, cache_implementation="quantized", cache_config=config)


def test_sliding_window_layers_are_rejected(make_model, prompt):
    """`QuantizedCache` holds full-attention layers only; AGILLM's sliding and chunked layers need the dynamic cache."""
    sliding = make_model(layer_types=["sliding_attention", "full_attention"], sliding_window=4)
    with pytest.raises(ValueError, match="only supported for models with only full attention layers"):
        sliding.generate(prompt, max_new_tokens=2, cache_implementation="quantized",
                         cache_config=quantized_cache_config(sliding.config, 8))


# ------------------------------------------------------------------------------- bench.kv_table: scoring through a cache

WINDOWS, WINDOW_TOKENS, PREFIX_TOKENS, CHUNK_TOKENS = 3, 24, 8, 4


@pytest.fixture
def windows():
    generator = torch.Generator().manual_seed(7)
    return torch.randint(4, 128, (WINDOWS, WINDOW_TOKENS), generator=generator)


def prefilled_by_forward(model, windows, cache):
    with torch.no_grad():
        model(windows[:, :PREFIX_TOKENS], past_key_values=cache, use_cache=True)
    return cache


def test_scoring_through_the_dynamic_cache_equals_a_full_forward(model, windows):
    cache = prefilled_by_forward(model, windows, DynamicCache(config=model.config))
    result = score_continuation(model, windows, cache, PREFIX_TOKENS, CHUNK_TOKENS)
    with torch.no_grad():
        logits = model(windows).logits[:, PREFIX_TOKENS:-1]  # predictions of tokens PREFIX_TOKENS + 1 ...
    targets = windows[:, PREFIX_TOKENS + 1 :]
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    torch.testing.assert_close(result["loss"], expected)
    assert result["scored_tokens"] == targets.numel()
    assert cache.get_seq_length() == WINDOW_TOKENS  # the last token is fed too: the cache holds whole windows
    # expected_dynamic_bytes counts BATCH sequences; per token of one sequence the batch size cancels out
    assert result["bytes_per_token"] == expected_dynamic_bytes(model.config, WINDOW_TOKENS) / (BATCH * WINDOW_TOKENS)


# head_dim 32, so the channel groups of 32 and 16 divide it (the tiny default's head_dim is 8)
WIDE_HEADS = {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}
MLA = {"num_key_value_heads": 4, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8}


# MLA caches a latent and a rotary key instead of heads: the kinds whose layout depends on that (groups of 8 channels
# across both parts, KIVI's transposed keys); groups of 32 / 16 do not divide the rotary width, and the bench skips them.
REPLAY_CASES = [("gqa", kind) for kind in CACHE_DESCRIPTIONS] + [("mla", kind) for kind in ("fp32", "int4", "int4 KIVI")]


@pytest.mark.parametrize(("attention", "kind"), REPLAY_CASES)
def test_replayed_prefix_equals_a_prefill_forward(make_model, windows, kind, attention):
    """One prefill serves every cache kind in the bench: it must leave each cache as a forward through it would."""
    model = make_model(seed=0, initializer_range=INIT_STD, **(MLA if attention == "mla" else WIDE_HEADS))
    exact_prefix = exact_prefix_cache(model, windows, PREFIX_TOKENS)
    replayed = replay_prefix(exact_prefix, make_cache(kind, model.config, residual_length=CHUNK_TOKENS))
    forwarded = prefilled_by_forward(model, windows, make_cache(kind, model.config, residual_length=CHUNK_TOKENS))
    by_replay = score_continuation(model, windows, replayed, PREFIX_TOKENS, CHUNK_TOKENS)
    by_forward = score_continuation(model, windows, forwarded, PREFIX_TOKENS, CHUNK_TOKENS)
    assert by_replay == by_forward
    dynamic = score_continuation(model, windows, replay_prefix(exact_prefix, DynamicCache(config=model.config)),
                                 PREFIX_TOKENS, CHUNK_TOKENS)  # fmt: skip
    assert (by_replay["loss"] == dynamic["loss"]) == (kind == "fp32")  # every other kind changes what is read
    assert (by_replay["bytes_per_token"] < dynamic["bytes_per_token"]) == (kind != "fp32")


def test_bf16_storage_layer_stores_bf16_and_returns_new_states_exact():
    layer = Bf16StorageLayer()
    first, second = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 3, 8)
    layer.update(first, first.neg())
    keys, values = layer.update(second, second.neg())
    assert layer.keys.dtype == layer.values.dtype == torch.bfloat16 and layer.keys.shape[-2] == 8
    assert keys.dtype == torch.float32
    torch.testing.assert_close(keys[..., 5:, :], second, rtol=0, atol=0)  # this call's states: exact
    torch.testing.assert_close(keys[..., :5, :], first.to(torch.bfloat16).float(), rtol=0, atol=0)  # earlier: bf16
    torch.testing.assert_close(values[..., :5, :], first.neg().to(torch.bfloat16).float(), rtol=0, atol=0)


def test_kv_table_rejects_bad_settings(make_config):
    with pytest.raises(ValueError, match="unknown cache kind 'int2'"):
        make_cache("int2", make_config(), residual_length=4)
    with pytest.raises(ValueError, match=r"chunk_tokens \(48\) must divide the continuation \(128\)"):
        Plan(chunk_tokens=48).check()
    with pytest.raises(ValueError, match="prefix_tokens must lie in"):
        Plan(prefix_tokens=256).check()
    with pytest.raises(ValueError, match="expected the 8-token prefix"):
        score_continuation(None, torch.zeros(1, 16, dtype=torch.long), DynamicCache(config=make_config()), 8, 4)


def test_kivi_layer_groups_keys_per_channel_over_tokens():
    """Keys: one group per (sequence, head, channel) and `token_group` tokens, so a channel with 100x the range of
    the others (a KIVI-style outlier channel) does not coarsen them; values: one group per head and token."""
    token_group, channels = 4, 8
    layer = KiviKeysHQQLayer(token_group=token_group, nbits=4, q_group_size=channels, residual_length=token_group)
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 2, 8, channels, generator=generator)
    keys[..., 0] *= 100  # the outlier channel
    values = torch.randn(2, 2, 8, channels, generator=generator)
    layer.update(keys, values)
    packed_keys, key_meta = layer._quantized_keys
    assert key_meta["shape"] == (2, 2, channels, 8)  # quantised transposed: tokens last
    dequantized = layer._dequantize(layer._quantized_keys)
    grouped = keys.unflatten(-2, (-1, token_group))  # [..., token groups, tokens, channels]
    half_step = (grouped.amax(-2, keepdim=True) - grouped.amin(-2, keepdim=True)) / 15 / 2
    error = (dequantized.unflatten(-2, (-1, token_group)) - grouped).abs()
    assert (error <= half_step + 1e-5).all()
    assert error[..., 1:].max() < 0.2  # the ordinary channels keep their own fine steps, despite the outlier
    value_error = (layer._dequantize(layer._quantized_values) - values).abs()
    value_half_step = (values.amax(-1, keepdim=True) - values.amin(-1, keepdim=True)) / 15 / 2
    assert (value_error <= value_half_step + 1e-5).all()
    with pytest.raises(ValueError, match="KIVI key groups of 4 tokens need a multiple"):
        KiviKeysHQQLayer(token_group=token_group, nbits=4, q_group_size=channels).update(keys[..., :6, :], values)


def test_hqq_groups_must_divide_the_cached_widths(make_config):
    with pytest.raises(ValueError, match=r"groups of 16 channels do not divide the cached widths \(16, 8\)"):
        make_cache("int4 g16", make_config(**MLA), residual_length=4)
