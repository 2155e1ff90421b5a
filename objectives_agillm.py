"""AGILLM's training objectives: the heads beyond the trunk and the loss of every objective.

    objective  head on AgillmForCausalLM     attention pattern (AgillmModel.attention_masks)   loss here
    ar         lm_head                       causal                                              ar_loss
    mtp        lm_head over the MTP modules  causal, shifted by each depth                       mtp_loss
    sat        sat_head (proj + stride gate) block-causal, blocks of sat_block_size              sat_loss
    nat        nat_head                      bidirectional, or block NAT over clean blocks       nat_loss (+ nat_noise)

`multi_objective_forward` is what `AgillmForCausalLM.forward` returns for labels without an `objective`: the sum of
the objectives weighted by `config.objective_weights`, one trunk pass per objective (`draft_losses`: AR and NAT from
one pass with `nat_objective="draft"`). The decoders that use each head live in `generation_agillm.py`, the
DiffusionBlocks training mode in `diffusion_blocks_agillm.py`. Every loss is a function of the model, its inputs
and `labels` (aligned with `input_ids`; each objective shifts them itself). With `cross_entropy_chunk_size` in
training the losses project hidden states chunk by chunk (`losses_agillm.py`) and no logits are made. A remote-code
sibling of `modeling_agillm.py`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast


try:  # a saved model folder (remote code): sibling modules of the same package
    from .attention_agillm import MASK_BUILDERS
    from .configuration_agillm import AgillmConfig
    from .losses_agillm import head_cross_entropy
except ImportError:  # this repository, imported as top-level modules
    from attention_agillm import MASK_BUILDERS
    from configuration_agillm import AgillmConfig
    from losses_agillm import head_cross_entropy


@dataclass(frozen=True)
class Objective:
    """What `forward(objective=name)` runs, and what else reads the same head.

    head: the head's attribute on `AgillmForCausalLM`.
    block_size_field: the config field giving the attention blocks the head is trained and decoded with (tokens of
        a block see each other, earlier blocks causally; `AgillmModel.attention_masks`). None: causal (AR). NAT with
        `nat_block_size=None` attends both ways over the whole sequence.
    generation_modes: the `generate(generation_mode=...)` decoders that read this head (`generation_agillm.py`;
        "ar" is plain `generate`).
    """

    head: str
    block_size_field: str | None
    generation_modes: tuple[str, ...]

    def block_size(self, config: AgillmConfig) -> int | None:
        """Tokens per attention block; None for causal attention (AR) and for NAT over the whole sequence."""
        return None if self.block_size_field is None else getattr(config, self.block_size_field)

    def attention(self, config: AgillmConfig) -> str:
        """The attention pattern: "causal", "block_causal" (blocks of `block_size`) or "bidirectional"."""
        if self.block_size_field is None:
            return "causal"
        return "bidirectional" if self.block_size(config) is None else "block_causal"


OBJECTIVES = {
    "ar": Objective("lm_head", None, ("ar", "staged", "verify_and_draft")),
    "sat": Objective("sat_head", "sat_block_size", ("sat", "staged")),
    "nat": Objective("nat_head", "nat_block_size", ("nat_mask_predict", "nat_block", "staged", "verify_and_draft")),
}


def trained_objectives(config: AgillmConfig) -> list[str]:
    """The objectives training optimises: those with a positive weight in `config.objective_weights`."""
    return [name for name, weight in config.objective_weights.items() if weight > 0]


@dataclass
class AgillmCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    loss (`torch.FloatTensor`, *optional*): the (weighted multi-objective) training loss, when `labels` are given.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`): the selected head's logits
        (the AR head's when several objectives are trained at once).
    objective_losses (`dict[str, torch.FloatTensor]`, *optional*): each objective's unweighted loss.
    gate_logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, sat_block_size)`, *optional*): SAT
        stride-gate logits at every position (class `s - 1` = emit `s` tokens); read at a block's first position.
    router_logits (`tuple[torch.FloatTensor]`, *optional*): per MoE layer, router logits `[tokens, experts]`
        (with `output_router_logits=True`).
    aux_loss (`torch.FloatTensor`, *optional*): the weighted router losses (load balancing + z-loss) included in
        `loss` (with `output_router_logits=True`).
    """

    objective_losses: dict[str, torch.FloatTensor] | None = None
    gate_logits: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None


