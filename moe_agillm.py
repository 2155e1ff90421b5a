"""AGILLM's mixture-of-experts layer: router, experts, the sparse block, and the router losses.

`AgillmSparseMoeBlock` = a router (`ROUTER_CLASSES[config.router_type]`, subclasses of `AgillmRouter`: scores,
picks `num_experts_per_tok` experts per token) + experts as 3-D parameters (`AgillmExperts` gated,
`AgillmPlainExperts` with biases), which transformers' `ExpertsInterface` can swap for grouped kernels
(`@use_experts_implementation`), + an optional shared expert. `DocumentRouting` is the per-forward state of
`router_scope="document"`. A remote-code sibling of `modeling_agillm.py`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation


try:  # a saved model folder (remote code): sibling modules of the same package
    from .configuration_agillm import AgillmConfig
    from .layers_agillm import AgillmMLP
except ImportError:  # this repository, imported as top-level modules
    from configuration_agillm import AgillmConfig
    from layers_agillm import AgillmMLP


@dataclass
class DocumentRouting:
    """Document-level routing state of one forward (`config.router_scope="document"`).

    `document_ids` [batch, seq] numbers each row's documents (-1 = padding). A document's experts are the
    `experts_per_document` best by its tokens' mean router score. When the tokens continue a cached sequence (decoding),
    they belong to the cached row's last document and reuse its experts, kept in `chosen` (stored on the cache object).
    """

    document_ids: torch.Tensor
    experts_per_document: int
    continues_cache: bool
    chosen: dict

    @classmethod
    def build(cls, config, attention_mask, position_ids, past_key_values, batch_size: int, seq_len: int):
        positions = position_ids.expand(batch_size, seq_len)
        # A document starts at the first token and wherever the positions restart (packed sequences).
        starts = torch.ones_like(positions, dtype=torch.bool)
        starts[:, 1:] = positions[:, 1:] <= positions[:, :-1]
        document_ids = starts.long().cumsum(dim=1) - 1
        if attention_mask is not None and attention_mask.dim() == 2:
            document_ids = document_ids.masked_fill(attention_mask[:, -seq_len:] == 0, -1)
        continues_cache = past_key_values is not None and past_key_values.get_seq_length() > 0
        chosen = {} if past_key_values is None else past_key_values.__dict__.setdefault("agillm_document_experts", {})
        return cls(document_ids, config.experts_per_document, continues_cache, chosen)

    def allowed_experts(self, layer_idx: int, scores: torch.Tensor) -> torch.Tensor:
        """`[tokens, experts]` mask of the experts each token may use, from the `[tokens, experts]` router scores."""
        batch, seq_len = self.document_ids.shape
        if self.continues_cache:
            if layer_idx not in self.chosen:
                raise ValueError("Document routing continues a cache whose prompt was not routed by document.")
            return self.chosen[layer_idx][:, None, :].expand(batch, seq_len, -1).reshape(batch * seq_len, -1)
        num_experts = scores.shape[-1]
        valid = self.document_ids >= 0
        index = self.document_ids.clamp(min=0)[..., None].expand(batch, seq_len, num_experts)
        token_scores = scores.detach().view(batch, seq_len, num_experts) * valid[..., None]
        pooled = torch.zeros_like(token_scores).scatter_add_(1, index, token_scores)  # [batch, documents, experts]
        top = pooled.topk(self.experts_per_document, dim=-1).indices
        document_mask = torch.zeros_like(pooled, dtype=torch.bool).scatter_(-1, top, True)
        allowed = document_mask.gather(1, index)  # padding rows get document 0's experts; their outputs are unused
        self.chosen[layer_idx] = allowed[:, -1]  # the row's last document, continued by generated tokens
        return allowed.reshape(batch * seq_len, num_experts)


class AgillmRouter(nn.Module):
    """Scores experts per token and picks `num_experts_per_tok` of them; one subclass per `config.router_type`
    (`ROUTER_CLASSES`), as transformers' Qwen3-MoE / DeepSeek-V3 / Llama 4 each have their own router.

    Returns the raw router logits, the routing weights and the chosen expert indices. What the families share lives
    here: the optional balancing bias (it steers which experts are chosen, never their weights), document routing,
    group-limited choice (`n_group > 1`) and top-k. A family sets how it scores (`sigmoid_scores`), whether it always
    has the bias, and how the chosen scores become weights (`_routing_weights`).
    """

    sigmoid_scores = False  # sigmoid affinities (else softmax over the experts)
    always_has_bias = False  # DeepSeek-V3's balancing bias even without `router_bias_update_rate`
    scales_expert_input = False  # Llama 4: the weight scales the expert's input, not its output

    def __init__(self, config: AgillmConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))
        bias = torch.zeros(config.num_experts) if self.has_balancing_bias(config) else None
        self.register_buffer("e_score_correction_bias", bias)

    @classmethod
    def has_balancing_bias(cls, config: AgillmConfig) -> bool:
        return cls.always_has_bias or config.router_bias_update_rate > 0

    def router_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, self.weight).float()  # [tokens, experts], routing in fp32

    def scores(self, router_logits: torch.Tensor) -> torch.Tensor:
        """Per-expert affinities."""
        return router_logits.sigmoid() if self.sigmoid_scores else router_logits.softmax(dim=-1)

    def forward(
        self, hidden_states: torch.Tensor, document_routing: DocumentRouting | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = self.router_logits(hidden_states)
        scores = self.scores(router_logits)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if document_routing is not None:
            allowed = document_routing.allowed_experts(self.layer_idx, scores)
            choice = choice.masked_fill(~allowed, float("-inf"))
        if self.n_group > 1:
            choice = self._keep_top_groups(choice)
        top_choice, top_index = torch.topk(choice, self.top_k, dim=-1)  # ties go to the lower index, as argmax
        top_scores = top_choice if choice is scores else scores.gather(-1, top_index)  # weights never see the bias
        top_weights = self._routing_weights(top_scores)
        return router_logits, top_weights.to(hidden_states.dtype), top_index

    def _keep_top_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3: score each expert group by its two best experts, keep the `topk_group` best groups."""
        grouped = choice.view(choice.shape[0], self.n_group, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        top_groups = group_scores.topk(self.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)

    def _routing_weights(self, top_scores: torch.Tensor, epsilon: float = 0.0) -> torch.Tensor:
        """Renormalised over the chosen experts (`norm_topk_prob`), then scaled by `routed_scaling_factor`."""
        if self.norm_topk_prob:
            denominator = top_scores.sum(dim=-1, keepdim=True)
            top_scores = top_scores / (denominator + epsilon if epsilon else denominator)
        return top_scores * self.routed_scaling_factor if self.routed_scaling_factor != 1.0 else top_scores

    @torch.no_grad()
    def update_bias(self, top_index: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing step: raise the bias of under-loaded experts, lower the rest."""
        load = torch.bincount(top_index.flatten(), minlength=self.weight.shape[0]).float()
        self.e_score_correction_bias += rate * torch.sign(load.mean() - load)


class AgillmSoftmaxTopKRouter(AgillmRouter):
    """`softmax_topk` (Mixtral, Qwen3-MoE): softmax over the experts, top-k, optionally renormalised."""


class AgillmGroupTopKRouter(AgillmRouter):
    """`sigmoid_group_topk` (DeepSeek-V3): fp32 sigmoid scores, chosen with the balancing bias within the best groups."""

    sigmoid_scores = True
    always_has_bias = True

    def router_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states.float(), self.weight.float())  # DeepSeek-V3 routes from fp32 inputs

    def _routing_weights(self, top_scores: torch.Tensor, epsilon: float = 1e-20) -> torch.Tensor:
        return super()._routing_weights(top_scores, epsilon)


class AgillmScaledInputRouter(AgillmRouter):
    """`sigmoid_top1_scaled_input` (Llama 4): the chosen expert's sigmoid score scales its input
    (`AgillmSparseMoeBlock`); the output is not weighted."""

    sigmoid_scores = True
    scales_expert_input = True

    def _routing_weights(self, top_scores: torch.Tensor) -> torch.Tensor:
        return top_scores


class AgillmStraightThroughRouter(AgillmRouter):
    """`top1_straight_through` (AGILLM 4.x): one expert per token, weight exactly 1.0 in the forward pass with the
    gradient `d(p) / p` of the chosen probability, so the expert output is not scaled by p."""

    def _routing_weights(self, top_scores: torch.Tensor) -> torch.Tensor:
        top_scores = top_scores.clamp(min=1e-6)
        return top_scores / top_scores.detach()


ROUTER_CLASSES = {
    "softmax_topk": AgillmSoftmaxTopKRouter,
    "sigmoid_group_topk": AgillmGroupTopKRouter,
    "sigmoid_top1_scaled_input": AgillmScaledInputRouter,
    "top1_straight_through": AgillmStraightThroughRouter,
}


def _experts_forward(experts: nn.Module, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """Eager experts: for each expert that received tokens, run them as one batch and add the weighted result."""
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=experts.num_experts).permute(2, 1, 0)  # [E, k, tokens]
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_hidden_states = experts.expert_hidden(hidden_states[token_idx], expert_idx)
        down_bias = experts.down_proj_bias[expert_idx] if experts.has_bias else None
        current_hidden_states = F.linear(current_hidden_states, experts.down_proj[expert_idx], down_bias)
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    return final_hidden_states


def _expert_params(module: nn.Module, name: str, num_experts: int, in_features: int, out_features: int, bias: bool):
    module.register_parameter(name, nn.Parameter(torch.empty(num_experts, out_features, in_features)))
    if bias:
        module.register_parameter(f"{name}_bias", nn.Parameter(torch.zeros(num_experts, out_features)))


@use_experts_implementation(has_gate=True, has_bias=False)
class AgillmExperts(nn.Module):
    """Gated experts as 3-D parameters (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]), as Qwen3-MoE."""

    def __init__(self, config: AgillmConfig):
        super().__init__()
        self.num_experts = config.num_experts
        hidden, intermediate = config.hidden_size, config.moe_intermediate_size
        _expert_params(self, "gate_up_proj", self.num_experts, hidden, 2 * intermediate, bias=False)
        _expert_params(self, "down_proj", self.num_experts, intermediate, hidden, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def expert_hidden(self, hidden_states: torch.Tensor, expert_idx) -> torch.Tensor:
        bias = self.gate_up_proj_bias[expert_idx] if self.has_bias else None
        gate, up = F.linear(hidden_states, self.gate_up_proj[expert_idx], bias).chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        return _experts_forward(self, hidden_states, top_k_index, top_k_weights)


@use_experts_implementation(has_gate=False, has_bias=True)
class AgillmPlainExperts(nn.Module):
    """Plain experts with biases (`up_proj` [E, I, H], `down_proj` [E, H, I]): AGILLM 4.x's ReLU experts."""

    def __init__(self, config: AgillmConfig):
        super().__init__()
        self.num_experts = config.num_experts
        hidden, intermediate = config.hidden_size, config.moe_intermediate_size
        _expert_params(self, "up_proj", self.num_experts, hidden, intermediate, bias=True)
        _expert_params(self, "down_proj", self.num_experts, intermediate, hidden, bias=True)
        self.act_fn = ACT2FN[config.hidden_act]

    def expert_hidden(self, hidden_states: torch.Tensor, expert_idx) -> torch.Tensor:
        bias = self.up_proj_bias[expert_idx] if self.has_bias else None
        return self.act_fn(F.linear(hidden_states, self.up_proj[expert_idx], bias))

    def forward(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        return _experts_forward(self, hidden_states, top_k_index, top_k_weights)


class AgillmSparseMoeBlock(nn.Module):
    """Routed experts plus an optional shared expert (always on; gated per token when `shared_expert_gate`)."""

    def __init__(self, config: AgillmConfig, layer_idx: int):
        super().__init__()
        self.gate = ROUTER_CLASSES[config.router_type](config, layer_idx)
        self.experts = AgillmExperts(config) if config.mlp_type == "gated" else AgillmPlainExperts(config)
        self.shared_expert = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = AgillmMLP(config, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None

    def forward(self, hidden_states: torch.Tensor, document_routing: DocumentRouting | None = None) -> torch.Tensor:
        batch, seq_len, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)
        _, top_k_weights, top_k_index = self.gate(flat, document_routing)
        if self.gate.scales_expert_input:  # Llama 4: the expert sees its input scaled by the router score
            output = self.experts(flat * top_k_weights, top_k_index, torch.ones_like(top_k_weights))
        else:
            output = self.experts(flat, top_k_index, top_k_weights)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            output = output + shared
        return output.reshape(batch, seq_len, hidden)



def router_losses(
    router_logits: tuple[torch.Tensor, ...],
    router_indices: tuple[torch.Tensor, ...],
    num_experts: int,
    sigmoid_scores: bool,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load-balancing loss `E * sum_e f_e * P_e` (Switch/Mixtral) and z-loss `mean(logsumexp(logits)^2)` (ST-MoE).

    `f_e` is the fraction of tokens routed to expert e (per top-k slot, summed over slots, as Mixtral's
    `load_balancing_loss_func`), `P_e` the mean routing probability (sigmoid scores are normalised per token, as
    DeepSeek-V3's balance loss). The chosen experts are the ones the routers actually picked, so document routing
    and biased (DeepSeek-V3) choices are counted as they happened. Padding tokens are left out.

    No router logits (a dense model asked for them: `output_router_logits=True` records an empty tuple, as trainers
    such as TRL's request them for any config that has the flag) means no router to balance: both losses are zero.
    """
    if not router_logits:
        zero = torch.zeros((), device=attention_mask.device if attention_mask is not None else None)
        return zero, zero.clone()
    logits = torch.cat(router_logits, dim=0)
    chosen = F.one_hot(torch.cat(router_indices, dim=0), num_experts).float()  # [layers * tokens, k, E]
    probs = logits.sigmoid() if sigmoid_scores else logits.softmax(dim=-1)
    if sigmoid_scores:
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if attention_mask is None:
        weights = torch.ones(logits.shape[0], device=logits.device)
    else:
        seq_len = router_logits[0].shape[0] // attention_mask.shape[0]  # the routers saw the last seq_len positions
        weights = attention_mask[:, -seq_len:].reshape(-1).float().repeat(len(router_logits))
    total = weights.sum().clamp(min=1.0)
    tokens_per_expert = (chosen * weights[:, None, None]).sum(dim=0) / total
    prob_per_expert = (probs * weights[:, None]).sum(dim=0) / total
    balance = num_experts * (tokens_per_expert * prob_per_expert[None]).sum()
    z_loss = (torch.logsumexp(logits, dim=-1).pow(2) * weights).sum() / total
    return balance, z_loss
