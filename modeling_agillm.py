"""AGILLM decoder: the trunk every AGILLM head stands on.

Data flow (top to bottom of this file):
    token ids -> embed_tokens -> N x AgillmDecoderLayer(pre-norm attention, pre-norm gated MLP) -> norm -> heads

Attention goes through transformers' `ALL_ATTENTION_FUNCTIONS` (eager / sdpa / flex / flash, plus anything
`kernels/` registers), masks come from `masking_utils` (one mask per layer type: full, sliding, chunked), and the
KV cache is a transformers `Cache` whose per-layer kind follows `config.layer_types`. Only sibling files imported
as `from .x import y` travel with a saved model, so this file depends on nothing from this repo but its config.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations import use_kernel_forward_from_hub, use_kernelized_func
from transformers.masking_utils import (
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
from transformers.utils.output_capturing import capture_outputs


try:  # a saved model folder (remote code): sibling module of the same package
    from .configuration_agillm import AgillmConfig
except ImportError:  # this repository, imported as top-level modules
    from configuration_agillm import AgillmConfig


logger = logging.get_logger(__name__)

# One mask builder per layer type; `AgillmModel.forward` builds each mask once and layers index it by type.
MASK_BUILDERS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
    "chunked_attention": create_chunked_causal_mask,
}


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


# --------------------------------------------------------------------------------------------------- MLP


class AgillmMLP(nn.Module):
    """Gated MLP: `down(act(gate(x)) * up(x))`; SwiGLU with the default `hidden_act="silu"`."""

    def __init__(self, config: AgillmConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


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
        self.is_causal = True
        self.use_rope = layer_idx not in config.nope_layers
        # Flash attention reads the window from here; the other backends get it through the sliding mask.
        self.sliding_window = config.sliding_window if self.layer_type == "sliding_attention" else None

        q_width = config.num_attention_heads * self.head_dim
        kv_width = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
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
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
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
    """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, config: AgillmConfig, layer_idx: int):
        super().__init__()
        self.attention_type = config.layer_types[layer_idx]
        self.self_attn = AgillmAttention(config=config, layer_idx=layer_idx)
        self.mlp = AgillmMLP(config)
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
        hidden_states = residual + hidden_states
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
    }


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
        if self.config.rope_type == "dynamic" or torch.compiler.is_compiling():
            return
        last_position = int(last_position)
        if last_position >= self.config.max_position_embeddings:
            raise ValueError(
                f"Input reaches position {last_position}, beyond max_position_embeddings="
                f"{self.config.max_position_embeddings}. Shorten the input (prompt + new tokens), or use a "
                "config with a longer context (e.g. rope_type='dynamic', 'yarn' or 'llama3')."
            )

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
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
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

        # `generate` with a compileable cache passes the masks pre-built, one per layer type.
        if not isinstance(mask_per_layer_type := attention_mask, dict):
            mask_kwargs = {
                "config": self.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                "past_key_values": past_key_values,
                "position_ids": position_ids,
            }
            mask_per_layer_type = {
                layer_type: MASK_BUILDERS[layer_type](**mask_kwargs) for layer_type in set(self.config.layer_types)
            }

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


@auto_docstring
class AgillmForCausalLM(AgillmPreTrainedModel, GenerationMixin):
    """The AR (next-token) head over the trunk; `generate`, `pipeline("text-generation")` and `Trainer` use it."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}

    def __init__(self, config: AgillmConfig):
        super().__init__(config)
        self.model = AgillmModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

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
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Target ids for the next-token loss (shifted inside the loss); `-100` positions are ignored.

        Example:

        ```python
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> model = AutoModelForCausalLM.from_pretrained("path/to/agillm", trust_remote_code=True)
        >>> tokenizer = AutoTokenizer.from_pretrained("path/to/agillm", trust_remote_code=True)
        >>> ids = tokenizer("To be, or not to be", return_tensors="pt")
        >>> tokenizer.decode(model.generate(**ids, max_new_tokens=20)[0])
        ```"""
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


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
