"""AGILLM 4.x architecture knobs and the AR / SAT / NAT heads: masks, ALiBi, MoE routing, tie_kv, losses, training."""

import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import Trainer, TrainingArguments

from conftest import TinyRows, build_tiny_config
from configuration_agillm import AgillmConfig
from layers_agillm import alibi_bias, alibi_slopes
from modeling_agillm import AgillmForCausalLM
from moe_agillm import ROUTER_CLASSES, AgillmPlainExperts
from generation_agillm import GENERATION_MODES
from objectives_agillm import OBJECTIVES, clean_and_noised_pass, sat_gate_loss


def tiny_config(**overrides) -> AgillmConfig:
    fields = {"vocab_size": 64, "intermediate_size": 48, "heads": ["ar", "sat", "nat"], "max_position_embeddings": 128}
    return build_tiny_config(**{**fields, **overrides})


def tiny_model(seed: int = 0, attn: str = "sdpa", **overrides) -> AgillmForCausalLM:
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    config._attn_implementation = attn
    return AgillmForCausalLM(config).eval()


def ids(batch: int = 2, length: int = 12, seed: int = 1, vocab: int = 64) -> torch.Tensor:
    return torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


LAYOUTS = {
    "rope": {},
    "alibi": {"position_embedding_type": "alibi"},
    "agillm": {
        "position_embedding_type": "agillm_alibi",
        "norm_type": "layer_norm",
        "mlp_type": "plain",
        "hidden_act": "relu",
        "mlp_bias": True,
        "tie_kv": True,
        "num_key_value_heads": 4,
        "nat_block_size": None,
        "head_bias": True,
        "tie_word_embeddings": False,
    },
    "moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24,
    },
}


# --------------------------------------------------------------------------------------------------- ALiBi


def test_alibi_slopes_follow_the_agillm_rule():
    assert alibi_slopes(4).tolist() == [0.25, 0.0625, 0.015625, 0.00390625]  # FORMAT.md 6.4
    # 6 heads: the 4-head rule, then the even-indexed slopes of the 8-head rule (0.5, 0.125)
    assert alibi_slopes(6).tolist() == [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
    assert alibi_slopes(8).tolist() == [0.5 ** (i + 1) for i in range(8)]


def test_alibi_variants_penalise_the_right_keys():
    positions = torch.arange(5)[None]
    slopes = torch.tensor([0.5])
    standard = alibi_bias(slopes, positions, positions, "alibi")[0, 0]
    clamped = alibi_bias(slopes, positions, positions, "agillm_alibi")[0, 0]
    i, j = 1, 3
    assert standard[i, j] == standard[j, i] == -0.5 * 2  # symmetric distance
    assert clamped[i, j] == -0.5 * 2 and clamped[j, i] == 0  # only keys after the query
    assert torch.equal(clamped.tril(), torch.zeros(5, 5))  # zero on everything a causal query sees


def test_agillm_alibi_is_exactly_no_positions_for_ar():
    """AGILLM 4.x's clamped ALiBi is zero under the causal mask: AR logits equal a NoPE model's, bit for bit."""
    tokens = ids()
    with torch.no_grad():
        alibi = tiny_model(position_embedding_type="agillm_alibi")(tokens).logits
        nope = tiny_model(position_embedding_type="none")(tokens).logits
        sat_alibi = tiny_model(position_embedding_type="agillm_alibi")(tokens, objective="sat").logits
        sat_nope = tiny_model(position_embedding_type="none")(tokens, objective="sat").logits
    assert torch.equal(alibi, nope)
    assert not torch.allclose(sat_alibi, sat_nope)  # SAT sees the pair partner, which the clamp penalises


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("objective", ["ar", "sat", "nat"])
def test_eager_and_sdpa_agree_with_left_padding(layout, objective):
    tokens = ids(batch=3, length=10)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    mask[2, :1] = 0
    with torch.no_grad():
        eager = tiny_model(attn="eager", **LAYOUTS[layout])(tokens, attention_mask=mask, objective=objective).logits
        sdpa = tiny_model(attn="sdpa", **LAYOUTS[layout])(tokens, attention_mask=mask, objective=objective).logits
    real = mask.bool()
    torch.testing.assert_close(eager[real], sdpa[real], atol=2e-6, rtol=0)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("objective", ["ar", "sat", "nat"])
def test_left_padded_rows_match_unpadded(layout, objective):
    """Positions (RoPE, ALiBi distances, SAT/NAT blocks) come from the row's own tokens, not from padding."""
    model = tiny_model(**LAYOUTS[layout])
    tokens = ids(batch=1, length=9)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), tokens], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(tokens)], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        single = model(tokens, objective=objective).logits
        batched = model(padded, attention_mask=mask, position_ids=position_ids, objective=objective).logits
    torch.testing.assert_close(batched[:, 3:], single, atol=2e-6, rtol=0)


