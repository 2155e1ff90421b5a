"""AGILLM decoder: the trunk every AGILLM head stands on.

Data flow (top to bottom of this file):
    token ids -> embed_tokens -> N x AgillmDecoderLayer(pre-norm attention, pre-norm gated MLP) -> norm -> heads

Attention goes through transformers' `ALL_ATTENTION_FUNCTIONS` (eager / sdpa / flex / flash, plus anything
`kernels/` registers), masks come from `masking_utils` (one mask per layer type: full, sliding, chunked), and the
KV cache is a transformers `Cache` whose per-layer kind follows `config.layer_types`. Only sibling files imported
as `from .x import y` travel with a saved model, so this file depends on nothing from this repo but its config.
"""

from collections.abc import Callable

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation, use_kernel_forward_from_hub, use_kernelized_func
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    create_bidirectional_mask,
    create_causal_mask,
    create_chunked_causal_mask,
    create_sliding_window_causal_mask,
)
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs


try:  # a saved model folder (remote code): sibling modules of the same package
    from .configuration_agillm import AgillmConfig
    from .diffusion_blocks_agillm import DiffusionBlocksState, diffusion_blocks_training_step, diffusion_euler_generate
    from .generation_agillm import GENERATION_MODES, agillm_generate
except ImportError:  # this repository, imported as top-level modules
    from configuration_agillm import AgillmConfig
    from diffusion_blocks_agillm import DiffusionBlocksState, diffusion_blocks_training_step, diffusion_euler_generate
    from generation_agillm import GENERATION_MODES, agillm_generate


logger = logging.get_logger(__name__)

# One mask builder per layer type; `AgillmModel.forward` builds each mask once and layers index it by type.
MASK_BUILDERS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
    "chunked_attention": create_chunked_causal_mask,
}


# The attention pattern each head is trained and decoded with (see `AgillmModel.attention_masks`).
OBJECTIVES = ("ar", "sat", "nat")


# --------------------------------------------------------------------------------------------------- norms


@use_kernel_forward_from_hub("RMSNorm")
class AgillmRMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as Llama), scaled by a learned weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class AgillmLayerNorm(nn.LayerNorm):
    """LayerNorm with weight and bias (`norm_type="layer_norm"`); a named subclass so patch mappings can target it."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(hidden_size, eps=eps)


def build_norm(config: AgillmConfig, dim: int) -> nn.Module:
    if config.norm_type == "layer_norm":
        return AgillmLayerNorm(dim, eps=config.rms_norm_eps)
    return AgillmRMSNorm(dim, eps=config.rms_norm_eps)


# --------------------------------------------------------------------------------------------------- rotary


class AgillmRotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE of any transformers `rope_type` (default, linear, dynamic, yarn, llama3, ...)."""

    inv_freq: torch.Tensor

    def __init__(self, config: AgillmConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: AgillmConfig, **kwargs) -> tuple[torch.Tensor, float]:
        """Original RoPE: inverse frequencies `theta^(-2i/d)` over the head dim; no attention scaling."""
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update  # grows the table for rope_type="dynamic"; a no-op for the other types
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@use_kernel_forward_from_hub("rotary_pos_emb")
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Rotate q and k `[batch, heads, seq, head_dim]` by the position tables cos/sin `[batch, seq, head_dim]`."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


