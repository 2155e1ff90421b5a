"""MoE routing: every router type across experts implementations, caches and padding; document routing; router losses.

Routers are re-initialised with large weights (`moe_model`) so that routing depends on the token and no two experts
are near a tie: a float-level difference between two code paths then cannot flip a choice, and a wrong choice
changes the logits by far more than `ATOL`. Routing facts are read from what the model itself records
(`router_logits`, `router_indices`) or from forward hooks on the routers, and checked against independent
recomputations written here from the definitions (document sets, Mixtral's balancing loss, the z-loss formula,
DeepSeek-V3's bias step).
"""

import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from datasets import Dataset
from transformers import Trainer, TrainingArguments
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from conftest import build_tiny_config, build_tiny_model
from moe_agillm import AgillmRouter, router_losses


ATOL = 1e-5  # fp32 agreement between code paths (experts implementations, cache, padding)
EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")

# One tiny MoE per router type; together they also cover a shared expert (plain and gated), a dense layer next to a
# sparse one, expert groups with a routed scaling factor, and the balancing bias steering the choice.
ROUTERS = {
    "softmax_topk": {"router_type": "softmax_topk", "num_experts": 4, "num_experts_per_tok": 2},
    "sigmoid_group_topk": {
        "router_type": "sigmoid_group_topk",
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "shared_expert_intermediate_size": 16,
    },
    "sigmoid_top1_scaled_input": {
        "router_type": "sigmoid_top1_scaled_input",
        "num_experts": 4,
        "num_experts_per_tok": 1,
        "shared_expert_intermediate_size": 16,
        "mlp_layer_types": ["dense", "sparse"],
    },
    "top1_straight_through": {
        "router_type": "top1_straight_through",
        "num_experts": 4,
        "num_experts_per_tok": 1,
        "shared_expert_intermediate_size": 16,
        "shared_expert_gate": True,
    },
}
# EMO-style document routing: each document keeps 3 of 8 experts, each token uses 2 of those 3.
DOCUMENT_ROUTING = {"num_experts": 8, "num_experts_per_tok": 2, "router_scope": "document", "experts_per_document": 3}
ROUTINGS = {**ROUTERS, "document_scope": DOCUMENT_ROUTING}


def moe_model(seed: int = 0, **overrides):
    """A seeded tiny MoE `AgillmForCausalLM` (eval mode) whose routers decide clearly (see the module docstring)."""
    model = build_tiny_model(seed=seed, moe_intermediate_size=16, **overrides)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for router in routers(model):
            router.weight.normal_(0.0, 0.5, generator=generator)
            if router.e_score_correction_bias is not None:  # a non-zero bias, so that it has to steer the choice
                router.e_score_correction_bias.uniform_(-0.1, 0.1, generator=generator)
    return model


def routers(model) -> list[AgillmRouter]:
    return [module for module in model.modules() if isinstance(module, AgillmRouter)]


