"""Attention variants that shrink the KV cache: multi-head latent attention (MLA) and cross-layer KV sharing.

MLA (`kv_lora_rank` set, DeepSeek-V2/V3) caches one normed latent and one shared rotary key per token and layer; it
decodes either by expanding the latents to per-head keys/values or, with `mla_absorbed_decode`, by folding
`kv_b_proj` into the query and the output. KV sharing (`kv_source_layers`) lets a layer attend over an earlier
layer's keys and values, so it needs no k/v projections and caches nothing. Checked here on tiny random models:
    - absorbed and expanded MLA decoding give the same logits at every step (fp32; measured max |diff| 7.2e-7
      on logits of magnitude ~2);
    - the MLA cache holds `kv_lora_rank + qk_rope_head_dim` numbers per token and layer, with and without
      `q_lora_rank`;
    - for MLA and for KV sharing (alone, on sliding layers, and combined with MLA): cached greedy decoding equals
      uncached, a left-padded batch equals each prompt run alone, and eager attention equals sdpa;
    - sharing layers have no k/v projections and an empty cache layer (0 bytes);
    - inconsistent sharing configs raise `ValueError`.
Budget: about 25 s of CPU time (47 s wall on a 2-core machine shared with other jobs).
"""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError

from bench.kv_cache import cache_bytes


# 0.1 instead of the default 0.02: with tiny weights a random model's greedy output ignores its context, so a
# broken cache or mask would still "agree"; larger weights make every logit depend on the cached states.
INIT_STD = 0.1
NEW_TOKENS = 10
KV_LORA_RANK, QK_ROPE_HEAD_DIM = 16, 4
MLA = {
    "num_key_value_heads": 4,  # MLA expands its latent to one key/value per query head
    "kv_lora_rank": KV_LORA_RANK,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": QK_ROPE_HEAD_DIM,
    "v_head_dim": 8,
}
# Four layers: 0 and 2 compute K/V, 1 and 3 reuse them.
SHARED = {"num_hidden_layers": 4, "kv_source_layers": [0, 0, 2, 2]}
SHARED_SLIDING = {
    **SHARED,
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
    "sliding_window": 4,  # shorter than prompt + new tokens, so the window really drops keys
}
VARIANTS = {
    "mla": MLA,
    "mla_q_lora": {**MLA, "q_lora_rank": 12},
    "kv_sharing": SHARED,
    "kv_sharing_sliding": SHARED_SLIDING,
    "mla_kv_sharing": {**MLA, **SHARED},
}


@pytest.fixture
def prompts():
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(4, 128, (1, length), generator=generator) for length in (9, 6)]