# --------------------------------------------------------------------------------------------------- ALiBi


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes, computed in double precision and stored as float32 (as AGILLM 4.x does).

    Power-of-two head counts get `start**(h+1)` with `start = 2**(-8/H)`; otherwise the first `c = 2**floor(log2 H)`
    slopes of that rule, then every other slope of the rule for `2c` heads (the ALiBi paper's recipe).
    """

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two_slopes(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two_slopes(closest) + power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(
    slopes: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor, kind: str
) -> torch.Tensor:
    """Additive attention bias `[batch, heads, q_len, kv_len]` from absolute positions `[batch, q]`, `[batch, kv]`.

    `alibi`: `-m_h * |i - j|` (the standard penalty; under a causal mask it is the paper's `-m_h * (i - j)`).
    `agillm_alibi`: `-m_h * max(j - i, 0)`, AGILLM 4.x's clamp, which penalises only keys after the query.
    """
    distance = key_positions[:, None, None, :] - query_positions[:, None, :, None]
    distance = distance.abs() if kind == "alibi" else distance.clamp(min=0)
    return -slopes.to(distance.device)[None, :, None, None] * distance.to(torch.float32)


def add_bias_to_mask(mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """Fold an additive bias into a transformers mask (None, boolean "may attend", or additive float)."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, torch.finfo(bias.dtype).min)
    return mask + bias


# --------------------------------------------------------------------------------------------------- MLP


class AgillmMLP(nn.Module):
    """`mlp_type="gated"`: `down(act(gate(x)) * up(x))` (SwiGLU with silu); `"plain"`: `down(act(up(x)))`."""

    def __init__(self, config: AgillmConfig, intermediate_size: int | None = None):
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.is_gated = config.mlp_type == "gated"
        if self.is_gated:
            self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_gated:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))


# --------------------------------------------------------------------------------------------------- MoE


class AgillmRouter(nn.Module):
    """Scores experts per token and picks `num_experts_per_tok` of them; returns logits, weights and indices."""

    def __init__(self, config: AgillmConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router_type = config.router_type
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = F.linear(hidden_states, self.weight).float()  # [tokens, experts], routing in fp32
        probs = router_logits.softmax(dim=-1)
        top_probs, top_index = torch.topk(probs, self.top_k, dim=-1)  # ties go to the lower index, as argmax
        if self.router_type == "top1_straight_through":
            # Forward value exactly 1.0 (x / x), gradient d(p)/p: the expert output is not scaled by p.
            top_probs = top_probs.clamp(min=1e-6)
            top_weights = top_probs / top_probs.detach()
        elif self.norm_topk_prob:
            top_weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
        else:
            top_weights = top_probs
        return router_logits, top_weights.to(hidden_states.dtype), top_index


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
    """Routed experts plus an optional always-on shared expert (added unweighted)."""

    def __init__(self, config: AgillmConfig):
        super().__init__()
        self.gate = AgillmRouter(config)
        self.experts = AgillmExperts(config) if config.mlp_type == "gated" else AgillmPlainExperts(config)
        self.shared_expert = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = AgillmMLP(config, config.shared_expert_intermediate_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq_len, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)
        _, top_k_weights, top_k_index = self.gate(flat)
        output = self.experts(flat, top_k_index, top_k_weights)
        if self.shared_expert is not None:
            output = output + self.shared_expert(flat)
        return output.reshape(batch, seq_len, hidden)


# --------------------------------------------------------------------------------------------------- attention


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Expand `[B, H_kv, S, D]` to `[B, H_kv * n_rep, S, D]` so GQA/MQA keys line up with the query heads."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
):
    """Reference attention in plain PyTorch; the other backends are checked against it."""
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


@use_kernelized_func(apply_rotary_pos_emb)
class AgillmAttention(nn.Module):
    """MHA/GQA/MQA self-attention with optional QK-norm, RoPE (unless a NoPE layer) and a per-layer window."""

    def __init__(self, config: AgillmConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True  # read by the sdpa/flash backends when no mask is given; masks carry SAT/NAT patterns
        self.use_rope = config.uses_rope and layer_idx not in config.nope_layers
        self.tie_kv = config.tie_kv
        # Flash attention reads the window from here; the other backends get it through the sliding mask.
        self.sliding_window = config.sliding_window if self.layer_type == "sliding_attention" else None

        q_width = config.num_attention_heads * self.head_dim
        kv_width = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        if not config.tie_kv:  # with tie_kv the key projection also gives the values
            self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_width, config.hidden_size, bias=config.attention_output_bias)
        if config.use_qk_norm:  # per head, over head_dim, before RoPE (Qwen3)
            self.q_norm = build_norm(config, self.head_dim)
            self.k_norm = build_norm(config, self.head_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        # tie_kv: values are the key projection itself (before QK-norm and RoPE, which only shape the scores).
        value_states = key_states if self.tie_kv else self.v_proj(hidden_states).view(hidden_shape)
        value_states = value_states.transpose(1, 2)
        if self.config.use_qk_norm:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)

        if self.use_rope:
            cos, sin = position_embeddings
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


