"""Llama 4 (text, `model_type="llama4_text"`) -> AGILLM: config mapping and checkpoint rewriting.

| Llama 4                                                | AGILLM                                                     |
|--------------------------------------------------------|------------------------------------------------------------|
| `no_rope_layers[i] == 0` (1 means RoPE)                | `i in nope_layers`                                         |
| `layer_types` chunked/full, `attention_chunk_size`     | the same                                                   |
| `use_qk_norm` (weightless L2 norm after RoPE, RoPE layers) | `use_qk_norm`, `qk_norm_type="unweighted_post_rope"`   |
| `attn_temperature_tuning`, `floor_scale`, `attn_scale` | the same (NoPE layers only)                                |
| `moe_layers` (from `interleave_moe_layer_step`)        | `mlp_layer_types` "sparse" there, "dense" elsewhere        |
| `intermediate_size_mlp` (dense layers)                 | `intermediate_size`                                        |
| `intermediate_size` (an expert, the shared expert) | `moe_intermediate_size`, `shared_expert_intermediate_size` |
| top-1 router, input scaled by sigmoid(logit)           | `router_type="sigmoid_top1_scaled_input"`                  |

Weights: `feed_forward.*` is AGILLM's `mlp.*`, the router `feed_forward.router` is `mlp.gate`; the experts are stored
transposed (`gate_up_proj` [E, H, 2I], `down_proj` [E, I, H], multiplied as `x @ W`) against AGILLM's `[E, out, in]`.
Llama 4 rotates complex (interleaved) pairs, so the q/k rows of each head on RoPE layers are permuted to
rotate_half's order, as in the classic Meta -> HF Llama conversion; the weightless QK-norm is a per-head mean over
squares, which a permutation leaves unchanged.

One difference outside parity: Llama 4 takes the temperature-tuning position from the cache length, AGILLM from
`position_ids`. They agree on unpadded input (what the tests check); with left padding AGILLM uses each row's real
positions.
"""

import re
from collections.abc import Mapping

import torch
from transformers import PreTrainedConfig

from .config_mapping import ConversionError
from .deepseek_v3 import TensorView, interleaved_to_half_order, permute_head_rows


LAYER_NAME = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<rest>.+)$")
LLAMA4_LAYER_TYPES = ("full_attention", "chunked_attention")  # the two masks Llama4TextModel builds
ROTARY_PROJECTIONS = ("self_attn.q_proj.", "self_attn.k_proj.")
# Llama 4 feed-forward tensor -> (AGILLM name, transform); `x @ W` experts become `[E, out, in]`.
EXPERT_TENSORS = {
    "feed_forward.experts.gate_up_proj": ("mlp.experts.gate_up_proj", lambda w: w.transpose(1, 2)),
    "feed_forward.experts.down_proj": ("mlp.experts.down_proj", lambda w: w.transpose(1, 2)),
    "feed_forward.router.weight": ("mlp.gate.weight", None),
}


# --------------------------------------------------------------------------------------------------- config


def _nope_layers(config: PreTrainedConfig) -> list[int]:
    flags = list(config.no_rope_layers)
    if len(flags) < config.num_hidden_layers:
        raise ConversionError(
            f"no_rope_layers has {len(flags)} entries for {config.num_hidden_layers} layers (1 = RoPE, 0 = NoPE)."
        )
    return [layer for layer in range(config.num_hidden_layers) if not flags[layer]]


def _mlp_layer_types(config: PreTrainedConfig) -> list[str]:
    moe_layers = set(config.moe_layers)
    outside = sorted(moe_layers - set(range(config.num_hidden_layers)))
    if outside:
        raise ConversionError(f"moe_layers {outside} are not layer indices (0..{config.num_hidden_layers - 1}).")
    return ["sparse" if layer in moe_layers else "dense" for layer in range(config.num_hidden_layers)]


def llama4_text_fields(config: PreTrainedConfig) -> dict:
    """The `AgillmConfig` fields of a `Llama4TextConfig` (those `config_mapping.SHARED_FIELDS` does not copy)."""
    if config.num_experts_per_tok != 1:
        raise ConversionError(
            f"Llama 4 with num_experts_per_tok={config.num_experts_per_tok}: AGILLM's Llama 4 router scales the input "
            "of one expert (the released models route top-1)."
        )
    layer_types = list(config.layer_types)
    unknown = sorted(set(layer_types) - set(LLAMA4_LAYER_TYPES))
    if unknown:
        raise ConversionError(
            f"Llama 4 layer_types {unknown}: Llama4TextModel only builds {list(LLAMA4_LAYER_TYPES)}."
        )
    return {
        "intermediate_size": config.intermediate_size_mlp,
        "attention_bias": config.attention_bias,
        "attention_output_bias": config.attention_bias,
        "mlp_bias": False,
        "layer_types": layer_types,
        "attention_chunk_size": config.attention_chunk_size if "chunked_attention" in layer_types else None,
        "nope_layers": _nope_layers(config),
        "use_qk_norm": config.use_qk_norm,
        "qk_norm_type": "unweighted_post_rope",
        "attn_temperature_tuning": config.attn_temperature_tuning,
        "floor_scale": config.floor_scale,
        "attn_scale": config.attn_scale,
        "num_experts": config.num_local_experts,
        "num_experts_per_tok": 1,
        "moe_intermediate_size": config.intermediate_size,
        "router_type": "sigmoid_top1_scaled_input",
        "shared_expert_intermediate_size": config.intermediate_size,  # Llama4TextMoe's shared expert: one expert wide
        "mlp_layer_types": _mlp_layer_types(config),
        # Llama4ForCausalLM adds no router loss to its training loss.
        "output_router_logits": False,
    }


# --------------------------------------------------------------------------------------------------- weights


def _agillm_entry(config: PreTrainedConfig, rope_layers: set[int], name: str):
    """`(AGILLM name, transform)` of one Llama 4 tensor."""
    match = LAYER_NAME.match(name)
    if match is None:
        return name, None
    layer, rest = int(match["layer"]), match["rest"]
    prefix = f"model.layers.{layer}."
    if rest in EXPERT_TENSORS:
        agillm_rest, transform = EXPERT_TENSORS[rest]
        return prefix + agillm_rest, transform
    if rest.startswith("feed_forward."):  # dense MLP and shared expert: same module names under `mlp`
        return prefix + "mlp." + rest.removeprefix("feed_forward."), None
    if layer in rope_layers and rest.startswith(ROTARY_PROJECTIONS):
        order = interleaved_to_half_order(config.head_dim)
        return prefix + rest, lambda tensor: permute_head_rows(tensor, config.head_dim, order)
    return prefix + rest, None


def prepare_llama4_text_source(
    config: PreTrainedConfig, tensors: Mapping[str, torch.Tensor]
) -> tuple[PreTrainedConfig, Mapping[str, torch.Tensor]]:
    """The source config (unchanged) and its tensors under AGILLM names, experts transposed, q/k rows permuted."""
    rope_layers = set(range(config.num_hidden_layers)) - set(_nope_layers(config))
    entries = {}
    for name in tensors:
        agillm_name, transform = _agillm_entry(config, rope_layers, name)
        entries[agillm_name] = (name, transform)
    return config, TensorView(tensors, entries)
