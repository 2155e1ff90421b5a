"""AGILLM's self-attention: MHA/GQA/MQA (`AgillmAttention`) and DeepSeek's latent attention (`AgillmMLAttention`).

Both hand the attention itself to the backend `config._attn_implementation` names in transformers'
`ALL_ATTENTION_FUNCTIONS` (`attend`; `eager_attention_forward` is the plain-PyTorch reference), with QK-norm, RoPE or
NoPE temperature, sliding windows and cross-layer K/V sharing applied here. A remote-code sibling of
`modeling_agillm.py`.
"""

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.integrations import use_kernelized_func
from transformers.masking_utils import (
    create_causal_mask,
    create_chunked_causal_mask,
    create_sliding_window_causal_mask,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs


try:  # a saved model folder (remote code): sibling modules of the same package
    from .configuration_agillm import AgillmConfig
    from .layers_agillm import AgillmRMSNorm, apply_rotary_pos_emb, build_norm, rotate_half
except ImportError:  # this repository, imported as top-level modules
    from configuration_agillm import AgillmConfig
    from layers_agillm import AgillmRMSNorm, apply_rotary_pos_emb, build_norm, rotate_half


# One mask builder per layer type; `AgillmModel.forward` builds each mask once and layers index it by type.
MASK_BUILDERS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
    "chunked_attention": create_chunked_causal_mask,
}


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


def attention_function_declares(config, capability: str) -> bool:
    """Whether the selected attention function declares `capability` as a truthy attribute of itself.

    Registered kernels (e.g. `kernels/attention.py`) say what they do themselves: `computes_alibi` (takes ALiBi as
    `alibi_slopes` / `alibi_query_positions` / `alibi_key_positions` / `alibi_kind` kwargs instead of a dense bias
    folded into the mask) and `supports_block_masks` (any boolean mask pattern: SAT/NAT blocks, bidirectional).
    """
    return bool(getattr(ALL_ATTENTION_FUNCTIONS.get(config._attn_implementation), capability, False))


def attend(module: nn.Module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the configured backend (`config._attn_implementation`) with the module's scale, dropout and window."""
    attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
        module.config._attn_implementation, eager_attention_forward
    )
    return attention_interface(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0 if not module.training else module.attention_dropout,
        scaling=module.scaling,
        sliding_window=module.sliding_window,
        **kwargs,
    )


class AttentionBackendSupport:
    """What every AGILLM model (the decoder and the media towers, all attending through `attend`) tells transformers'
    `PreTrainedModel` about attention backends. transformers allows `set_attn_implementation` only where it finds
    `ALL_ATTENTION_FUNCTIONS.get_interface(` in the model class's own file; that call is here, so the answer is
    given explicitly. Listed before `PreTrainedModel` in the bases, so these values win."""

    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama 4's query/key norm: RMS normalisation without a weight, computed in fp32."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def nope_temperature(position_ids: torch.Tensor, floor_scale: int, attn_scale: float) -> torch.Tensor:
    """Llama 4's query scale on NoPE layers, `[batch, seq]`: grows with log(position) so long contexts stay sharp."""
    return torch.log1p(torch.floor((position_ids.float() + 1.0) / floor_scale)) * attn_scale + 1.0


class SharedKV(dict[int, tuple[torch.Tensor, torch.Tensor]]):
    """What source layers leave for the later layers that reuse their keys and values (`config.kv_source_layers`):
    source layer index -> (keys, values) as the cache returned them, i.e. over every cached position (MLA: the
    normed latent and the rotated shared key). `AgillmModel.forward` builds one per forward when `config.shares_kv`."""


def _stores_shared_kv(config: AgillmConfig, layer_idx: int) -> bool:
    """Whether a later layer reads this layer's keys and values (`config.kv_source_layers`)."""
    return layer_idx < config.num_hidden_layers and config.kv_source_layers.count(layer_idx) > 1


