"""DeepSeek-V3 -> AGILLM: config mapping and checkpoint rewriting (renames, RoPE row permutation, MTP layers).

AGILLM's MLA modules have DeepSeek-V3's names and shapes (`q_proj` or `q_a_proj`/`q_a_layernorm`/`q_b_proj`,
`kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`, `o_proj`), and its `sigmoid_group_topk` router is DeepSeek-V3's
`DeepseekV3TopkRouter`, so most tensors keep their name. What changes:

| DeepSeek-V3                                    | AGILLM                                                          |
|------------------------------------------------|-----------------------------------------------------------------|
| `mlp.shared_experts.*`                         | `mlp.shared_expert.*` (`n_shared_experts * moe_intermediate_size`) |
| layers `< first_k_dense_replace`               | `mlp_layer_types` "dense" (`intermediate_size`), others "sparse" |
| `rope_interleave=True`: rotary rows in pairs   | rows in rotate_half order (`interleaved_to_half_order`)         |
| `model.layers.{L + k}.*` MTP modules           | the same names; `num_mtp_layers` = how many the checkpoint holds |
| MTP `embed_tokens` / `shared_head.head` copies | dropped once checked equal to the main embedding / `lm_head`    |

Per-expert checkpoint matrices (`mlp.experts.N.{gate,up,down}_proj.weight`, what the Hub and transformers'
`save_pretrained` store) are stacked into AGILLM's 3-D experts by `weights.collect_agillm_weights`.

`TensorView` and `interleaved_to_half_order` are shared with `llama4.py`, whose RoPE is interleaved as well.
"""

import copy
import re
from collections.abc import Callable, Iterator, Mapping

import torch
from transformers import PreTrainedConfig
from transformers.utils import logging

from .config_mapping import ConversionError


logger = logging.get_logger(__name__)

LAYER_NAME = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<rest>.+)$")
# Projections whose output rows hold rotary components: per head (queries) or at the end (the shared rotary key).
QUERY_PROJECTIONS = ("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")
ROTARY_KEY_PROJECTIONS = ("self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_proj_with_mqa.bias")
# Copies of the main embedding and head that DeepSeek-V3 stores in every MTP module; AGILLM shares the main ones.
MTP_SHARED_COPIES = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}


# --------------------------------------------------------------------------------------------------- shared helpers


def interleaved_to_half_order(rotary_dim: int) -> torch.Tensor:
    """Row order that turns interleaved rotary pairs `(x0, x1), (x2, x3), ...` into rotate_half's halves.

    Interleaved RoPE (DeepSeek-V3's `rope_interleave`, Llama 4's complex `freqs_cis`) rotates each pair
    `(x_{2i}, x_{2i+1})` by frequency i; rotate_half rotates `(x_i, x_{i + d/2})`. Taking the even rows, then the odd
    ones (`[x0, x2, ..., x1, x3, ...]`) gives rotate_half the same pairs and frequencies. Queries and keys are
    permuted alike, so every dot product (the only place rotated vectors meet) is unchanged.
    """
    if rotary_dim % 2:
        raise ConversionError(f"A rotary width must be even, got {rotary_dim}.")
    return torch.cat([torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2)])