# --------------------------------------------------------------------------------------------------- masks + cache


def test_sat_mask_is_block_causal_over_pairs():
    model = tiny_model(attn="eager")
    with torch.no_grad():
        attentions = model(ids(batch=1, length=6), objective="sat", output_attentions=True).attentions[0][0, 0]
    visible = attentions > 0
    expected = torch.tensor([[j // 2 <= i // 2 for j in range(6)] for i in range(6)])
    assert torch.equal(visible, expected)


@pytest.mark.parametrize("layout", ["rope", "alibi", "agillm"])
@pytest.mark.parametrize("objective", ["ar", "sat"])
def test_cached_blocks_equal_a_full_pass(layout, objective):
    """Feeding a sequence block by block through the KV cache gives the full pass's logits (block-causal rows)."""
    model = tiny_model(**LAYOUTS[layout])
    tokens = ids(batch=1, length=10)
    with torch.no_grad():
        full = model(tokens, objective=objective).logits
        cache, pieces = None, []
        for start in range(0, 10, 2):
            output = model(tokens[:, start : start + 2], past_key_values=cache, use_cache=True, objective=objective)
            cache = output.past_key_values
            pieces.append(output.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=2e-6, rtol=0)


def test_block_nat_trains_exactly_as_it_decodes():
    """A noised block in the training pass sees the clean earlier blocks: its logits equal a decode-time pass of
    [clean earlier blocks, noised block] under the block-causal NAT mask."""
    model = tiny_model(nat_block_size=4, position_embedding_type="alibi")
    tokens = ids(batch=1, length=12)
    noised = tokens.clone()
    noised[0, [1, 2, 5, 8, 9, 11]] = model.config.nat_mask_token_id
    inputs = {"input_ids": tokens, "attention_mask": None, "position_ids": None, "inputs_embeds": None}
    with torch.no_grad():
        trained = model.nat_head(clean_and_noised_pass(model, inputs, noised).last_hidden_state[:, 12:])
        for block in range(3):
            context = torch.cat([tokens[:, : 4 * block], noised[:, 4 * block : 4 * block + 4]], dim=1)
            decoded = model(context, objective="nat").logits[:, -4:]
            torch.testing.assert_close(trained[:, 4 * block : 4 * block + 4], decoded, atol=2e-6, rtol=0)


def test_bidirectional_nat_sees_the_future():
    model = tiny_model(nat_block_size=None)
    tokens = ids(batch=1, length=8)
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 64
    with torch.no_grad():
        first = model(tokens, objective="nat").logits[0, 0]
        second = model(changed, objective="nat").logits[0, 0]
    assert not torch.allclose(first, second)


def test_objective_registry_names_each_head_its_blocks_and_every_decoder():
    """`objectives_agillm.OBJECTIVES` is the one table: the head `forward(objective=...)` runs, the config field of
    its attention blocks, and the decoders reading it; every decoder `generate` offers is listed under some head."""
    model = AgillmForCausalLM(tiny_config()).eval()
    for name, objective in OBJECTIVES.items():
        assert model._head(name) is getattr(model, objective.head)
        assert objective.block_size_field is None or hasattr(model.config, objective.block_size_field)
    listed = {mode for objective in OBJECTIVES.values() for mode in objective.generation_modes}
    assert listed == {"ar", *GENERATION_MODES}


# --------------------------------------------------------------------------------------------------- MoE, tie_kv


def test_top1_straight_through_uses_the_expert_output_unscaled():
    config = tiny_config(**LAYOUTS["agillm"], num_experts=4, router_type="top1_straight_through")
    torch.manual_seed(0)
    router = ROUTER_CLASSES[config.router_type](config, layer_idx=0)
    torch.nn.init.normal_(router.weight)
    hidden = torch.randn(6, config.hidden_size)
    logits, weights, index = router(hidden)
    assert torch.equal(weights, torch.ones_like(weights))  # forward value exactly 1
    assert torch.equal(index[:, 0], logits.argmax(-1))
    weights.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0  # the gate still learns


def test_softmax_topk_equals_softmax_over_the_chosen_logits():
    """AGILLM 4.x's top-k rule (top-k on raw logits, softmax over them) equals softmax, top-k, renormalise."""
    config = tiny_config(num_experts=5, num_experts_per_tok=2)
    torch.manual_seed(0)
    router = ROUTER_CLASSES[config.router_type](config, layer_idx=0)
    torch.nn.init.normal_(router.weight)
    hidden = torch.randn(7, config.hidden_size)
    logits, weights, index = router(hidden)
    top_logits, top_index = torch.topk(logits, 2, dim=-1)
    assert torch.equal(index, top_index)
    torch.testing.assert_close(weights, top_logits.softmax(-1), atol=1e-7, rtol=0)


def test_plain_experts_match_a_per_expert_reference():
    config = tiny_config(**LAYOUTS["agillm"], num_experts=3, moe_intermediate_size=8)
    torch.manual_seed(0)
    experts = AgillmPlainExperts(config)
    for parameter in experts.parameters():
        torch.nn.init.normal_(parameter)
    hidden = torch.randn(5, config.hidden_size)
    index = torch.tensor([[0], [2], [2], [1], [0]])
    weights = torch.rand(5, 1)
    output = experts(hidden, index, weights)
    for row in range(5):
        e = index[row, 0]
        up = torch.relu(hidden[row] @ experts.up_proj[e].T + experts.up_proj_bias[e])
        expected = (up @ experts.down_proj[e].T + experts.down_proj_bias[e]) * weights[row]
        torch.testing.assert_close(output[row], expected, atol=1e-5, rtol=1e-5)


def test_tie_kv_has_no_value_projection_and_values_are_keys():
    model = tiny_model(tie_kv=True, position_embedding_type="none", num_key_value_heads=4, attn="eager")
    attention = model.model.layers[0].self_attn
    assert not hasattr(attention, "v_proj")
    assert "model.layers.0.self_attn.v_proj.weight" not in model.state_dict()
    hidden = torch.randn(1, 3, 32)
    with torch.no_grad():
        keys = attention.k_proj(hidden).view(1, 3, -1, 8).transpose(1, 2)
        position_embeddings = model.model.rotary_emb(hidden, torch.arange(3)[None])
        output, weights = attention(hidden, position_embeddings, None)
        expected = torch.matmul(weights, keys).transpose(1, 2).reshape(1, 3, -1)
    torch.testing.assert_close(output, attention.o_proj(expected), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------- losses


def test_sat_gate_target_is_the_safe_stride():
    model = tiny_model(sat_gate_loss=True)
    labels = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    logits = torch.full((1, 8, 64), -10.0)
    # b = 2: block at 0 predicts labels 2, 3; block at 2 predicts 4, 5; block at 4 predicts 6, 7
    predictions = [7, 8, 9, 0, 0, 12, 0, 0]  # block 0: both right; block 2: first right only; block 4: first wrong
    for position, token in enumerate(predictions):
        logits[0, position, token] = 10.0
    gate_logits = torch.zeros(1, 8, 2, requires_grad=True)
    loss = sat_gate_loss(model, logits, gate_logits, labels)
    loss.backward()
    # Targets: stride 2 (class 1), stride 1 (class 0), stride 1 (class 0): gradients push the logits that way.
    grad = gate_logits.grad[0]
    assert grad[0, 1] < 0 < grad[0, 0]
    assert grad[2, 0] < 0 < grad[2, 1] and grad[4, 0] < 0 < grad[4, 1]
    assert torch.count_nonzero(grad[1::2]) == 0  # only block starts carry the gate
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)


def test_shift_labels_replace_labels_for_every_objective():
    model = tiny_model()
    tokens = ids(batch=2, length=10)
    shift = torch.roll(tokens, -1, dims=1)
    shift[:, -1] = -100
    with torch.no_grad():
        reference = model(tokens, labels=tokens, shift_labels=shift, objective="sat").loss
        other_labels = model(tokens, labels=torch.zeros_like(tokens), shift_labels=shift, objective="sat").loss
    assert torch.equal(reference, other_labels)


def test_nat_eval_loss_is_reproducible_and_training_masks_vary():
    model = tiny_model()
    tokens = ids(batch=4, length=16)
    with torch.no_grad():
        assert model(tokens, labels=tokens, objective="nat").loss == model(tokens, labels=tokens, objective="nat").loss
        model.train()
        losses = {model(tokens, labels=tokens, objective="nat").loss.item() for _ in range(4)}
    assert len(losses) > 1


@pytest.mark.parametrize(
    "layout,objective",
    [("rope", "ar"), ("rope", "sat"), ("rope", "nat"), ("agillm", "nat"), ("moe", None), ("alibi", None)],
)
def test_training_lowers_each_objective(layout, objective):
    model = tiny_model(**LAYOUTS[layout]).train()
    tokens = (torch.arange(32) % 5 + 4).repeat(4, 1)  # a periodic pattern: each token follows from its neighbours
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(30):
        loss = model(tokens, labels=tokens, objective=objective).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses  # a broken loss or frozen head stays flat


def test_multi_objective_loss_is_the_weighted_sum_and_trainer_uses_it(tmp_path):
    model = tiny_model(objective_weights={"ar": 1.0, "sat": 0.5, "nat": 2.0})
    tokens = ids(batch=2, length=12)
    with torch.no_grad():
        output = model(tokens, labels=tokens)
        parts = {o: model(tokens, labels=tokens, objective=o).loss for o in ("ar", "sat", "nat")}
    torch.testing.assert_close(output.loss, parts["ar"] + 0.5 * parts["sat"] + 2.0 * parts["nat"])
    assert set(output.objective_losses) == {"ar", "sat", "nat"}
    assert not model.accepts_loss_kwargs

    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[], use_cpu=True)
    result = Trainer(model=model.train(), args=args, train_dataset=TinyRows()).train()
    assert math.isfinite(result.training_loss)


def test_gradient_checkpointing_gives_the_same_multi_objective_gradients():
    tokens = ids(batch=2, length=12)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(**LAYOUTS["moe"]).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(3)  # the same NAT masks in both runs
        model(tokens, labels=tokens).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_resizing_the_vocabulary_resizes_every_head():
    model = tiny_model(tie_word_embeddings=False, head_bias=True)
    model.resize_token_embeddings(80)
    assert model.lm_head.weight.shape[0] == model.sat_head.proj.weight.shape[0] == model.nat_head.weight.shape[0] == 80
    assert model.nat_head.bias.shape[0] == 80
    with torch.no_grad():
        assert model(ids(vocab=80), objective="nat").logits.shape[-1] == 80


def test_tied_heads_share_the_embedding():
    model = tiny_model(tie_word_embeddings=True)
    embedding = model.model.embed_tokens.weight
    assert model.lm_head.weight is embedding
    assert model.sat_head.proj.weight is embedding and model.nat_head.weight is embedding


# --------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"position_embedding_type": "learned"}, "position_embedding_type"),
        ({"heads": ["ar", "mtp"]}, "heads"),
        ({"heads": ["sat"]}, "heads"),
        ({"objective_weights": {"ar": 1.0, "vision": 1.0}}, "objective_weights"),
        ({"mlp_type": "glu"}, "mlp_type"),
        ({"num_experts": 4, "num_experts_per_tok": 5}, "num_experts_per_tok"),
        ({"num_experts": 4, "num_experts_per_tok": 2, "router_type": "top1_straight_through"}, "exactly one"),
        ({"num_experts": 4, "mlp_type": "plain"}, "biases"),
        ({"position_embedding_type": "alibi", "sliding_window": 4}, "full_attention"),
        ({"sliding_window": 4}, "full_attention"),
        ({"sat_block_size": 1}, "sat_block_size"),
        ({"nat_block_size": 0}, "nat_block_size"),
        ({"nat_mask_token_id": 64}, "nat_mask_token_id"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"label_smoothing": {"ar": 0.1, "xx": 0.1}}, "label_smoothing"),
    ],
)
def test_invalid_configs_are_refused(fields, message):
    with pytest.raises(StrictDataclassError, match=message):
        tiny_config(**fields)


def test_a_missing_head_or_bad_objective_is_refused():
    model = tiny_model(heads=["ar"])
    with pytest.raises(ValueError, match="no 'sat' head"):
        model(ids(), objective="sat")
    with pytest.raises(ValueError, match="objective"):
        model(ids(), objective="mtp")
    with pytest.raises(ValueError, match="ALiBi|alibi"):
        tiny_model(position_embedding_type="alibi", attn="flex_attention")(ids())


def test_multi_objective_forward_under_an_autocast_wrapper_restores_autocast():
    """accelerate's bf16 mixed precision wraps `model.forward` in one `torch.autocast` object. The multi-objective loss
    runs one pass per head; calling the wrapped forward again from inside re-entered that object, whose exit then
    restored "enabled" and left bf16 autocast on for the rest of the process (a later model trained in bf16)."""
    from types import MethodType

    model = tiny_model(heads=["ar", "sat", "nat"]).train()
    model.forward = MethodType(torch.autocast("cpu", dtype=torch.bfloat16)(type(model).forward), model)
    ids = torch.randint(32, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    assert not torch.is_autocast_enabled("cpu")
    loss = model(ids, labels=ids).loss
    assert not torch.is_autocast_enabled("cpu")
    assert torch.isfinite(loss)