def token_ids(batch: int, length: int, seed: int = 0, low: int = 4, high: int = 128) -> torch.Tensor:
    return torch.randint(low, high, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded (pad id 0): `(input_ids, attention_mask)`."""
    width = max(lengths)
    input_ids = token_ids(len(lengths), width, seed)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        attention_mask[row, width - length :] = 1
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


def padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (0 under the padding), as `generate` derives them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def greedy(model, input_ids, attention_mask=None, new_tokens: int = 8, **kwargs):
    return model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids) if attention_mask is None else attention_mask,
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )


class RouterCalls:
    """Records `(router_logits, top_index)` of every router call, per router in model order, through forward hooks."""

    def __init__(self, model):
        self.calls = {index: [] for index, _ in enumerate(routers(model))}
        self._handles = [
            router.register_forward_hook(lambda module, args, output, index=index: self._record(index, output))
            for index, router in enumerate(routers(model))
        ]

    def _record(self, index: int, output) -> None:
        router_logits, _, top_index = output
        self.calls[index].append((router_logits.detach().clone(), top_index.clone()))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# --------------------------------------------------------------------------------------------- every router type


@pytest.mark.parametrize("routing", ROUTINGS.values(), ids=ROUTINGS.keys())
def test_experts_implementations_agree(routing):
    model = moe_model(**routing)
    input_ids, attention_mask = left_padded([5, 11, 8])
    real = attention_mask.bool()
    outputs = {}
    for implementation in EXPERTS_IMPLEMENTATIONS:
        model.set_experts_implementation(implementation)
        with torch.no_grad():
            outputs[implementation] = model.model(input_ids, attention_mask=attention_mask, output_router_indices=True)
    model.set_experts_implementation("eager")
    with torch.no_grad():
        logits = {name: model.lm_head(output.last_hidden_state)[real] for name, output in outputs.items()}
    for implementation in EXPERTS_IMPLEMENTATIONS[1:]:
        torch.testing.assert_close(logits[implementation], logits["eager"], atol=ATOL, rtol=0)
        for chosen, reference in zip(outputs[implementation].router_indices, outputs["eager"].router_indices):
            assert torch.equal(chosen, reference), f"{implementation} routed differently from eager"


@pytest.mark.parametrize("routing", ROUTERS.values(), ids=ROUTERS.keys())
def test_cached_generation_matches_uncached(routing):
    model = moe_model(**routing)
    prompt = token_ids(2, 6, seed=1)
    cached = greedy(model, prompt, use_cache=True)
    uncached = greedy(model, prompt, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits, 1), torch.stack(uncached.logits, 1), atol=ATOL, rtol=0)


@pytest.mark.parametrize("routing", ROUTINGS.values(), ids=ROUTINGS.keys())
def test_left_padded_batch_matches_rows_run_alone(routing):
    """Padding changes neither the real tokens' logits (prompt and generated) nor, with document routing, the sets."""
    model = moe_model(**routing)
    lengths = [4, 10, 7]
    input_ids, attention_mask = left_padded(lengths, seed=2)
    with torch.no_grad():
        positions = padded_positions(attention_mask)
        batched_logits = model(input_ids, attention_mask=attention_mask, position_ids=positions).logits
    batched = greedy(model, input_ids, attention_mask)
    for row, length in enumerate(lengths):
        alone_ids = input_ids[row : row + 1, -length:]
        with torch.no_grad():
            alone_logits = model(alone_ids).logits[0]
        torch.testing.assert_close(batched_logits[row, -length:], alone_logits, atol=ATOL, rtol=0)
        alone = greedy(model, alone_ids)
        assert torch.equal(batched.sequences[row, -8:], alone.sequences[0, -8:]), f"row {row} generated differently"
        for step, (batch_step, alone_step) in enumerate(zip(batched.logits, alone.logits)):
            torch.testing.assert_close(batch_step[row], alone_step[0], atol=ATOL, rtol=0, msg=f"row {row} step {step}")


@pytest.mark.parametrize("routing", ROUTERS.values(), ids=ROUTERS.keys())
def test_router_gets_gradients_from_the_aux_loss(routing):
    model = moe_model(**routing, router_z_loss_coef=0.01).train()
    output = model(token_ids(2, 9), output_router_logits=True)
    output.aux_loss.backward()
    for index, router in enumerate(routers(model)):
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0, f"router {index} got no gradient"


# --------------------------------------------------------------------------------------------- document routing


def documents_of(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Document number of each token, `[batch, seq]` (-1 = padding): a new document wherever the positions restart."""
    ids = torch.full_like(position_ids, -1)
    for row in range(position_ids.shape[0]):
        document, previous = -1, None
        for column, position in enumerate(position_ids[row].tolist()):
            if previous is None or position <= previous:
                document += 1
            previous = position
            if attention_mask[row, column]:
                ids[row, column] = document
    return ids


def expected_expert_sets(router_logits: torch.Tensor, documents: torch.Tensor, per_document: int) -> dict:
    """{(row, document): the `per_document` experts with the largest mean softmax score over the document's tokens}."""
    scores = router_logits.softmax(-1).view(*documents.shape, -1)
    sets = {}
    real_tokens = (documents >= 0).nonzero().tolist()
    for row, document in sorted({(row, documents[row, column].item()) for row, column in real_tokens}):
        mean_scores = scores[row][documents[row] == document].mean(0)
        sets[(row, document)] = set(mean_scores.topk(per_document).indices.tolist())
    return sets


def assert_routed_within_document_sets(model, router_logits, router_indices, documents) -> list[set]:
    """Every real token uses exactly its top-k experts *within* its document's set; returns each layer's sets."""
    config = model.config
    all_sets = []
    for logits, chosen in zip(router_logits, router_indices):
        sets = expected_expert_sets(logits, documents, config.experts_per_document)
        scores = logits.softmax(-1).view(*documents.shape, -1)
        chosen = chosen.view(*documents.shape, -1)
        for (row, document), experts in sets.items():
            allowed = torch.zeros(config.num_experts, dtype=torch.bool)
            allowed[list(experts)] = True
            for column in torch.nonzero(documents[row] == document).flatten().tolist():
                expected = scores[row, column].masked_fill(~allowed, -1).topk(config.num_experts_per_tok).indices
                assert set(chosen[row, column].tolist()) == set(expected.tolist()), (row, column, experts)
        all_sets.append(sets)
    return all_sets


def test_document_routing_keeps_every_document_in_its_expert_set():
    """Packed documents (positions restarting) and a left-padded row: each document uses only its own experts."""
    model = moe_model(**DOCUMENT_ROUTING)
    packed = torch.tensor([[*range(5), *range(7), *range(4)], [0, 0, 0, *range(6), *range(7)]])
    attention_mask = torch.ones_like(packed)
    attention_mask[1, :3] = 0  # row 1: three padding tokens, then two packed documents
    documents = documents_of(packed, attention_mask)
    assert [len(set(row.tolist()) - {-1}) for row in documents] == [3, 2]  # row 1: padding, then 2 documents
    # Neighbouring documents draw their tokens from disjoint id ranges, so their routing really differs.
    low, high = token_ids(2, 16, seed=3, low=4, high=40), token_ids(2, 16, seed=4, low=40, high=128)
    input_ids = torch.where(documents % 2 == 0, low, high).masked_fill(attention_mask == 0, 0)
    with torch.no_grad():
        output = model.model(
            input_ids, attention_mask=attention_mask, position_ids=packed, output_router_logits=True,
            output_router_indices=True,
        )  # fmt: skip
    layer_sets = assert_routed_within_document_sets(model, output.router_logits, output.router_indices, documents)
    for sets in layer_sets:
        assert all(len(experts) == 3 for experts in sets.values())
        distinct_sets = {frozenset(experts) for experts in sets.values()}
        assert len(distinct_sets) > 1, f"every document got the same experts: {sets}"


def test_padding_takes_no_part_in_the_document_choice():
    """Other ids under the padding leave every real token's routing and logits unchanged."""
    model = moe_model(**DOCUMENT_ROUTING)
    input_ids, attention_mask = left_padded([6, 12], seed=5)
    other_padding = input_ids.masked_fill(attention_mask == 0, 77)
    real = attention_mask.bool().flatten()
    with torch.no_grad():
        first = model.model(input_ids, attention_mask=attention_mask, output_router_indices=True)
        second = model.model(other_padding, attention_mask=attention_mask, output_router_indices=True)
    for chosen, other in zip(first.router_indices, second.router_indices):
        assert torch.equal(chosen[real], other[real])
    torch.testing.assert_close(second.last_hidden_state[attention_mask.bool()],
                               first.last_hidden_state[attention_mask.bool()], atol=ATOL, rtol=0)  # fmt: skip


def test_decoding_continues_with_the_prompts_expert_set():
    model = moe_model(**DOCUMENT_ROUTING)
    input_ids, attention_mask = left_padded([5, 9], seed=6)
    calls = RouterCalls(model)
    try:
        greedy(model, input_ids, attention_mask, new_tokens=6)
    finally:
        calls.remove()
    documents = documents_of(padded_positions(attention_mask), attention_mask)
    for layer, layer_calls in calls.calls.items():
        (prompt_logits, _), decode_steps = layer_calls[0], layer_calls[1:]
        sets = expected_expert_sets(prompt_logits, documents, model.config.experts_per_document)
        (first_row, first_set), (second_row, second_set) = sorted(sets.items())  # one document per prompt
        row_sets = {first_row[0]: first_set, second_row[0]: second_set}
        assert first_set != second_set, f"layer {layer}: both prompts got the same experts"
        assert len(decode_steps) == 5  # the 6th token is sampled from the 5th decode step's logits
        for step, (_, chosen) in enumerate(decode_steps):
            for row in range(2):
                assert set(chosen[row].tolist()) <= row_sets[row], f"layer {layer} step {step} row {row} left its set"


def test_decoding_after_packed_documents_uses_the_last_documents_set():
    model = moe_model(**DOCUMENT_ROUTING)
    positions = torch.tensor([list(range(6)) + list(range(5))])
    input_ids = torch.cat([token_ids(1, 6, seed=7, high=40), token_ids(1, 5, seed=8, low=40)], dim=1)
    with torch.no_grad():
        prefill = model(input_ids, position_ids=positions, use_cache=True, output_router_logits=True)
        step = model.model(
            token_ids(1, 1, seed=9), position_ids=torch.tensor([[5]]), past_key_values=prefill.past_key_values,
            output_router_indices=True,
        )  # fmt: skip
    documents = documents_of(positions, torch.ones_like(positions))
    for layer, (logits, chosen) in enumerate(zip(prefill.router_logits, step.router_indices)):
        sets = expected_expert_sets(logits, documents, model.config.experts_per_document)
        assert set(chosen[0].tolist()) <= sets[(0, 1)], f"layer {layer}: decoding left the last document's experts"


def test_document_routing_cannot_continue_a_token_routed_cache():
    model = moe_model(**{**DOCUMENT_ROUTING, "router_scope": "token"})
    with torch.no_grad():
        cache = model(token_ids(1, 5), use_cache=True).past_key_values
        model.config.router_scope = "document"
        with pytest.raises(ValueError, match="not routed by document"):
            model(token_ids(1, 1), past_key_values=cache)


# --------------------------------------------------------------------------------------------- auxiliary losses


def z_loss_by_formula(router_logits, attention_mask=None) -> torch.Tensor:
    """ST-MoE z-loss: mean over (layer, real token) of `logsumexp(logits)^2`."""
    logits = torch.stack(router_logits)  # [layers, tokens, experts]
    squared = torch.logsumexp(logits, dim=-1).pow(2)
    if attention_mask is None:
        return squared.mean()
    real = attention_mask.flatten().bool()
    return squared[:, real].mean()


@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "left_padded"])
def test_router_losses_match_mixtral_and_the_z_loss_formula(padded):
    routing = {**ROUTERS["softmax_topk"], "num_experts": 6}
    model = moe_model(**routing, router_aux_loss_coef=0.02, router_z_loss_coef=0.003)
    if padded:
        input_ids, attention_mask = left_padded([5, 12, 9], seed=10)
    else:
        input_ids, attention_mask = token_ids(3, 12, seed=10), None
    with torch.no_grad():
        output = model(input_ids, attention_mask=attention_mask, output_router_logits=True)
        recorded = model.model(input_ids, attention_mask=attention_mask, output_router_indices=True)
    config = model.config
    logits, experts, top_k = output.router_logits, config.num_experts, config.num_experts_per_tok
    balance, z_loss = router_losses(logits, recorded.router_indices, experts, False, attention_mask)
    mixtral = load_balancing_loss_func(logits, experts, top_k, attention_mask)
    torch.testing.assert_close(balance, mixtral, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(z_loss, z_loss_by_formula(output.router_logits, attention_mask), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(output.aux_loss, 0.02 * mixtral + 0.003 * z_loss, atol=1e-7, rtol=1e-6)
    assert balance > 1.0  # `E * sum f P` is 1 at perfect balance and uniform probabilities; above it otherwise


def test_loss_includes_the_weighted_aux_loss():
    model = moe_model(**ROUTERS["softmax_topk"], router_aux_loss_coef=0.5, router_z_loss_coef=0.01)
    input_ids, attention_mask = left_padded([7, 12], seed=11)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    with torch.no_grad():
        plain = model(input_ids, attention_mask=attention_mask, labels=labels)
        with_aux = model(input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=True)
    assert plain.aux_loss is None and with_aux.aux_loss > 0
    torch.testing.assert_close(with_aux.loss, plain.loss + with_aux.aux_loss)
    model.config.output_router_logits = True  # the config default turns it on as well (Mixtral's convention)
    with torch.no_grad():
        from_config = model(input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(from_config.loss, with_aux.loss)


# --------------------------------------------------------------------------------------------- aux-loss-free bias


@pytest.mark.parametrize("routing", ["softmax_topk", "sigmoid_group_topk"])
def test_bias_moves_toward_balance_in_training_only(routing):
    rate = 0.01
    model = moe_model(**ROUTERS[routing], router_bias_update_rate=rate)
    input_ids = token_ids(2, 12, seed=12)
    biases = [router.e_score_correction_bias.clone() for router in routers(model)]

    with torch.no_grad():
        model(input_ids)  # eval: no update
    for router, before in zip(routers(model), biases):
        assert torch.equal(router.e_score_correction_bias, before)

    calls = RouterCalls(model.train())
    try:
        model(input_ids)
    finally:
        calls.remove()
    for index, router in enumerate(routers(model)):
        (_, chosen), = calls.calls[index]
        load = torch.bincount(chosen.flatten(), minlength=model.config.num_experts).float()
        step = router.e_score_correction_bias - biases[index]
        overloaded, underloaded = load > load.mean(), load < load.mean()
        assert overloaded.any() and underloaded.any()  # the routing is unbalanced, so there is something to correct
        torch.testing.assert_close(step[overloaded], torch.full_like(step[overloaded], -rate), atol=1e-7, rtol=0)
        torch.testing.assert_close(step[underloaded], torch.full_like(step[underloaded], rate), atol=1e-7, rtol=0)
        assert torch.all(step[load == load.mean()] == 0)


def test_padding_does_not_steer_the_bias():
    """The load counts real tokens only: padding tokens are routed, but their choices are not a load to balance."""
    rate = 0.01
    model = moe_model(**ROUTERS["softmax_topk"], router_bias_update_rate=rate)
    input_ids, attention_mask = left_padded([3, 12], seed=14)  # 9 of 24 tokens are padding
    biases = [router.e_score_correction_bias.clone() for router in routers(model)]
    calls = RouterCalls(model.train())
    try:
        model(input_ids, attention_mask=attention_mask)
    finally:
        calls.remove()
    real = attention_mask.flatten().bool()
    for index, router in enumerate(routers(model)):
        (_, chosen), = calls.calls[index]
        load = torch.bincount(chosen[real].flatten(), minlength=model.config.num_experts).float()
        expected_step = rate * torch.sign(load.mean() - load)
        torch.testing.assert_close(router.e_score_correction_bias - biases[index], expected_step)


def test_trainer_trains_with_router_losses_and_bias_updates(tmp_path):
    model = moe_model(
        **ROUTERS["softmax_topk"], output_router_logits=True, router_z_loss_coef=0.001, router_bias_update_rate=0.01
    ).train()
    assert not model.accepts_loss_kwargs  # the router losses are per-batch means
    rows = token_ids(16, 12, seed=13).tolist()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    biases = [router.e_score_correction_bias.clone() for router in routers(model)]
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows, "labels": rows}))
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses) and math.isfinite(result.training_loss)
    for router, before in zip(routers(model), biases):
        assert not torch.equal(router.e_score_correction_bias, before)
        # Four steps of +-rate: every entry moved by a multiple of the rate, at most four times.
        steps = (router.e_score_correction_bias - before) / 0.01
        torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)
        assert steps.abs().max() <= 4


