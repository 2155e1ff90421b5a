"""Numerics of the AGILLM decoder: attention backends, KV cache, padding, static cache + compile, checkpointing.

Every comparison is fp32 on seeded tiny models. Eager attention is the reference; the other paths must match it to
`ATOL` on real (non-padding) positions, and greedy generations must match token for token.
"""

import pytest
import torch
from transformers import CompileConfig, DynamicCache, StaticCache


ATOL = 1e-5  # fp32 agreement between attention backends / cache paths; observed differences are ~1e-7

# Attention variants; together they cover MHA/GQA/MQA, every layer type, NoPE, QK-norm and both norm types.
# Window and chunk are smaller than the test sequences so that the masks actually cut.
ATTENTION_VARIANTS = {
    "mha": {"num_key_value_heads": 4},
    "gqa": {"num_key_value_heads": 2},
    "mqa": {"num_key_value_heads": 1},
    "sliding": {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4},
    "chunked": {"layer_types": ["chunked_attention", "full_attention"], "attention_chunk_size": 4},
    "nope": {"nope_layers": [1]},
    "qk_norm": {"use_qk_norm": True},
    "layer_norm": {"norm_type": "layer_norm", "use_qk_norm": True},
}
# One model with all three layer kinds, a NoPE layer and QK-norm: used where one config must cover everything.
HYBRID_VARIANT = {
    "num_hidden_layers": 3,
    "layer_types": ["sliding_attention", "chunked_attention", "full_attention"],
    "sliding_window": 4,
    "attention_chunk_size": 4,
    "nope_layers": [2],
    "use_qk_norm": True,
}
# Variants whose cache layers differ from a plain full-attention cache (generation tests).
CACHE_VARIANTS = {
    "full": {},
    "sliding": ATTENTION_VARIANTS["sliding"],
    "chunked": ATTENTION_VARIANTS["chunked"],
    "hybrid": HYBRID_VARIANT,
}


def left_padded_batch(vocab_size: int, lengths: list[int], pad_token_id: int = 0, seed: int = 0):
    """Random prompts of the given lengths, left-padded to the longest one: `(input_ids, attention_mask)`."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        # ids >= 3 keep pad/bos/eos out of the prompts
        input_ids[row, width - length :] = torch.randint(3, vocab_size, (length,), generator=generator)
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask


def greedy(model, input_ids, attention_mask=None, new_tokens=12, **kwargs):
    """Greedy generation of exactly `new_tokens` tokens (EOS is suppressed until then), with per-step logits."""
    return model.generate(
        input_ids,
        attention_mask=attention_mask if attention_mask is not None else torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )


def logits_of(generation) -> torch.Tensor:
    return torch.stack(generation.logits, dim=1)  # [batch, new_tokens, vocab]


# --------------------------------------------------------------------------------------------- attention backends


def forward_with(model, implementation: str, input_ids, attention_mask) -> torch.Tensor:
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(input_ids, attention_mask=attention_mask).logits


def assert_backends_agree(model, input_ids, attention_mask, backends):
    real_tokens = attention_mask.bool()
    reference = forward_with(model, "eager", input_ids, attention_mask)[real_tokens]
    for backend in backends:
        logits = forward_with(model, backend, input_ids, attention_mask)[real_tokens]
        torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0, msg=lambda m: f"{backend} vs eager: {m}")


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS.values(), ids=ATTENTION_VARIANTS.keys())
def test_attention_backends_agree_with_left_padding(make_model, variant):
    model = make_model(**variant)
    input_ids, attention_mask = left_padded_batch(model.config.vocab_size, lengths=[7, 12, 10])
    # Each compiled flex kernel costs 10-30 s on CPU, so the variant matrix runs flex_attention's uncompiled
    # reference kernel; it checks what this model controls (block masks, GQA, scaling). The compiled kernel is
    # covered once by `test_compiled_flex_attention_agrees_on_hybrid_model`.
    with torch.compiler.set_stance("force_eager"):
        assert_backends_agree(model, input_ids, attention_mask, backends=["sdpa", "flex_attention"])


def test_compiled_flex_attention_agrees_on_hybrid_model(make_model):
    model = make_model(**HYBRID_VARIANT)
    input_ids, attention_mask = left_padded_batch(model.config.vocab_size, lengths=[7, 12])
    assert_backends_agree(model, input_ids, attention_mask, backends=["sdpa", "flex_attention"])


def test_padding_does_not_leak_into_real_tokens(make_model):
    """Changing the ids under the padding must not change any real token's logits."""
    model = make_model(**HYBRID_VARIANT)
    input_ids, attention_mask = left_padded_batch(model.config.vocab_size, lengths=[5, 12])
    other_padding = input_ids.masked_fill(attention_mask == 0, 7)
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits
        logits_other_padding = model(other_padding, attention_mask=attention_mask).logits
    real_tokens = attention_mask.bool()
    torch.testing.assert_close(logits_other_padding[real_tokens], logits[real_tokens], atol=ATOL, rtol=0)