def permute_head_rows(tensor: torch.Tensor, head_width: int, order: torch.Tensor) -> torch.Tensor:
    """Reorder the output rows of each head (`head_width` rows each) of a projection weight or bias by `order`."""
    if tensor.shape[0] % head_width:
        raise ConversionError(f"{tuple(tensor.shape)} rows do not split into heads of {head_width}.")
    heads = tensor.reshape(tensor.shape[0] // head_width, head_width, *tensor.shape[1:])
    return heads[:, order].reshape(tensor.shape)


class TensorView(Mapping):
    """Read-only `agillm-style name -> tensor` view of a source, each entry a source name and a lazy transform.

    Nothing is read until a tensor is asked for, so a sharded checkpoint folder is still read one tensor at a time.
    """

    def __init__(self, source: Mapping[str, torch.Tensor], entries: dict[str, tuple[str, Callable | None]]):
        self.source = source
        self.entries = entries

    def __getitem__(self, name: str) -> torch.Tensor:
        source_name, transform = self.entries[name]
        tensor = self.source[source_name]
        return tensor if transform is None else transform(tensor)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


# --------------------------------------------------------------------------------------------------- config


def _mlp_layer_type(config: PreTrainedConfig, layer_idx: int) -> str:
    # DeepseekV3DecoderLayer's rule (an MTP module at index L + k follows it too).
    return "sparse" if layer_idx >= config.first_k_dense_replace else "dense"


def deepseek_v3_fields(config: PreTrainedConfig) -> dict:
    """The `AgillmConfig` fields of a DeepSeek-V3 config (those `config_mapping.SHARED_FIELDS` does not copy)."""
    if config.num_key_value_heads != config.num_attention_heads:
        raise ConversionError(
            f"DeepSeek-V3 MLA expands its latent to one key/value per query head; num_key_value_heads "
            f"({config.num_key_value_heads}) must equal num_attention_heads ({config.num_attention_heads})."
        )
    if not config.n_shared_experts:
        raise ConversionError("n_shared_experts=0 is not supported (DeepSeek-V3 always has a shared expert).")
    num_layers = config.num_hidden_layers
    num_mtp_layers = config.num_mtp_layers or 0
    return {
        # MLA: DeepSeek-V3's own fields; head_dim (set by DeepseekV3Config) is the rotary width.
        "kv_lora_rank": config.kv_lora_rank,
        "q_lora_rank": config.q_lora_rank,
        "qk_nope_head_dim": config.qk_nope_head_dim,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "v_head_dim": config.v_head_dim,
        "head_dim": config.qk_rope_head_dim,
        # One flag covers q_a_proj, kv_a_proj_with_mqa and o_proj.
        "attention_bias": config.attention_bias,
        "attention_output_bias": config.attention_bias,
        "mlp_bias": False,
        "layer_types": ["full_attention"] * num_layers,
        # MoE: sigmoid scores, group-limited top-k on `score + e_score_correction_bias`, scaled weights.
        "num_experts": config.n_routed_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "moe_intermediate_size": config.moe_intermediate_size,
        "router_type": "sigmoid_group_topk",
        "n_group": config.n_group or 1,
        "topk_group": config.topk_group or 1,
        "routed_scaling_factor": config.routed_scaling_factor,
        "norm_topk_prob": bool(config.norm_topk_prob),
        "shared_expert_intermediate_size": config.n_shared_experts * config.moe_intermediate_size,
        "mlp_layer_types": [_mlp_layer_type(config, i) for i in range(num_layers)],
        # DeepseekV3ForCausalLM adds no router loss to its training loss.
        "output_router_logits": False,
        # MTP modules after the decoder layers (`prepare_deepseek_v3_source` sets the count the checkpoint holds).
        "num_mtp_layers": num_mtp_layers,
        "mtp_mlp_layer_types": [_mlp_layer_type(config, num_layers + k) for k in range(num_mtp_layers)] or None,
    }


# --------------------------------------------------------------------------------------------------- weights


def _mtp_layers_in(names, num_layers: int) -> int:
    """How many MTP modules (`model.layers.{L + k}`, contiguous from L) the checkpoint holds."""
    extra = {int(match["layer"]) for name in names if (match := LAYER_NAME.match(name))} - set(range(num_layers))
    count = len(extra)
    if extra != set(range(num_layers, num_layers + count)):
        raise ConversionError(
            f"MTP layers must follow the {num_layers} decoder layers without gaps, got layers {sorted(extra)}."
        )
    return count


def _rotary_transform(config: PreTrainedConfig, rest: str) -> Callable | None:
    """The row permutation a tensor of a layer needs so rotate_half reproduces interleaved RoPE, if any."""
    if not config.rope_interleave:
        return None
    rope = config.qk_rope_head_dim
    order = interleaved_to_half_order(rope)
    if rest in QUERY_PROJECTIONS:  # each head's rows: [nope | rope]; only the rotary part moves
        head_width = config.qk_nope_head_dim + rope
        head_order = torch.cat([torch.arange(config.qk_nope_head_dim), config.qk_nope_head_dim + order])
        return lambda tensor: permute_head_rows(tensor, head_width, head_order)
    if rest in ROTARY_KEY_PROJECTIONS:  # rows: [latent (kv_lora_rank) | shared rotary key (rope)]
        latent_order = torch.cat([torch.arange(config.kv_lora_rank), config.kv_lora_rank + order])
        return lambda tensor: tensor[latent_order]
    return None


def _check_mtp_copy(source: Mapping[str, torch.Tensor], name: str, main_name: str) -> None:
    if main_name == "lm_head.weight" and main_name not in source:  # a tied head is the embedding
        main_name = "model.embed_tokens.weight"
    if main_name not in source:
        raise ConversionError(f"{name} has no {main_name} to be a copy of.")
    if not torch.equal(source[name], source[main_name]):
        raise ConversionError(
            f"{name} differs from {main_name}; AGILLM's MTP modules share the main embedding and head."
        )


def prepare_deepseek_v3_source(
    config: PreTrainedConfig, tensors: Mapping[str, torch.Tensor]
) -> tuple[PreTrainedConfig, Mapping[str, torch.Tensor]]:
    """The source config (with the checkpoint's MTP count) and its tensors under AGILLM names, rotary rows permuted.

    The config's `num_nextn_predict_layers` says how many MTP modules the original model had; transformers does not
    build them and its `save_pretrained` drops them, so the checkpoint decides. Fewer than announced: converted
    without (a warning); more: an error.
    """
    num_layers = config.num_hidden_layers
    found = _mtp_layers_in(tensors.keys(), num_layers)
    announced = config.num_mtp_layers or 0
    if found > announced:
        raise ConversionError(
            f"The checkpoint holds {found} MTP layers after the {num_layers} decoder layers, but the config announces "
            f"num_nextn_predict_layers={announced}."
        )
    if found < announced:
        logger.warning(
            f"The config announces {announced} MTP layer(s) but the checkpoint holds {found} (transformers drops them "
            f"on save); the AGILLM model gets {found}."
        )
        config = copy.copy(config)
        config.num_mtp_layers = found

    entries = {}
    for name in tensors:
        match = LAYER_NAME.match(name)
        if match is None:
            entries[name] = (name, None)
            continue
        layer, rest = int(match["layer"]), match["rest"]
        if layer >= num_layers and rest in MTP_SHARED_COPIES:
            _check_mtp_copy(tensors, name, MTP_SHARED_COPIES[rest])
            continue
        agillm_rest = rest.replace("mlp.shared_experts.", "mlp.shared_expert.", 1)
        entries[f"model.layers.{layer}.{agillm_rest}"] = (name, _rotary_transform(config, rest))
    return config, TensorView(tensors, entries)
