"""Map a transformers Llama / Mistral / Qwen2 / Qwen3 / Mixtral / Qwen3-MoE config onto an `AgillmConfig`, or say
why it cannot be. DeepSeek-V3 and Llama 4 (text) have their own modules (`deepseek_v3.py`, `llama4.py`), which also
rewrite the checkpoint (interleaved RoPE rows, transposed experts) before the name-for-name mapping.

AGILLM uses the same field names as these families, so most fields copy over unchanged. What differs is where each
family hard-codes a choice that AGILLM makes configurable:

| family    | q/k/v bias       | o_proj bias      | QK-norm | attention windows                                         |
|-----------|------------------|------------------|---------|-----------------------------------------------------------|
| llama     | `attention_bias` | `attention_bias` | no      | none                                                      |
| mistral   | no               | no               | no      | every layer slides when `sliding_window` is set           |
| qwen2     | always           | never            | no      | `layer_types` (`use_sliding_window`, `max_window_layers`) |
| qwen3     | `attention_bias` | `attention_bias` | yes     | `layer_types`, as qwen2                                   |
| mixtral   | no               | no               | no      | as mistral                                                |
| qwen3_moe | `attention_bias` | `attention_bias` | yes     | as mistral (`use_sliding_window` clears `sliding_window`)  |

The two MoE families route as AGILLM's `softmax_topk` router: softmax over the router logits in fp32, top-k, then
(Mixtral always, Qwen3-MoE with `norm_topk_prob`) renormalised over the chosen experts.

| family    | experts             | expert width            | dense layers (`mlp_layer_types`, `intermediate_size` wide)       |
|-----------|---------------------|-------------------------|-------------------------------------------------------------------|
| mixtral   | `num_local_experts` | `intermediate_size`     | none                                                              |
| qwen3_moe | `num_experts`       | `moe_intermediate_size` | `mlp_only_layers`, and layer i when `decoder_sparse_step` ∤ i + 1 |
"""

from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils import logging

from configuration_agillm import AgillmConfig

# Defined apart (the CLI catches it before importing transformers); the converter modules import it from here.
from .errors import ConversionError  # noqa: F401


logger = logging.get_logger(__name__)


# Fields with the same meaning in every supported family and in `AgillmConfig`.
SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "hidden_act",
    "rms_norm_eps",
    "initializer_range",
    "attention_dropout",
    "use_cache",
    "tie_word_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


def _llama_fields(config: PreTrainedConfig) -> dict:
    # One flag covers all four attention projections; the MLP has its own.
    return {
        "attention_bias": config.attention_bias,
        "attention_output_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "layer_types": ["full_attention"] * config.num_hidden_layers,
    }


def _mistral_fields(config: PreTrainedConfig) -> dict:
    # MistralModel ignores any `layer_types`: it builds one sliding mask for all layers when `sliding_window` is set.
    layer_type = "sliding_attention" if config.sliding_window is not None else "full_attention"
    return {
        "attention_bias": False,
        "attention_output_bias": False,
        "mlp_bias": False,
        "layer_types": [layer_type] * config.num_hidden_layers,
        "sliding_window": config.sliding_window,
    }


def _qwen_layer_types(config: PreTrainedConfig) -> dict:
    # Qwen2/Qwen3 configs resolve `use_sliding_window` + `max_window_layers` into `layer_types` (sliding from layer
    # `max_window_layers` on) and clear `sliding_window` when `use_sliding_window` is off.
    layer_types = list(config.layer_types)
    return {
        "layer_types": layer_types,
        "sliding_window": config.sliding_window if "sliding_attention" in layer_types else None,
    }


def _qwen2_fields(config: PreTrainedConfig) -> dict:
    # Qwen2Attention hard-codes a bias on q/k/v and none on o_proj; there is no config flag for either.
    return {"attention_bias": True, "attention_output_bias": False, "mlp_bias": False, **_qwen_layer_types(config)}


def _qwen3_fields(config: PreTrainedConfig) -> dict:
    return {
        "attention_bias": config.attention_bias,
        "attention_output_bias": config.attention_bias,
        "mlp_bias": False,
        "use_qk_norm": True,
        **_qwen_layer_types(config),
    }


def _moe_fields(config: PreTrainedConfig, num_experts: int, expert_size: int, norm_topk_prob: bool,
                mlp_layer_types: list[str]) -> dict:
    """The routed-experts fields shared by Mixtral and Qwen3-MoE (gated SiLU experts, no biases, no shared expert)."""
    return {
        "num_experts": num_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "moe_intermediate_size": expert_size,
        "router_type": "softmax_topk",
        "norm_topk_prob": norm_topk_prob,
        "mlp_layer_types": mlp_layer_types,
        # The load-balancing loss both families add to the training loss when `output_router_logits` is on.
        "output_router_logits": config.output_router_logits,
        "router_aux_loss_coef": config.router_aux_loss_coef,
    }