def test_masks_restrict_attention_per_layer_type(make_model):
    """Eager attention weights: causal everywhere, zero outside the window (sliding) and the block (chunked)."""
    model = make_model(**HYBRID_VARIANT)
    model.set_attn_implementation("eager")
    seq_len = 10
    input_ids = torch.randint(3, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        attentions = model(input_ids, output_attentions=True).attentions

    query, key = torch.meshgrid(torch.arange(seq_len), torch.arange(seq_len), indexing="ij")
    window, chunk = model.config.sliding_window, model.config.attention_chunk_size
    allowed = {
        "full_attention": key <= query,
        "sliding_attention": (key <= query) & (key > query - window),
        "chunked_attention": (key <= query) & (key // chunk == query // chunk),
    }
    for layer_type, weights in zip(model.config.layer_types, attentions):
        assert torch.all(weights[..., ~allowed[layer_type]] == 0), f"{layer_type} attends outside its mask"
        assert torch.all(weights[..., allowed[layer_type]] > 0), f"{layer_type} ignores tokens it should see"
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))


@pytest.mark.parametrize("nope_layers, invariant", [([0], True), ([], False)], ids=["nope", "rope"])
def test_nope_layer_is_position_free(make_model, nope_layers, invariant):
    """Without RoPE, the last query sees its keys as a set: shuffling the earlier tokens cannot change its output."""
    model = make_model(num_hidden_layers=1, nope_layers=nope_layers)
    input_ids = torch.randint(3, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(7))
    shuffled = torch.cat([input_ids[:, :-1].flip(-1), input_ids[:, -1:]], dim=-1)
    with torch.no_grad():
        last = model(input_ids).logits[:, -1]
        last_shuffled = model(shuffled).logits[:, -1]
    assert torch.allclose(last_shuffled, last, atol=ATOL, rtol=0) is invariant


# --------------------------------------------------------------------------------------------- cache and generation