# --------------------------------------------------------------------------------------------------- layers


class AgillmDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))` (dense MLP or MoE)."""

    def __init__(self, config: AgillmConfig, layer_idx: int):
        super().__init__()
        self.attention_type = config.layer_types[layer_idx]
        self.self_attn = AgillmAttention(config=config, layer_idx=layer_idx)
        self.mlp = AgillmSparseMoeBlock(config) if config.num_experts else AgillmMLP(config)
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)  # AGILLM 4.x: on the attention output only
        self.input_layernorm = build_norm(config, config.hidden_size)
        self.post_attention_layernorm = build_norm(config, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + self.hidden_dropout(hidden_states)
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


# --------------------------------------------------------------------------------------------------- models


@auto_docstring
class AgillmPreTrainedModel(PreTrainedModel):
    config: AgillmConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["AgillmDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": AgillmDecoderLayer,
        "attentions": AgillmAttention,
        "router_logits": OutputRecorder(AgillmRouter, index=0),
    }

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, AgillmRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (AgillmExperts, AgillmPlainExperts)):
            for name, parameter in module.named_parameters(recurse=False):
                if name.endswith("_bias"):
                    init.zeros_(parameter)
                else:
                    init.normal_(parameter, mean=0.0, std=std)


@auto_docstring
class AgillmModel(AgillmPreTrainedModel):
    """The AGILLM trunk: embeddings, decoder layers and final norm; returns hidden states and the KV cache."""

    def __init__(self, config: AgillmConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [AgillmDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = build_norm(config, config.hidden_size)
        self.rotary_emb = AgillmRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def _check_token_ids(self, input_ids: torch.Tensor | None) -> None:
        """Out-of-range ids would be an index error on CPU and a device assert on GPU: say what is wrong instead.

        Skipped while compiling (both checks read tensor values, which would break a full-graph capture).
        """
        if input_ids is None or input_ids.numel() == 0 or torch.compiler.is_compiling():
            return
        low, high = torch.aminmax(input_ids)
        if ((low < 0) | (high >= self.config.vocab_size)).item():  # one host sync, not two
            raise ValueError(
                f"input_ids must lie in [0, {self.config.vocab_size}) (vocab_size), got values in "
                f"[{int(low)}, {int(high)}]. Is the tokenizer the one this model was trained with?"
            )

    def _check_last_position(self, last_position: int | torch.Tensor) -> None:
        """Positions past the trained context silently degrade RoPE models; refuse them (dynamic RoPE extrapolates)."""
        extrapolates = self.config.rope_type == "dynamic" or not self.config.uses_rope  # ALiBi/NoPE: no table to run off
        if extrapolates or torch.compiler.is_compiling():
            return
        last_position = int(last_position)
        if last_position >= self.config.max_position_embeddings:
            raise ValueError(
                f"Input reaches position {last_position}, beyond max_position_embeddings="
                f"{self.config.max_position_embeddings}. Shorten the input (prompt + new tokens), or use a "
                "config with a longer context (e.g. rope_type='dynamic', 'yarn' or 'llama3')."
            )


    def _key_positions(self, attention_mask, past_key_values, position_ids, batch_size: int, kv_length: int):
        """Absolute position of every key index `[batch, kv_length]` (left padding shifts them, as `position_ids`)."""
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        elif past_length == 0:
            positions = position_ids
        else:
            positions = torch.arange(past_length + position_ids.shape[-1], device=position_ids.device)[None]
        positions = positions.expand(batch_size, -1)
        if positions.shape[-1] < kv_length:  # a static cache has room for more keys than were seen yet
            extra = torch.arange(1, kv_length - positions.shape[-1] + 1, device=positions.device)
            positions = torch.cat([positions, positions[:, -1:] + extra], dim=-1)
        return positions[:, :kv_length]

    def attention_masks(self, objective, inputs_embeds, attention_mask, past_key_values, position_ids) -> dict:
        """The mask of every layer type for `objective`, with ALiBi folded in: what the decoder layers receive.

        `generate` with a compileable cache passes the masks pre-built (a dict), which are used as they are.
        """
        masks = attention_mask
        if not isinstance(masks, dict):
            masks = self._objective_masks(objective, inputs_embeds, attention_mask, past_key_values, position_ids)
        if self.config.uses_alibi and not (self.config.position_embedding_type == "agillm_alibi" and objective == "ar"):
            # (AGILLM 4.x's clamped ALiBi is exactly zero on every key a causal query sees, so AR skips it.)
            bias = self._alibi_bias(inputs_embeds, attention_mask, past_key_values, position_ids, masks)
            masks = {kind: add_bias_to_mask(mask, bias) for kind, mask in masks.items()}
        return masks

    def _objective_masks(self, objective, inputs_embeds, attention_mask, past_key_values, position_ids) -> dict:
        """One mask per layer type for the objective's attention pattern, built by `masking_utils`."""
        config = self.config
        mask_kwargs = {
            "config": config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
        }
        if objective == "ar":
            layer_types = set(config.layer_types)
        else:
            layer_types = {"full_attention"}  # the config allows SAT/NAT heads only on full-attention models
        if objective == "nat" and config.nat_block_size is None:  # AGILLM 4.x NAT: every token sees every token
            no_skip = {"allow_is_bidirectional_skip": False} if config.uses_alibi and attention_mask is not None else {}
            return {"full_attention": create_bidirectional_mask(**mask_kwargs, **no_skip)}
        mask_kwargs["position_ids"] = position_ids
        if config.uses_alibi:  # the bias is added to the mask, so it must exist even where sdpa could skip it
            mask_kwargs["allow_is_causal_skip"] = False
        if objective != "ar":  # SAT, block NAT: tokens of one block see each other, earlier blocks causally
            block_size = config.sat_block_size if objective == "sat" else config.nat_block_size
            kv_length = self._kv_length(inputs_embeds, attention_mask, past_key_values)
            batch_size = inputs_embeds.shape[0]
            key_positions = self._key_positions(attention_mask, past_key_values, position_ids, batch_size, kv_length)
            mask_kwargs["block_sequence_ids"] = key_positions // block_size
        return {kind: MASK_BUILDERS[kind](**mask_kwargs) for kind in layer_types}

    @staticmethod
    def _kv_length(inputs_embeds, attention_mask, past_key_values) -> int:
        if past_key_values is not None:
            return past_key_values.get_mask_sizes(inputs_embeds.shape[1], 0)[0]
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
            return attention_mask.shape[-1]
        return inputs_embeds.shape[1]

    def _alibi_bias(self, inputs_embeds, attention_mask, past_key_values, position_ids, masks) -> torch.Tensor:
        if self.config._attn_implementation not in ("eager", "sdpa"):
            raise ValueError(
                f"position_embedding_type={self.config.position_embedding_type!r} adds ALiBi to the attention mask, "
                f"which needs attn_implementation 'eager' or 'sdpa', not {self.config._attn_implementation!r}."
            )
        kv_length = next((m.shape[-1] for m in masks.values() if m is not None), None)
        kv_length = kv_length or self._kv_length(inputs_embeds, attention_mask, past_key_values)
        batch_size = inputs_embeds.shape[0]
        key_positions = self._key_positions(attention_mask, past_key_values, position_ids, batch_size, kv_length)
        query_positions = position_ids.expand(batch_size, -1)
        slopes = alibi_slopes(self.config.num_attention_heads)  # H floats: cheaper to rebuild than to keep in sync
        bias = alibi_bias(slopes, query_positions, key_positions, self.config.position_embedding_type)
        return bias.to(inputs_embeds.dtype)

    @merge_with_config_defaults
    @capture_outputs
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        objective: str = "ar",
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        r"""
        objective (`str`, *optional*, defaults to `"ar"`):
            Which attention pattern the trunk runs with: `"ar"` (causal), `"sat"` (block-causal over blocks of
            `config.sat_block_size`) or `"nat"` (bidirectional, or block-causal over `config.nat_block_size`).
        """
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}.")
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")

        if inputs_embeds is None:
            self._check_token_ids(input_ids)
            inputs_embeds = self.embed_tokens(input_ids)

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)

        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)
            self._check_last_position(past_seen_tokens + inputs_embeds.shape[1] - 1)  # known on the host: no sync
        elif position_ids.numel() > 0:
            self._check_last_position(position_ids.max())

        mask_per_layer_type = self.attention_masks(
            objective, inputs_embeds, attention_mask, past_key_values, position_ids
        )

        if objective != "ar":
            if self.config._attn_implementation not in ("eager", "sdpa", "flex_attention"):
                raise ValueError(
                    f"objective={objective!r} attends in blocks / both ways, which needs attn_implementation 'eager', "
                    f"'sdpa' or 'flex_attention', not {self.config._attn_implementation!r}."
                )
            kwargs["is_causal"] = False  # sdpa would read a skipped (None) bidirectional mask as causal

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=mask_per_layer_type[decoder_layer.attention_type],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


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
    """

    objective_losses: dict[str, torch.FloatTensor] | None = None
    gate_logits: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


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


@auto_docstring
class AgillmForCausalLM(AgillmPreTrainedModel, GenerationMixin):
    """The trunk with its heads: AR (`lm_head`, next token) and, per `config.heads`, SAT and NAT.

    `forward(objective=...)` picks the head and its attention pattern; with `labels` and no objective it returns the
    weighted sum of every head's loss, which is what `Trainer` optimises. `generate`, `pipeline("text-generation")`
    and PEFT see a standard causal LM; `generate(generation_mode=...)` reaches the SAT/NAT/staged decoders.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}
    # A checkpoint trained without DiffusionBlocks has no group statistics; switching the mode on starts them fresh.
    _keys_to_ignore_on_load_missing = [r"diffusion_blocks_state\._extra_state"]

    def __init__(self, config: AgillmConfig):
        super().__init__(config)
        self.model = AgillmModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.head_bias)
        head_projections = ["lm_head"]
        if "sat" in config.heads:
            self.sat_head = AgillmSATHead(config)
            head_projections.append("sat_head.proj")
        if "nat" in config.heads:
            self.nat_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.head_bias)
            head_projections.append("nat_head")
        # Per instance: tying and the parallel plans may only name heads this model has.
        self._tied_weights_keys = {f"{name}.weight": "model.embed_tokens.weight" for name in head_projections}
        self._tp_plan = {name: "colwise_gather_output" for name in head_projections}
        if config.diffusion_blocks is not None:  # group-choice statistics, saved with the weights (resumes keep them)
            self.diffusion_blocks_state = DiffusionBlocksState(config)
        self.post_init()

    def _resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of=None, mean_resizing=True):
        """transformers resizes the embedding and `lm_head`; the SAT and NAT projections follow the same vocabulary."""
        embeddings = super()._resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        vocab_size = embeddings.weight.shape[0]
        if "sat" in self.config.heads:
            self.sat_head.proj = self._get_resized_lm_head(self.sat_head.proj, vocab_size, mean_resizing=mean_resizing)
        if "nat" in self.config.heads:
            self.nat_head = self._get_resized_lm_head(self.nat_head, vocab_size, mean_resizing=mean_resizing)
        return embeddings

    @property
    def accepts_loss_kwargs(self) -> bool:
        """`Trainer` passes `num_items_in_batch` only where the loss honours it: the plain AR loss."""
        plain_ar = self._training_objectives() == ["ar"] and not self.config.label_smoothing_for("ar")
        return plain_ar and self.config.diffusion_blocks is None  # DiffusionBlocks losses are per-batch means

    def _training_objectives(self) -> list[str]:
        return [name for name, weight in self.config.objective_weights.items() if weight > 0]

    def _head(self, objective: str) -> nn.Module:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)} or None, got {objective!r}.")
        if objective not in self.config.heads:
            raise ValueError(f"This model has no {objective!r} head (config.heads={self.config.heads}).")
        return {"ar": self.lm_head, "sat": getattr(self, "sat_head", None), "nat": getattr(self, "nat_head", None)}[
            objective
        ]

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        objective: str | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> AgillmCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Target ids, aligned with `input_ids` (each objective shifts them itself); `-100` positions are ignored.
            AR predicts `labels[t + 1]` at t, SAT `labels[t + sat_block_size]`, NAT re-predicts the tokens it hides
            (the model draws the NAT mask itself, so `Trainer` needs no special collator).
        objective (`str`, *optional*):
            `"ar"`, `"sat"` or `"nat"`: run that head with its attention pattern. `None` means `"ar"` without
            labels, and the multi-objective loss (`config.objective_weights`) with labels.

        Example:

        ```python
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> model = AutoModelForCausalLM.from_pretrained("path/to/agillm", trust_remote_code=True)
        >>> tokenizer = AutoTokenizer.from_pretrained("path/to/agillm", trust_remote_code=True)
        >>> ids = tokenizer("To be, or not to be", return_tensors="pt")
        >>> tokenizer.decode(model.generate(**ids, max_new_tokens=20)[0])
        ```"""
        if labels is not None and kwargs.get("shift_labels") is not None:
            # Sequence-parallel training hands over next-token targets already aligned (`shift_labels[t]` is the
            # token at t + 1); every objective then reads its targets from them, never from the unsharded `labels`.
            labels = F.pad(kwargs["shift_labels"][:, :-1], (1, 0), value=-100)
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "inputs_embeds": inputs_embeds,
        }
        if labels is not None and objective is None and self.training and self.config.diffusion_blocks is not None:
            return diffusion_blocks_training_step(self, inputs, labels, **kwargs)  # one layer group per step
        if labels is not None and objective is None and self._training_objectives() != ["ar"]:
            return self._multi_objective_forward(inputs, labels, **kwargs)
        objective = objective or "ar"
        head = self._head(objective)
        if labels is not None and objective == "nat":
            loss, logits, outputs = self._nat_loss(inputs, labels, **kwargs)
            return AgillmCausalLMOutputWithPast(
                loss=loss, logits=logits, objective_losses={"nat": loss}, hidden_states=outputs.hidden_states,
                attentions=outputs.attentions, router_logits=outputs.get("router_logits"),
            )

        outputs: BaseModelOutputWithPast = self.model(
            **inputs, past_key_values=past_key_values, use_cache=use_cache, objective=objective, **kwargs
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        gate_logits = None
        if objective == "sat":
            logits, gate_logits = head(hidden_states)
        else:
            logits = head(hidden_states)

        loss = None
        if labels is not None:
            loss = self._ar_loss(logits, labels, **kwargs) if objective == "ar" else self._sat_loss(
                logits, gate_logits, labels
            )
        return AgillmCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            objective_losses={objective: loss} if loss is not None else None,
            gate_logits=gate_logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.get("router_logits"),
        )

    # ----------------------------------------------------------------------------------------------- losses

    def _multi_objective_forward(self, inputs: dict, labels: torch.Tensor, **kwargs) -> AgillmCausalLMOutputWithPast:
        """`sum_o weight_o * loss_o`, one trunk pass per objective (each needs its own attention pattern)."""
        kwargs.pop("num_items_in_batch", None)  # each objective averages over its own targets
        losses, ar_output = {}, None
        for objective in self._training_objectives():
            output = self(**inputs, labels=labels, objective=objective, use_cache=False, **kwargs)
            losses[objective] = output.loss
            if objective == "ar":
                ar_output = output
        loss = sum(self.config.objective_weights[name] * value for name, value in losses.items())
        return AgillmCausalLMOutputWithPast(
            loss=loss,
            logits=ar_output.logits if ar_output is not None else None,
            objective_losses=losses,
            hidden_states=ar_output.hidden_states if ar_output is not None else None,
        )

    def _ar_loss(self, logits: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
        smoothing = self.config.label_smoothing_for("ar")
        if not smoothing:
            return self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if kwargs.get("shift_labels") is not None:
            return token_cross_entropy(logits, kwargs["shift_labels"], smoothing)
        return token_cross_entropy(logits[:, :-1], labels[:, 1:], smoothing)

    def _sat_loss(self, logits: torch.Tensor, gate_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Token t + b at position t; plus, with `sat_gate_loss`, the gate on the stride that was safe to emit."""
        block = self.config.sat_block_size
        loss = token_cross_entropy(logits[:, :-block], labels[:, block:], self.config.label_smoothing_for("sat"))
        if self.config.sat_gate_loss:
            loss = loss + self._sat_gate_loss(logits.detach(), gate_logits, labels)
        return loss

    def _sat_gate_loss(self, logits: torch.Tensor, gate_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Gate target at a block start t: (number of leading correct predictions of tokens t+b .. t+2b-1) - 1.

        A SAT step always emits its first token; each further token is safe only if it and all before it are what
        the data says. That count is the stride the gate should pick (AGILLM 4.x trained the gate on no target).
        """
        block = self.config.sat_block_size
        num_blocks = (labels.shape[1] - block) // block  # blocks whose b targets all lie inside the sequence
        if num_blocks <= 0:
            return gate_logits.sum() * 0.0
        span = num_blocks * block
        predicted = logits[:, :span].argmax(-1).view(-1, num_blocks, block)
        targets = labels[:, block : block + span].to(predicted.device).view(-1, num_blocks, block)
        correct = (predicted == targets).long().cumprod(dim=-1).sum(-1)  # leading run of correct predictions
        stride_class = (correct.clamp(min=1) - 1).masked_fill((targets == -100).any(-1), -100)
        return token_cross_entropy(gate_logits[:, :span:block], stride_class)

    def _nat_noise(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hide each target with probability r ~ U(0, 1), drawn per row (per block with `nat_block_size`).

        AGILLM 4.x hid each token with probability 0.5; a uniform ratio trains every masking level that decoding
        meets, from the first pass (all hidden) to the last (a few hidden).

        Returns the noised ids and the NAT targets (`labels` where hidden, -100 elsewhere).
        """
        batch, seq_len = input_ids.shape
        block = self.config.nat_block_size or seq_len
        num_blocks = -(-seq_len // block)
        # Training draws fresh masks; evaluation draws the same ones every call, so held-out NAT loss is reproducible.
        generator = None if self.training else torch.Generator(input_ids.device).manual_seed(0)
        draw = {"device": input_ids.device, "generator": generator}
        ratio = torch.rand(batch, num_blocks, 1, **draw).expand(-1, -1, block).reshape(batch, -1)[:, :seq_len]
        hidden = (torch.rand(batch, seq_len, **draw) < ratio) & (labels != -100)
        noised = input_ids.masked_fill(hidden, self.config.nat_mask_token_id)
        return noised, labels.masked_fill(~hidden, -100)

    def _nat_loss(self, inputs: dict, labels: torch.Tensor, **kwargs):
        """Cross-entropy of the NAT head on the tokens it hid.

        Bidirectional NAT (AGILLM 4.x) runs on the noised sequence. Block NAT trains exactly as it decodes: the
        clean sequence and the noised one run side by side; a noised block sees the *clean* earlier blocks and its
        own noised block, a clean block sees clean blocks up to itself — the KV cache of finished blocks at decode.
        """
        input_ids = inputs["input_ids"]
        if input_ids is None:
            raise ValueError("The NAT loss needs input_ids (it replaces hidden tokens by nat_mask_token_id).")
        noised, targets = self._nat_noise(input_ids, labels)
        if self.config.nat_block_size is None:
            outputs = self.model(**{**inputs, "input_ids": noised}, use_cache=False, objective="nat", **kwargs)
            logits = self.nat_head(outputs.last_hidden_state)
        else:
            outputs = self._clean_and_noised_pass(inputs, noised, **kwargs)
            logits = self.nat_head(outputs.last_hidden_state[:, input_ids.shape[1] :])
        return token_cross_entropy(logits, targets, self.config.label_smoothing_for("nat")), logits, outputs

    def _clean_and_noised_pass(self, inputs: dict, noised: torch.Tensor, **kwargs) -> BaseModelOutputWithPast:
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        batch, seq_len = input_ids.shape
        position_ids = inputs["position_ids"]
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=input_ids.device)[None].expand(batch, -1)
        position_ids = position_ids.expand(batch, -1)
        block_of = position_ids // self.config.nat_block_size

        def clean_then_noised(batch_idx, head_idx, q_idx, kv_idx):
            q_clean, kv_clean = q_idx < seq_len, kv_idx < seq_len
            q_block = block_of[batch_idx, torch.where(q_clean, q_idx, q_idx - seq_len)]
            kv_block = block_of[batch_idx, torch.where(kv_clean, kv_idx, kv_idx - seq_len)]
            clean_query = q_clean & kv_clean & (kv_block <= q_block)
            noised_query = ~q_clean & ((kv_clean & (kv_block < q_block)) | (~kv_clean & (kv_block == q_block)))
            return clean_query | noised_query

        padding = None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=-1).bool()
        inputs_embeds = self.model.embed_tokens(torch.cat([input_ids, noised], dim=-1))
        mask = ALL_MASK_ATTENTION_FUNCTIONS[self.config._attn_implementation](
            batch_size=batch,
            q_length=2 * seq_len,
            kv_length=2 * seq_len,
            mask_function=clean_then_noised,
            attention_mask=padding,
            allow_is_causal_skip=False,
            dtype=inputs_embeds.dtype,
            config=self.config,
            device=inputs_embeds.device,
        )
        self.model._check_token_ids(input_ids)
        return self.model(
            inputs_embeds=inputs_embeds,
            attention_mask={"full_attention": mask},
            position_ids=torch.cat([position_ids, position_ids], dim=-1),
            use_cache=False,
            objective="nat",
            **kwargs,
        )

    # ----------------------------------------------------------------------------------------------- decoding

    def generate(self, *args, generation_mode: str | None = None, **kwargs):
        r"""
        `GenerationMixin.generate`, plus `generation_mode` for AGILLM's parallel decoders (see
        `generation_agillm.py`): `"sat"`, `"nat_mask_predict"`, `"nat_block"`, `"staged"`, and the DiffusionBlocks
        Euler sampler `"diffusion_euler"` (`diffusion_blocks_agillm.py`). `None` or `"ar"` is
        standard autoregressive generation (greedy, sampling, beam search, assisted, ...).
        """
        if generation_mode in (None, "ar"):
            return super().generate(*args, **kwargs)
        if generation_mode not in (*GENERATION_MODES, "diffusion_euler"):
            raise ValueError(
                f"Unknown generation_mode {generation_mode!r}; choose 'ar', {', '.join(map(repr, GENERATION_MODES))} "
                "or 'diffusion_euler'."
            )
        if generation_mode == "diffusion_euler":
            return diffusion_euler_generate(self, *args, **kwargs)
        return agillm_generate(self, *args, generation_mode=generation_mode, **kwargs)


# The task heads reuse transformers' generic forward passes (pooling, losses). Their constructors are spelled out
# because the generic ones build the trunk with `AutoModel.from_config`, which cannot resolve a remote-code config
# class without touching the global auto registry.


class AgillmForSequenceClassification(GenericForSequenceClassification, AgillmPreTrainedModel):
    """Scores the last non-padding token of each sequence."""

    def __init__(self, config: AgillmConfig):
        AgillmPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = AgillmModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()


class AgillmForTokenClassification(GenericForTokenClassification, AgillmPreTrainedModel):
    """Scores every token (NER-style tagging)."""

    def __init__(self, config: AgillmConfig):
        AgillmPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = AgillmModel(config)
        classifier_dropout = getattr(config, "classifier_dropout", None)  # not a core field; users may add it
        self.dropout = nn.Dropout(0.1 if classifier_dropout is None else classifier_dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()


class AgillmForQuestionAnswering(GenericForQuestionAnswering, AgillmPreTrainedModel):
    """Predicts answer span start/end logits over the tokens."""

    def __init__(self, config: AgillmConfig):
        AgillmPreTrainedModel.__init__(self, config)
        self.model = AgillmModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()


# Saved folders carry these `.py` files and a complete `auto_map` (`AGILLM_AUTO_MAP` in configuration_agillm.py).
AgillmConfig.register_for_auto_class()
AgillmModel.register_for_auto_class("AutoModel")
AgillmForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AgillmForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
AgillmForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
AgillmForQuestionAnswering.register_for_auto_class("AutoModelForQuestionAnswering")


__all__ = [
    "AgillmPreTrainedModel",
    "AgillmModel",
    "AgillmForCausalLM",
    "AgillmForSequenceClassification",
    "AgillmForTokenClassification",
    "AgillmForQuestionAnswering",
]
