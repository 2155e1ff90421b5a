"""AGILLM's building blocks: norms, rotary and ALiBi positions, the dense MLP.

Everything here is a function of the config alone; `attention_agillm.py`, `moe_agillm.py` and `modeling_agillm.py`
assemble them. A remote-code sibling of `modeling_agillm.py`: it imports nothing from this repository but
`configuration_agillm.py`.
"""

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations import use_kernel_forward_from_hub
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update


try:  # a saved model folder (remote code): sibling modules of the same package
    from .configuration_agillm import AgillmConfig
except ImportError:  # this repository, imported as top-level modules
    from configuration_agillm import AgillmConfig


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