def _mixtral_fields(config: PreTrainedConfig) -> dict:
    # Jitter multiplies the MoE input by U(1 - j, 1 + j) noise in training mode only; eval forwards never see it.
    if config.router_jitter_noise:
        logger.warning(
            f"Mixtral's router_jitter_noise={config.router_jitter_noise} is a training-time augmentation AGILLM does "
            "not implement; inference is unaffected, fine-tuning the converted model runs without it."
        )
    # Every Mixtral layer is sparse and its `intermediate_size` is the width of one expert (there is no dense MLP).
    moe = _moe_fields(
        config,
        num_experts=config.num_local_experts,
        expert_size=config.intermediate_size,
        norm_topk_prob=True,  # MixtralTopKRouter always renormalises the top-k probabilities
        mlp_layer_types=["sparse"] * config.num_hidden_layers,
    )
    return {**_mistral_fields(config), **moe}


def _qwen3_moe_mlp_layer_types(config: PreTrainedConfig) -> list[str]:
    # Qwen3MoeDecoderLayer's rule, layer by layer.
    return [
        "sparse"
        if layer not in config.mlp_only_layers and (layer + 1) % config.decoder_sparse_step == 0
        else "dense"
        for layer in range(config.num_hidden_layers)
    ]


def _qwen3_moe_fields(config: PreTrainedConfig) -> dict:
    # Qwen3MoeModel, like Mistral, uses one mask for all layers: sliding whenever `sliding_window` survived
    # `use_sliding_window` (the config clears it otherwise); it has no `layer_types`.
    fields = {
        **_mistral_fields(config),
        "attention_bias": config.attention_bias,
        "attention_output_bias": config.attention_bias,
        "use_qk_norm": True,
    }
    if config.num_experts == 0:  # every layer is then a dense MLP of `intermediate_size`
        return fields
    if config.decoder_sparse_step < 1:
        raise ConversionError(f"decoder_sparse_step must be a positive integer, got {config.decoder_sparse_step}.")
    moe = _moe_fields(
        config,
        num_experts=config.num_experts,
        expert_size=config.moe_intermediate_size,
        norm_topk_prob=config.norm_topk_prob,
        mlp_layer_types=_qwen3_moe_mlp_layer_types(config),
    )
    return {**fields, **moe}


# DeepSeek-V3 and Llama 4 live in their own modules (they also rewrite the checkpoint); imported here, below
# `ConversionError`, which they import from this module.
from .deepseek_v3 import deepseek_v3_fields  # noqa: E402
from .llama4 import llama4_text_fields  # noqa: E402


FAMILY_FIELDS = {
    "llama": _llama_fields,
    "mistral": _mistral_fields,
    "qwen2": _qwen2_fields,
    "qwen3": _qwen3_fields,
    "mixtral": _mixtral_fields,
    "qwen3_moe": _qwen3_moe_fields,
    "deepseek_v3": deepseek_v3_fields,
    "llama4_text": llama4_text_fields,
}
SUPPORTED_MODEL_TYPES = tuple(FAMILY_FIELDS)


def check_model_type(model_type: str | None) -> None:
    if model_type not in FAMILY_FIELDS:
        raise ConversionError(
            f"Cannot convert model_type {model_type!r}: AGILLM converts {', '.join(SUPPORTED_MODEL_TYPES)}."
        )


def _check_quantization(config: PreTrainedConfig) -> None:
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
    # transformers dequantizes GGUF tensors to float while loading, so a GGUF-loaded model holds plain weights.
    if str(getattr(method, "value", method)) != "gguf":
        raise ConversionError(
            f"The source is quantized ({method}); convert the unquantized checkpoint (or dequantize it first)."
        )


def _rope_parameters(config: PreTrainedConfig) -> dict:
    """The source's RoPE dict, checked against what AGILLM's rotary embedding computes."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_type" not in rope:
        raise ConversionError(f"The source config has no usable rope_parameters (got {rope!r}).")
    rope = dict(rope)
    rope_type = rope["rope_type"]
    if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        raise ConversionError(
            f"Unsupported rope_type {rope_type!r}; AGILLM supports 'default' and {sorted(ROPE_INIT_FUNCTIONS)}."
        )
    # AGILLM rotates the whole head; a partial rotation would need a different apply function.
    partial = rope.get("partial_rotary_factor")
    if partial not in (None, 1, 1.0) and rope_type != "proportional":
        raise ConversionError(f"partial_rotary_factor={partial} (RoPE on part of each head) is not supported.")
    return rope


def agillm_config_from(source_config: PreTrainedConfig) -> AgillmConfig:
    """Build the `AgillmConfig` that computes exactly what a `source_config` of a supported family computes.

    Raises:
        ConversionError: unknown `model_type`, a quantized source, a RoPE variant AGILLM lacks, or a combination
            `AgillmConfig` rejects (e.g. sliding layers without a window).
    """
    model_type = getattr(source_config, "model_type", None)
    check_model_type(model_type)
    _check_quantization(source_config)
    if source_config.hidden_act not in ACT2FN:
        raise ConversionError(f"Unknown hidden_act {source_config.hidden_act!r}.")

    fields = {name: getattr(source_config, name) for name in SHARED_FIELDS}
    fields["head_dim"] = getattr(source_config, "head_dim", None) or (
        source_config.hidden_size // source_config.num_attention_heads
    )
    fields["rope_parameters"] = _rope_parameters(source_config)
    fields.update(FAMILY_FIELDS[model_type](source_config))
    try:
        return AgillmConfig(**fields)
    except (ValueError, TypeError, StrictDataclassError) as error:  # AgillmConfig's checks, e.g. a window missing
        raise ConversionError(f"This {model_type} config cannot be expressed as an AgillmConfig: {error}") from error