class AgillmSATHead(nn.Module):
    """SAT head: `proj` predicts token t + `sat_block_size` at position t; `gate` scores stride 1..block size."""

    def __init__(self, config: AgillmConfig):
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.vocab_size, bias=config.head_bias)
        self.gate = nn.Linear(config.hidden_size, config.sat_block_size, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(hidden_states), self.gate(hidden_states)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over targets that are not -100, computed in fp32; zero (with grad) if there are none."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1).to(logits.device)
    if not (targets != -100).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets, ignore_index=-100, label_smoothing=label_smoothing)


# --------------------------------------------------------------------------------------------------- losses
# Each objective's loss first, then what combines them: one head pass (`head_loss`), NAT's own pass (`nat_forward`),
# the draft layout and the weighted sum (`multi_objective_forward`).


def uses_chunked_cross_entropy(model) -> bool:
    """Training with `config.cross_entropy_chunk_size`: losses project hidden states in chunks, no logits."""
    return model.training and model.config.cross_entropy_chunk_size is not None


def projected_cross_entropy(model, projection: nn.Linear, hidden_states, targets, label_smoothing=0.0, **kwargs):
    """`token_cross_entropy(projection(hidden_states), targets, label_smoothing)` without the full logits."""
    return head_cross_entropy(
        projection, hidden_states, targets, chunk_size=model.config.cross_entropy_chunk_size,
        label_smoothing=label_smoothing, **kwargs,
    )  # fmt: skip


def ar_loss(model, logits: torch.Tensor | None, labels: torch.Tensor, hidden_states=None, **kwargs):
    """Next-token loss, from `logits` or (`logits=None`, chunked cross-entropy) from `hidden_states`."""
    smoothing = model.config.label_smoothing_for("ar")
    targets = kwargs["shift_labels"] if kwargs.get("shift_labels") is not None else labels[:, 1:]
    if logits is None:  # as below: `num_items_in_batch` normalises the unsmoothed loss only
        rows = hidden_states if kwargs.get("shift_labels") is not None else hidden_states[:, :-1]
        num_items = None if smoothing else kwargs.get("num_items_in_batch")
        return projected_cross_entropy(model, model.lm_head, rows, targets, smoothing, num_items_in_batch=num_items)
    if not (targets != -100).any():  # nothing to predict: zero with grad, as every other head (not NaN)
        return logits.sum() * 0.0
    if not smoothing:
        return model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size, **kwargs)
    if kwargs.get("shift_labels") is not None:
        return token_cross_entropy(logits, kwargs["shift_labels"], smoothing)
    return token_cross_entropy(logits[:, :-1], labels[:, 1:], smoothing)