def greedy(model, input_ids, **kwargs) -> torch.Tensor:
    return model.generate(input_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


def left_padded(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(prompt.shape[1] for prompt in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - prompt.shape[1] :] = prompt[0]
        attention_mask[row, longest - prompt.shape[1] :] = 1
    return input_ids, attention_mask


def stepwise_logits(model, sequence: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Next-token logits after the prompt and after each later token of `sequence`, fed one at a time via the cache."""
    with torch.no_grad():
        output = model(sequence[:, :prompt_length], use_cache=True)
        logits, cache = [output.logits[:, -1]], output.past_key_values
        for position in range(prompt_length, sequence.shape[1]):
            output = model(sequence[:, position : position + 1], past_key_values=cache, use_cache=True)
            logits.append(output.logits[:, -1])
    return torch.stack(logits, dim=1)


# --------------------------------------------------------------------------------------------------- MLA


@pytest.mark.parametrize("variant", ["mla", "mla_q_lora"])
def test_mla_absorbed_decode_equals_expanded(make_model, prompts, variant, monkeypatch):
    model = make_model(seed=0, initializer_range=INIT_STD, **VARIANTS[variant])
    sequence = greedy(model, prompts[0])
    calls = {"absorbed": 0}
    absorbed = type(model.model.layers[0].self_attn)._absorbed

    def counting_absorbed(self, *args, **kwargs):
        calls["absorbed"] += 1
        return absorbed(self, *args, **kwargs)

    monkeypatch.setattr(type(model.model.layers[0].self_attn), "_absorbed", counting_absorbed)
    model.config.mla_absorbed_decode = True
    absorbed_logits = stepwise_logits(model, sequence, prompts[0].shape[1])
    decode_steps = sequence.shape[1] - prompts[0].shape[1]
    assert calls["absorbed"] == decode_steps * model.config.num_hidden_layers  # every decode step took that path
    model.config.mla_absorbed_decode = False
    expanded_logits = stepwise_logits(model, sequence, prompts[0].shape[1])
    assert calls["absorbed"] == decode_steps * model.config.num_hidden_layers  # and the expanded run never did
    # Measured max |diff| 4.8e-7 to 7.2e-7 (fp32 rounding: the two paths multiply in a different order).
    torch.testing.assert_close(absorbed_logits, expanded_logits, rtol=0, atol=2e-6)


@pytest.mark.parametrize("variant", ["mla", "mla_q_lora"])
def test_mla_cache_holds_latent_and_rotary_key(make_model, prompts, variant):
    model = make_model(seed=0, initializer_range=INIT_STD, **VARIANTS[variant])
    has_q_lora = VARIANTS[variant].get("q_lora_rank") is not None
    attention = model.model.layers[0].self_attn
    assert hasattr(attention, "q_a_proj") == has_q_lora and hasattr(attention, "q_proj") != has_q_lora
    batch, length = 2, prompts[0].shape[1]
    cache = model(prompts[0].expand(batch, -1), use_cache=True).past_key_values
    for layer in cache.layers:
        assert layer.keys.shape == (batch, 1, length, KV_LORA_RANK)  # the normed latent
        assert layer.values.shape == (batch, 1, length, QK_ROPE_HEAD_DIM)  # the rotated shared key part
    per_token_layer = cache_bytes(cache) / (batch * length * model.config.num_hidden_layers * 4)  # fp32
    assert per_token_layer == KV_LORA_RANK + QK_ROPE_HEAD_DIM  # vs 2 * heads * head_dim = 2 * 4 * 16 for MHA


# --------------------------------------------------------------------------------------------------- KV sharing


@pytest.mark.parametrize("variant", ["kv_sharing", "kv_sharing_sliding", "mla_kv_sharing"])
def test_sharing_layers_have_no_kv_projections_and_cache_nothing(make_model, prompts, variant):
    model = make_model(seed=0, initializer_range=INIT_STD, **VARIANTS[variant])
    sources = model.config.kv_source_layers
    kv_names = ("k_proj", "v_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "k_norm")
    for index, layer in enumerate(model.model.layers):
        own = [name for name in kv_names if hasattr(layer.self_attn, name)]
        assert (own == []) == (sources[index] != index), (index, own)
    cache = model(prompts[0], use_cache=True).past_key_values
    for index, layer in enumerate(cache.layers):
        if sources[index] != index:
            assert not layer.is_initialized and cache_bytes_of_layer(layer) == 0
        else:
            assert cache_bytes_of_layer(layer) > 0
    # Sharing halves the stored keys and values: the same model without sharing stores twice as much.
    unshared = make_model(seed=0, **{**VARIANTS[variant], "kv_source_layers": None})
    unshared_cache = unshared(prompts[0], use_cache=True).past_key_values
    assert 2 * sum(map(cache_bytes_of_layer, cache.layers)) == sum(map(cache_bytes_of_layer, unshared_cache.layers))


def cache_bytes_of_layer(layer) -> int:
    """Bytes of the keys and values a cache layer stores (sliding layers also keep a small position counter)."""
    return sum(t.numel() * t.element_size() for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
               if isinstance(t, torch.Tensor))


def test_sharing_layer_attends_over_source_keys(make_model, prompts):
    """The sharing layer really reads its source: changing the source's value projection changes its output."""
    model = make_model(seed=0, initializer_range=INIT_STD, **SHARED)
    captured = {}
    model.model.layers[1].self_attn.register_forward_hook(lambda module, args, output: captured.update(out=output[0]))
    with torch.no_grad():
        model(prompts[0])
        before = captured["out"].clone()
        model.model.layers[0].self_attn.v_proj.weight.mul_(2.0)
        model(prompts[0])
    assert not torch.allclose(before, captured["out"], atol=1e-3)


# --------------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_greedy_equals_uncached(make_model, prompts, variant):
    """Greedy tokens, and the logits of every decode step against one uncached forward over the whole sequence
    (a random model's greedy output soon repeats one token, so the logits are the sharper check)."""
    model = make_model(seed=0, initializer_range=INIT_STD, **VARIANTS[variant])
    for prompt in prompts:
        cached = greedy(model, prompt)
        assert torch.equal(cached, greedy(model, prompt, use_cache=False))
        with torch.no_grad():
            uncached_logits = model(cached, use_cache=False).logits[:, prompt.shape[1] - 1 :]
        torch.testing.assert_close(stepwise_logits(model, cached, prompt.shape[1]), uncached_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_left_padded_batch_equals_single(make_model, prompts, variant):
    model = make_model(seed=0, initializer_range=INIT_STD, **VARIANTS[variant])
    input_ids, attention_mask = left_padded(prompts, model.config.pad_token_id)
    batched = greedy(model, input_ids, attention_mask=attention_mask, pad_token_id=model.config.pad_token_id)
    for row, prompt in enumerate(prompts):
        assert torch.equal(batched[row, input_ids.shape[1] :], greedy(model, prompt)[0, prompt.shape[1] :])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_eager_equals_sdpa(make_model, prompts, variant):
    """Prefill logits and every decode step (MLA decodes with the absorbed, one-latent-head path)."""
    model = make_model(seed=0, initializer_range=INIT_STD, **VARIANTS[variant])
    sequence = greedy(model, prompts[0])
    prompt_length = prompts[0].shape[1]
    results = {}
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            full = model(sequence).logits
        results[implementation] = (full, stepwise_logits(model, sequence, prompt_length))
    torch.testing.assert_close(results["eager"][0], results["sdpa"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(results["eager"][1], results["sdpa"][1], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"kv_source_layers": [0, 0]}, "kv_source_layers has 2 entries"),
        ({"kv_source_layers": [1, 1, 2, 3]}, "earlier layer"),  # a source after the layer
        ({"kv_source_layers": [0, 0, 1, 3]}, "earlier layer"),  # the source itself shares
        ({"kv_source_layers": [0, 1, 2, 5]}, "earlier layer"),  # out of range
        ({"kv_source_layers": [0, 1, 2, 1], "layer_types": SHARED_SLIDING["layer_types"], "sliding_window": 4},
         "same attention type"),
        ({"kv_source_layers": [0, 0, 2, 3], "nope_layers": [1]}, "RoPE/NoPE"),
    ],
)
def test_invalid_sharing_configs_raise(make_config, overrides, message):
    with pytest.raises(StrictDataclassError, match=message):
        make_config(num_hidden_layers=4, **overrides)