# --------------------------------------------------------------------------------------------- invalid configs


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"num_experts": 4, "num_experts_per_tok": 5}, r"num_experts_per_tok \(5\) must lie in \[1, num_experts=4\]"),
        ({"num_experts": 6, "router_type": "sigmoid_group_topk", "n_group": 4},
         r"n_group \(4\) must divide num_experts"),
        ({"num_experts": 8, "router_type": "sigmoid_group_topk", "n_group": 2, "topk_group": 3},
         r"topk_group \(3\) must lie in \[1, n_group=2\]"),
        ({"num_experts": 8, "num_experts_per_tok": 2, "router_scope": "document", "experts_per_document": 1},
         r"experts_per_document \(1\) must lie in \[num_experts_per_tok=2"),
        ({"num_experts": 4, "num_experts_per_tok": 2, "router_type": "sigmoid_top1_scaled_input"},
         "num_experts_per_tok must be 1"),
        ({"num_experts": 4, "mlp_layer_types": ["sparse"]}, "mlp_layer_types has 1 entries, expected 2"),
        ({"num_experts": 4, "mlp_layer_types": ["sparse", "moe"]}, r"mlp_layer_types.*'moe'"),
        ({"mlp_layer_types": ["dense", "sparse"]}, "'sparse' layers but num_experts is 0"),
        ({"num_experts": 4, "router_scope": "sentence"}, "router_scope"),
    ],
    ids=["top_k_above_experts", "n_group_not_dividing", "topk_group_above_n_group", "document_set_below_top_k",
         "scaled_input_top2", "mlp_layer_types_length", "mlp_layer_types_value", "sparse_without_experts",
         "router_scope"],
)  # fmt: skip
def test_invalid_moe_configs_are_refused(fields, message):
    with pytest.raises(StrictDataclassError, match=message):
        build_tiny_config(**fields)