@use_kernelized_func(apply_rotary_pos_emb)
class AgillmAttention(nn.Module):
    """MHA/GQA/MQA self-attention with optional QK-norm, RoPE (unless a NoPE layer), a per-layer window, and
    cross-layer KV sharing (a sharing layer attends over an earlier layer's keys and values)."""

    def __init__(self, config: AgillmConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.layer_type = config.layer_type_at(layer_idx)
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True  # read by the sdpa/flash backends when no mask is given; masks carry SAT/NAT patterns
        self.use_rope = config.uses_rope and layer_idx not in config.nope_layers
        self.tie_kv = config.tie_kv
        self.qk_norm = config.qk_norm_type if config.use_qk_norm else None
        self.tunes_temperature = config.attn_temperature_tuning and not self.use_rope
        self.kv_source = config.kv_source_of(layer_idx)
        self.is_kv_shared = self.kv_source != layer_idx
        self.stores_shared_kv = _stores_shared_kv(config, layer_idx)
        # Flash attention reads the window from here; the other backends get it through the sliding mask.
        self.sliding_window = config.sliding_window if self.layer_type == "sliding_attention" else None

        q_width = config.num_attention_heads * self.head_dim
        kv_width = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=config.attention_bias)
        if not self.is_kv_shared:
            self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
            if not config.tie_kv:  # with tie_kv the key projection also gives the values
                self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_width, config.hidden_size, bias=config.attention_output_bias)
        if self.qk_norm == "learned":  # per head, over head_dim, before RoPE (Qwen3)
            self.q_norm = build_norm(config, self.head_dim)
            if not self.is_kv_shared:
                self.k_norm = build_norm(config, self.head_dim)

    def _apply_positions(self, query_states, key_states, position_embeddings, position_ids):
        """RoPE (then Llama 4's weightless QK-norm), or on NoPE layers Llama 4's temperature; no keys when sharing."""
        if self.use_rope:
            cos, sin = position_embeddings
            if key_states is None:
                query_states = query_states * cos.unsqueeze(1) + rotate_half(query_states) * sin.unsqueeze(1)
            else:
                query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
            if self.qk_norm == "unweighted_post_rope":  # after RoPE, on RoPE layers only
                eps = self.config.rms_norm_eps
                query_states = unweighted_rms_norm(query_states, eps)
                key_states = None if key_states is None else unweighted_rms_norm(key_states, eps)
        if self.tunes_temperature:
            scale = nope_temperature(position_ids, self.config.floor_scale, self.config.attn_scale)
            query_states = (query_states * scale[:, None, :, None]).to(query_states.dtype)
        return query_states, key_states

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        position_ids: torch.LongTensor | None = None,
        shared_kv_states: SharedKV | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape)
        if self.qk_norm == "learned":
            query_states = self.q_norm(query_states)
        query_states = query_states.transpose(1, 2)

        if self.is_kv_shared:  # the source layer ran earlier in this forward and left its full (cached) K/V here
            query_states, _ = self._apply_positions(query_states, None, position_embeddings, position_ids)
            key_states, value_states = shared_kv_states[self.kv_source]
        else:
            key_states = self.k_proj(hidden_states).view(hidden_shape)
            # tie_kv: values are the key projection itself (before QK-norm and RoPE, which only shape the scores).
            value_states = key_states if self.tie_kv else self.v_proj(hidden_states).view(hidden_shape)
            value_states = value_states.transpose(1, 2)
            if self.qk_norm == "learned":
                key_states = self.k_norm(key_states)
            query_states, key_states = self._apply_positions(
                query_states, key_states.transpose(1, 2), position_embeddings, position_ids
            )
            if past_key_values is not None:
                key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
            if self.stores_shared_kv:
                shared_kv_states[self.layer_idx] = key_states, value_states

        attn_output, attn_weights = attend(self, query_states, key_states, value_states, attention_mask, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


# DeepSeek-V2/V3 fix the epsilon of the latent norms, whatever `rms_norm_eps` is.
MLA_LATENT_NORM_EPS = 1e-6


def mla_attention_scale(config: AgillmConfig) -> float:
    """`(nope + rope) ** -0.5`, times DeepSeek's YaRN correction `mscale**2` when `mscale_all_dim` is set."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    rope = config.rope_parameters
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        mscale = 0.1 * rope["mscale_all_dim"] * math.log(rope["factor"]) + 1.0 if rope["factor"] > 1 else 1.0
        scale = scale * mscale * mscale
    return scale


class AgillmMLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3).

    Keys and values come from one compressed latent `c` (`kv_lora_rank` wide, normed) per token plus one rotary key
    part shared by all heads; the cache stores exactly those two. Attention either expands the cached latents to
    per-head keys/values (`kv_b_proj`), or, when decoding against a cache (`mla_absorbed_decode`), absorbs
    `kv_b_proj` into the query and the output: `q_nope . (W_uk c) = (W_uk^T q_nope) . c`, so all heads attend over
    the latents directly (multi-query attention with one `kv_lora_rank + rope`-wide head) and `W_uv` is applied once
    to the attended latent. The two paths are the same function; the absorbed one never materialises per-head K/V.
    """

    def __init__(self, config: AgillmConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.layer_type = config.layer_type_at(layer_idx)
        self.num_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_head_dim, self.kv_lora_rank = config.v_head_dim, config.kv_lora_rank
        self.qk_head_dim = self.nope_dim + self.rope_dim
        self.num_key_value_groups = 1  # set per call: 1 for expanded K/V, num_heads for the shared latent head
        self.scaling = mla_attention_scale(config)
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.use_rope = config.uses_rope and layer_idx not in config.nope_layers
        self.kv_source = config.kv_source_of(layer_idx)
        self.is_kv_shared = self.kv_source != layer_idx  # reuses the source's cached latent, with its own kv_b_proj
        self.stores_shared_kv = _stores_shared_kv(config, layer_idx)
        self.sliding_window = config.sliding_window if self.layer_type == "sliding_attention" else None

        hidden, heads = config.hidden_size, self.num_heads
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, config.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = AgillmRMSNorm(config.q_lora_rank, eps=MLA_LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, heads * self.qk_head_dim, bias=False)
        if not self.is_kv_shared:
            self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=config.attention_bias)
            self.kv_a_layernorm = AgillmRMSNorm(self.kv_lora_rank, eps=MLA_LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, heads * (self.nope_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_head_dim, hidden, bias=config.attention_output_bias)

    def _rotate(self, x: torch.Tensor, position_embeddings) -> torch.Tensor:
        if not self.use_rope:
            return x
        cos, sin = position_embeddings
        return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)

    def _latents(self, hidden_states, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached pair: normed latent `[B, 1, S, kv_lora_rank]` and rotated shared key `[B, 1, S, rope]`."""
        batch, seq_len = hidden_states.shape[:2]
        latent, key_rot = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).view(batch, 1, seq_len, self.kv_lora_rank)
        key_rot = self._rotate(key_rot.view(batch, 1, seq_len, self.rope_dim), position_embeddings)
        return latent, key_rot

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        shared_kv_states: SharedKV | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq_len = hidden_states.shape[:2]
        if self.config.q_lora_rank is None:
            query = self.q_proj(hidden_states)
        else:
            query = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        query = query.view(batch, seq_len, self.num_heads, self.qk_head_dim).transpose(1, 2)
        query_nope, query_rot = query.split([self.nope_dim, self.rope_dim], dim=-1)
        query_rot = self._rotate(query_rot, position_embeddings)

        if self.is_kv_shared:
            latent, key_rot = shared_kv_states[self.kv_source]
        else:
            latent, key_rot = self._latents(hidden_states, position_embeddings)
            if past_key_values is not None:
                latent, key_rot = past_key_values.update(latent, key_rot, self.layer_idx)
            if self.stores_shared_kv:
                shared_kv_states[self.layer_idx] = latent, key_rot

        decoding = past_key_values is not None and latent.shape[2] > seq_len
        if decoding and self.config.mla_absorbed_decode and not self.training:
            attn_output, attn_weights = self._absorbed(query_nope, query_rot, latent, key_rot, attention_mask, **kwargs)
        else:
            attn_output, attn_weights = self._expanded(query_nope, query_rot, latent, key_rot, attention_mask, **kwargs)
        return self.o_proj(attn_output.reshape(batch, seq_len, -1).contiguous()), attn_weights

    def _attend(self, query, key, value, attention_mask, num_key_value_groups: int, **kwargs):
        self.num_key_value_groups = num_key_value_groups  # read by the attention backends to repeat K/V heads
        return attend(self, query, key, value, attention_mask, **kwargs)

    def _expanded(self, query_nope, query_rot, latent, key_rot, attention_mask, **kwargs):
        """Per-head keys `[k_nope ; k_rot]` and values from every cached latent (training and prefill)."""
        batch, _, kv_len, _ = latent.shape
        key_value = self.kv_b_proj(latent.squeeze(1)).view(batch, kv_len, self.num_heads, -1).transpose(1, 2)
        key_nope, value = key_value.split([self.nope_dim, self.v_head_dim], dim=-1)
        key = torch.cat([key_nope, key_rot.expand(-1, self.num_heads, -1, -1)], dim=-1)
        query = torch.cat([query_nope, query_rot], dim=-1)
        return self._attend(query, key, value, attention_mask, num_key_value_groups=1, **kwargs)

    def _absorbed(self, query_nope, query_rot, latent, key_rot, attention_mask, **kwargs):
        """Attend in the latent space: one shared `[c ; k_rot]` key head and `c` value head for all query heads."""
        weight = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_head_dim, self.kv_lora_rank)
        up_key, up_value = weight.split([self.nope_dim, self.v_head_dim], dim=1)
        query_latent = torch.einsum("bhsn,hnr->bhsr", query_nope, up_key)
        query = torch.cat([query_latent, query_rot], dim=-1)
        key = torch.cat([latent, key_rot], dim=-1)
        latent_output, attn_weights = self._attend(
            query, key, latent, attention_mask, num_key_value_groups=self.num_heads, **kwargs
        )  # [B, S, heads, kv_lora_rank]
        return torch.einsum("bshr,hvr->bshv", latent_output, up_value), attn_weights