def mtp_loss(model, inputs: dict, main_hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 MTP loss: the mean over depths k of the cross-entropy of depth k's guess of token t + k + 2.

    Depth k combines the previous depth's hidden state at t (depth -1: the trunk's final hidden state, as
    transformers' `MtpModel` receives it) with the embedding of token t + k + 1, at that token's position.
    """
    embeds = inputs["inputs_embeds"]
    if embeds is None:
        embeds = model.model.embed_tokens(inputs["input_ids"])
    batch, seq_len = embeds.shape[:2]
    position_ids = inputs["position_ids"]
    if position_ids is None:
        position_ids = torch.arange(seq_len, device=embeds.device)[None]
    position_ids = position_ids.expand(batch, -1)
    attention_mask = inputs["attention_mask"]
    hidden, losses = main_hidden, []
    for depth, layer in enumerate(model.model.layers[model.config.num_hidden_layers :]):
        length = seq_len - depth - 1
        if length < 1:
            break
        shifted = slice(depth + 1, depth + 1 + length)
        layer_embeds, layer_positions = embeds[:, shifted], position_ids[:, shifted]
        mask = MASK_BUILDERS[layer.attention_type](
            config=model.config,
            inputs_embeds=layer_embeds,
            attention_mask=attention_mask[:, shifted] if attention_mask is not None else None,
            past_key_values=None,
            position_ids=layer_positions,
        )
        hidden = layer.predict(
            layer_embeds,
            hidden[:, :length],
            attention_mask=mask,
            position_embeddings=model.model.rotary_emb(layer_embeds, position_ids=layer_positions),
            position_ids=layer_positions,
        )
        targets = F.pad(labels[:, depth + 2 :], (0, 1), value=-100)
        if uses_chunked_cross_entropy(model):
            losses.append(projected_cross_entropy(model, model.lm_head, hidden, targets))
        else:
            losses.append(token_cross_entropy(model.lm_head(hidden), targets))
    return torch.stack(losses).mean() if losses else main_hidden.new_zeros(())


def sat_loss(model, logits, gate_logits: torch.Tensor, labels: torch.Tensor, hidden_states=None) -> torch.Tensor:
    """Token t + b at position t; plus, with `sat_gate_loss`, the gate on the stride that was safe to emit.

    From `logits`, or (`logits=None`, chunked cross-entropy) from `hidden_states`, whose chunks also give the
    predicted tokens the gate target needs.
    """
    block, gate = model.config.sat_block_size, model.config.sat_gate_loss
    smoothing = model.config.label_smoothing_for("sat")
    if logits is None:
        result = projected_cross_entropy(model, 
            model.sat_head.proj, hidden_states[:, :-block], labels[:, block:], smoothing, return_argmax=gate
        )
        loss, predicted = result if gate else (result, None)
    else:
        loss = token_cross_entropy(logits[:, :-block], labels[:, block:], smoothing)
        predicted = logits.detach().argmax(-1) if gate else None
    if gate:
        loss = loss + stride_gate_loss(model, predicted, gate_logits, labels)
    return loss


def sat_gate_loss(model, logits: torch.Tensor, gate_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The stride-gate loss of `_stride_gate_loss`, from the SAT head's logits."""
    return stride_gate_loss(model, logits.argmax(-1), gate_logits, labels)


def stride_gate_loss(model, predicted: torch.Tensor, gate_logits: torch.Tensor, labels: torch.Tensor):
    """Gate target at a block start t: (number of leading correct predictions of tokens t+b .. t+2b-1) - 1.

    A SAT step always emits its first token; each further token is safe only if it and all before it are what
    the data says. That count is the stride the gate should pick (AGILLM 4.x trained the gate on no target).
    `predicted` holds the SAT head's argmax at each position.
    """
    block = model.config.sat_block_size
    num_blocks = (labels.shape[1] - block) // block  # blocks whose b targets all lie inside the sequence
    if num_blocks <= 0:
        return gate_logits.sum() * 0.0
    span = num_blocks * block
    predicted = predicted[:, :span].reshape(-1, num_blocks, block)
    targets = labels[:, block : block + span].to(predicted.device).view(-1, num_blocks, block)
    correct = (predicted == targets).long().cumprod(dim=-1).sum(-1)  # leading run of correct predictions
    stride_class = (correct.clamp(min=1) - 1).masked_fill((targets == -100).any(-1), -100)
    return token_cross_entropy(gate_logits[:, :span:block], stride_class)


def nat_noise(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide each target with probability r ~ U(0, 1), drawn per row (per block with `nat_block_size`); with
    `nat_objective="draft"`, hide every token (a draft block starts all masks).

    AGILLM 4.x hid each token with probability 0.5; a uniform ratio trains every masking level that decoding
    meets, from the first pass (all hidden) to the last (a few hidden).

    Returns the noised ids and the NAT targets (`labels` where hidden, -100 elsewhere).
    """
    batch, seq_len = input_ids.shape
    if model.config.nat_objective == "draft":  # every token hidden: the draft block decoding starts from
        return torch.full_like(input_ids, model.config.nat_mask_token_id), labels
    block = model.config.nat_block_size or seq_len
    num_blocks = -(-seq_len // block)
    # Training draws fresh masks; evaluation draws the same ones every call, so held-out NAT loss is reproducible.
    generator = None if model.training else torch.Generator(input_ids.device).manual_seed(0)
    draw = {"device": input_ids.device, "generator": generator}
    ratio = torch.rand(batch, num_blocks, 1, **draw).expand(-1, -1, block).reshape(batch, -1)[:, :seq_len]
    hidden = (torch.rand(batch, seq_len, **draw) < ratio) & (labels != -100)
    noised = input_ids.masked_fill(hidden, model.config.nat_mask_token_id)
    return noised, labels.masked_fill(~hidden, -100)


def nat_loss(model, inputs: dict, labels: torch.Tensor, **kwargs):
    """Cross-entropy of the NAT head on the tokens it hid.

    Bidirectional NAT (AGILLM 4.x) runs on the noised sequence. Block NAT trains exactly as it decodes: the
    clean sequence and the noised one run side by side; a noised block sees the *clean* earlier blocks and its
    own noised block, a clean block sees clean blocks up to itself — the KV cache of finished blocks at decode.
    With `nat_objective="draft"` the clean tokens are causal instead (the AR cache `verify_and_draft` drafts
    over) and the noised copy is all masks.
    """
    input_ids = inputs["input_ids"]
    if input_ids is None:
        raise ValueError("The NAT loss needs input_ids (it replaces hidden tokens by nat_mask_token_id).")
    noised, targets = nat_noise(model, input_ids, labels)
    if model.config.nat_block_size is None:
        outputs = model.model(**{**inputs, "input_ids": noised}, use_cache=False, objective="nat", **kwargs)
        hidden_states = outputs.last_hidden_state
    else:
        outputs = clean_and_noised_pass(model, inputs, noised, **kwargs)
        hidden_states = outputs.last_hidden_state[:, input_ids.shape[1] :]
    smoothing = model.config.label_smoothing_for("nat")
    if uses_chunked_cross_entropy(model):
        return projected_cross_entropy(model, model.nat_head, hidden_states, targets, smoothing), None, outputs
    logits = model.nat_head(hidden_states)
    return token_cross_entropy(logits, targets, smoothing), logits, outputs


def clean_and_noised_pass(model, inputs: dict, noised: torch.Tensor, **kwargs) -> BaseModelOutputWithPast:
    """The trunk over [clean ids ; noised ids] at the same positions, with block NAT's mask (see `nat_loss`)."""
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    batch, seq_len = input_ids.shape
    position_ids = inputs["position_ids"]
    if position_ids is None:
        position_ids = torch.arange(seq_len, device=input_ids.device)[None].expand(batch, -1)
    position_ids = position_ids.expand(batch, -1)
    block_of = position_ids // model.config.nat_block_size

    causal_clean = model.config.nat_objective == "draft"  # clean tokens as AR sees them, else block-causal

    def clean_then_noised(batch_idx, head_idx, q_idx, kv_idx):
        q_clean, kv_clean = q_idx < seq_len, kv_idx < seq_len
        q_block = block_of[batch_idx, torch.where(q_clean, q_idx, q_idx - seq_len)]
        kv_block = block_of[batch_idx, torch.where(kv_clean, kv_idx, kv_idx - seq_len)]
        seen_clean = (kv_idx <= q_idx) if causal_clean else (kv_block <= q_block)
        clean_query = q_clean & kv_clean & seen_clean
        noised_query = ~q_clean & ((kv_clean & (kv_block < q_block)) | (~kv_clean & (kv_block == q_block)))
        return clean_query | noised_query

    padding = None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=-1).bool()
    inputs_embeds = model.model.embed_tokens(torch.cat([input_ids, noised], dim=-1))
    mask = ALL_MASK_ATTENTION_FUNCTIONS[model.config._attn_implementation](
        batch_size=batch,
        q_length=2 * seq_len,
        kv_length=2 * seq_len,
        mask_function=clean_then_noised,
        attention_mask=padding,
        allow_is_causal_skip=False,
        dtype=inputs_embeds.dtype,
        config=model.config,
        device=inputs_embeds.device,
    )
    model.model.check_token_ids(input_ids)
    return model.model(
        inputs_embeds=inputs_embeds,
        attention_mask={"full_attention": mask},
        position_ids=torch.cat([position_ids, position_ids], dim=-1),
        use_cache=False,
        objective="nat",
        **kwargs,
    )


def head_loss(model, objective: str, inputs: dict, labels, logits, gate_logits, hidden_states, trunk_hidden, **kwargs):
    """(loss, each objective's loss) of one AR or SAT pass; AR adds the MTP loss when the model has MTP modules.

    `hidden_states` are the rows the head projected (chunked cross-entropy reads them), `trunk_hidden` the trunk's
    whole final hidden state (the MTP modules' input).
    """
    if objective == "ar":
        loss = ar_loss(model, logits, labels, hidden_states, **kwargs)
    else:
        loss = sat_loss(model, logits, gate_logits, labels, hidden_states)
    losses = {objective: loss}
    if objective == "ar" and model.config.num_mtp_layers:
        losses["mtp"] = mtp_loss(model, inputs, trunk_hidden, labels)
        loss = loss + model.config.mtp_loss_weight * losses["mtp"]
    return loss, losses


def nat_forward(model, inputs: dict, labels, **kwargs) -> AgillmCausalLMOutputWithPast:
    """`forward(objective="nat", labels=...)`: the NAT loss and logits of its own noised pass."""
    loss, logits, outputs = nat_loss(model, inputs, labels, **kwargs)
    return AgillmCausalLMOutputWithPast(
        loss=loss, logits=logits, objective_losses={"nat": loss}, hidden_states=outputs.hidden_states,
        attentions=outputs.attentions, router_logits=outputs.get("router_logits"),
    )


def draft_losses(model, inputs: dict, labels: torch.Tensor, **kwargs) -> tuple[dict, AgillmCausalLMOutputWithPast]:
    """`nat_objective="draft"`: the AR loss (+ MTP) and the NAT loss from ONE pass over [clean ; all masks].

    The clean half is causal and never sees a mask token, so its hidden states, AR loss and MTP loss are those of
    a plain AR pass; the mask half is the NAT draft of every block given the clean blocks before it.
    """
    nat, _, outputs = nat_loss(model, inputs, labels, **kwargs)
    clean_hidden = outputs.last_hidden_state[:, : labels.shape[1]]
    logits = None if uses_chunked_cross_entropy(model) else model.lm_head(clean_hidden)
    losses = {"ar": ar_loss(model, logits, labels, clean_hidden), "nat": nat}
    if model.config.num_mtp_layers:
        losses["mtp"] = mtp_loss(model, inputs, clean_hidden, labels)
        losses["ar"] = losses["ar"] + model.config.mtp_loss_weight * losses["mtp"]
    return losses, AgillmCausalLMOutputWithPast(logits=logits, hidden_states=outputs.hidden_states)


def multi_objective_forward(model, inputs: dict, labels: torch.Tensor, **kwargs) -> AgillmCausalLMOutputWithPast:
    """`sum_o weight_o * loss_o`, one trunk pass per objective (each needs its own attention pattern)."""
    kwargs.pop("num_items_in_batch", None)  # each objective averages over its own targets
    losses, ar_output = {}, None
    objectives = trained_objectives(model.config)
    if model.config.nat_objective == "draft" and {"ar", "nat"} <= set(objectives):
        # TiDAR layout: one pass gives both the AR loss (clean half) and the NAT loss (all-mask half)
        losses, ar_output = draft_losses(model, inputs, labels, **kwargs)
        objectives = [name for name in objectives if name not in ("ar", "nat")]
    for objective in objectives:
        # The class's forward, not `model(...)`: wrappers that engines install on the instance (accelerate's
        # mixed-precision `torch.autocast` around `model.forward`, offload hooks) already wrap this call, and
        # re-entering the same autocast object from inside itself leaves autocast switched on after training.
        output = type(model).forward(model, **inputs, labels=labels, objective=objective, use_cache=False, **kwargs)
        losses[objective] = output.loss
        if objective == "ar":
            ar_output = output
    loss = sum(weight * losses[name] for name, weight in model.config.objective_weights.items() if name in losses)
    return AgillmCausalLMOutputWithPast(
        loss=loss,
        logits=ar_output.logits if ar_output is not None else None,
        objective_losses=losses,
        hidden_states=ar_output.hidden_states if ar_output is not None else None,
    )
