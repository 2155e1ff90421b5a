"""Map a transformers Llama / Mistral / Qwen2 / Qwen3 config onto an `AgillmConfig`, or say why it cannot be.

AGILLM uses the same field names as these families, so most fields copy over unchanged. What differs is where each
family hard-codes a choice that AGILLM makes configurable:

| family  | q/k/v bias       | o_proj bias      | QK-norm | attention windows                                         |
|---------|------------------|------------------|---------|-----------------------------------------------------------|
| llama   | `attention_bias` | `attention_bias` | no      | none                                                      |
| mistral | no               | no               | no      | every layer slides when `sliding_window` is set           |
| qwen2   | always           | never            | no      | `layer_types` (`use_sliding_window`, `max_window_layers`) |
| qwen3   | `attention_bias` | `attention_bias` | yes     | `layer_types`, as qwen2                                   |
"""

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from configuration_agillm import AgillmConfig


class ConversionError(ValueError):
    """The source cannot be converted as it is: an unsupported feature or an inconsistent checkpoint."""


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


FAMILY_FIELDS = {
    "llama": _llama_fields,
    "mistral": _mistral_fields,
    "qwen2": _qwen2_fields,
    "qwen3": _qwen3_fields,
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
    """Build the `AgillmConfig` that computes exactly what a Llama/Mistral/Qwen2/Qwen3 `source_config` computes.

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
    except (ValueError, TypeError) as error:  # AgillmConfig's own validation, e.g. sliding layers without a window
        raise ConversionError(f"This {model_type} config cannot be expressed as an AgillmConfig: {error}") from error