@pytest.mark.parametrize("variant", CACHE_VARIANTS.values(), ids=CACHE_VARIANTS.keys())
def test_cached_generation_matches_uncached(make_model, variant):
    """Dynamic-cache decoding equals recomputing the whole prefix each step, past the window and chunk size."""
    model = make_model(**variant)
    prompt = torch.randint(3, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    new_tokens = 14  # prompt + new tokens = 20 = 5 windows/chunks of 4

    cached = greedy(model, prompt, new_tokens=new_tokens, use_cache=True)
    uncached = greedy(model, prompt, new_tokens=new_tokens, use_cache=False)

    assert isinstance(cached.past_key_values, DynamicCache)
    assert cached.sequences.shape == (2, 6 + new_tokens)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(logits_of(cached), logits_of(uncached), atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", CACHE_VARIANTS.values(), ids=CACHE_VARIANTS.keys())
def test_cache_layers_follow_layer_types(make_config, variant):
    """The cache keeps a window-sized layer for sliding/chunked layers and a growing one for full layers."""
    config = make_config(**variant)
    cache = DynamicCache(config=config)
    expected = {"full_attention": "DynamicLayer", "sliding_attention": "DynamicSlidingWindowLayer",
                "chunked_attention": "DynamicSlidingWindowLayer"}
    assert [type(layer).__name__ for layer in cache.layers] == [expected[t] for t in config.layer_types]


@pytest.mark.parametrize("variant", CACHE_VARIANTS.values(), ids=CACHE_VARIANTS.keys())
def test_left_padded_batch_matches_rows_run_alone(make_model, variant):
    model = make_model(**variant)
    lengths = [3, 9, 6]
    input_ids, attention_mask = left_padded_batch(model.config.vocab_size, lengths=lengths, seed=2)
    batched = greedy(model, input_ids, attention_mask, new_tokens=10)

    for row, length in enumerate(lengths):
        alone = greedy(model, input_ids[row : row + 1, -length:], new_tokens=10)
        assert torch.equal(batched.sequences[row, -10:], alone.sequences[0, -10:]), f"row {row} differs"
        torch.testing.assert_close(logits_of(batched)[row], logits_of(alone)[0], atol=ATOL, rtol=0)


def test_static_cache_generation_matches_dynamic(make_model):
    model = make_model(**HYBRID_VARIANT)
    input_ids, attention_mask = left_padded_batch(model.config.vocab_size, lengths=[4, 6], seed=3)
    dynamic = greedy(model, input_ids, attention_mask, new_tokens=10)
    static = greedy(model, input_ids, attention_mask, new_tokens=10, cache_implementation="static")

    assert isinstance(static.past_key_values, StaticCache) and isinstance(dynamic.past_key_values, DynamicCache)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(logits_of(static), logits_of(dynamic), atol=ATOL, rtol=0)


def test_compiled_static_cache_generation_matches_dynamic(make_model):
    """`generate` compiles the decode step (inductor, full graph) when asked to on CPU; output must not change."""
    model = make_model(**HYBRID_VARIANT)
    input_ids, attention_mask = left_padded_batch(model.config.vocab_size, lengths=[4, 6], seed=3)
    dynamic = greedy(model, input_ids, attention_mask, new_tokens=6)

    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # generate compiles only on GPU-like devices otherwise
    compiled = greedy(
        model, input_ids, attention_mask, new_tokens=6, cache_implementation="static", compile_config=compile_config
    )

    assert hasattr(model, "_compiled_call"), "generate did not compile the forward"
    assert torch.equal(compiled.sequences, dynamic.sequences)
    torch.testing.assert_close(logits_of(compiled), logits_of(dynamic), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------- training


def parameter_grads(model, input_ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids, labels=input_ids).loss.backward()
    return {name: param.grad.clone() for name, param in model.named_parameters()}


def test_gradient_checkpointing_gives_same_gradients(make_model):
    model = make_model(**HYBRID_VARIANT, tie_word_embeddings=False).train()
    input_ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    reference = parameter_grads(model, input_ids)

    # Count MLP calls: checkpointing recomputes every layer in backward, so each MLP starts twice per step. (A
    # pre-hook, because the non-reentrant recompute stops once it has the tensors backward needs, before MLP returns.)
    mlp_calls = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_: mlp_calls.append(1)) for layer in model.model.layers]
    model.activation_checkpointing_enable()
    checkpointed = parameter_grads(model, input_ids)
    for hook in hooks:
        hook.remove()

    assert len(mlp_calls) == 2 * model.config.num_hidden_layers, "gradient checkpointing did not recompute"
    assert checkpointed.keys() == reference.keys()
    for name, grad in reference.items():
        assert grad.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------------------------- outputs


def test_hidden_states_and_attentions_shapes(make_model):
    model = make_model(**HYBRID_VARIANT, attn_implementation="eager")
    config = model.config
    input_ids = torch.randint(3, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        outputs = model(input_ids, output_hidden_states=True, output_attentions=True)

    # embeddings + one per layer; the last one is the final-norm output, which the LM head reads
    assert len(outputs.hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (2, 9, config.hidden_size) for h in outputs.hidden_states)
    torch.testing.assert_close(model.lm_head(outputs.hidden_states[-1]), outputs.logits)
    assert len(outputs.attentions) == config.num_hidden_layers
    assert all(a.shape == (2, config.num_attention_heads, 9, 9) for a in outputs.attentions)


def test_hidden_states_are_recorded_per_layer(make_model):
    model = make_model()
    input_ids = torch.randint(3, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(5))
    recorded = []
    model.model.layers[0].register_forward_hook(lambda module, args, output: recorded.append(output))
    with torch.no_grad():
        hidden_states = model(input_ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden_states[0], model.model.embed_tokens(input_ids))
    torch.testing.assert_close(hidden_states[1], recorded[0])


@pytest.mark.parametrize("logits_to_keep", [1, 3, torch.tensor([0, 4, 8])], ids=["last", "last-3", "indices"])
def test_logits_to_keep(make_model, logits_to_keep):
    model = make_model()
    input_ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        all_logits = model(input_ids).logits
        kept = model(input_ids, logits_to_keep=logits_to_keep).logits
    positions = torch.arange(9)[-logits_to_keep:] if isinstance(logits_to_keep, int) else logits_to_keep
    assert kept.shape == (2, len(positions), model.config.vocab_size)
    torch.testing.assert_close(kept, all_logits[:, positions])

