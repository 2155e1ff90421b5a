"""`export_llama`: an AGILLM model whose computation Llama can express, out as a stock transformers Llama folder.

The inverse of the Llama import (`convert_to_agillm`). Nothing is mapped twice:

* config: the fields Llama shares with AGILLM are `config_mapping.SHARED_FIELDS`, plus `head_dim`,
  `rope_parameters` and Llama's two bias flags (`_llama_fields` maps `attention_bias` onto AGILLM's q/k/v and o_proj
  biases, `mlp_bias` onto `mlp_bias`). After the checks below, the Llama config is imported back with
  `agillm_config_from` and must reproduce every AGILLM field that shapes the AR forward; a field that differs (one
  added to `AgillmConfig` later, say) stops the export with its name instead of being dropped in silence.
* weights: AGILLM's parameter names are Llama's, so the tensors go through the import's own
  `collect_agillm_weights` with Llama's parameter shapes as the target: the same name check, shape check and tied-head
  check, in the other direction.

What Llama cannot express is refused with a `ConversionError` naming the field (`llama_expressibility_problems`).
AGILLM's extra predictors (SAT and NAT heads, the DiffusionBlocks sampler, DeepSeek-V3 MTP modules) sit beside the
trunk: with `drop_heads=True` they are left out and the export is the trunk with its AR head, which is exactly
what `AgillmForCausalLM.forward(objective="ar")` and plain `generate` compute.

The folder loads with `LlamaForCausalLM.from_pretrained` (no remote code), and so runs wherever stock Llama does
(vLLM's native Llama, TGI, ...). `convert/gguf_export.py` writes the same model as a llama.cpp GGUF file.
"""

import copy
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import logging

from configuration_agillm import AgillmConfig

from .atomic import atomic_directory, check_output_dir
from .config_mapping import SHARED_FIELDS, ConversionError, agillm_config_from
from .converter import TOKENIZER_FILES, _config_dtype, _generation_config, _resolve_dtype, read_generation_config
from .reading import read_json, reading
from .weights import TIED_TARGET, CheckpointFolderTensors, collect_agillm_weights


logger = logging.get_logger(__name__)

# Llama's own fields beyond SHARED_FIELDS; with them, every field of LlamaConfig but `pretraining_tp` (always 1).
LLAMA_ONLY_FIELDS = ("head_dim", "rope_parameters", "attention_bias", "mlp_bias")

# AgillmConfig fields that cannot change what the trunk and its AR head compute once the checks of
# `llama_expressibility_problems` pass: settings of training only, or of a component those checks refused (their
# values are then unused). The round trip through `agillm_config_from` compares every other field.
UNUSED_BY_THE_AR_TRUNK = frozenset({
    # training only
    "hidden_dropout", "label_smoothing", "objective_weights", "sat_gate_loss", "cross_entropy_chunk_size",
    "output_router_logits", "router_aux_loss_coef", "router_z_loss_coef", "router_bias_update_rate", "mtp_loss_weight",
    # attention variants (the checks require full attention, RoPE on every layer, no QK-norm, no MLA)
    "sliding_window", "attention_chunk_size", "qk_norm_type", "attn_temperature_tuning", "floor_scale", "attn_scale",
    "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "mla_absorbed_decode",
    # experts (the checks require none)
    "num_experts_per_tok", "moe_intermediate_size", "router_type", "norm_topk_prob", "n_group", "topk_group",
    "routed_scaling_factor", "shared_expert_intermediate_size", "shared_expert_gate", "router_scope",
    "experts_per_document",
    # the other heads and decoders (refused, or dropped with drop_heads)
    "heads", "sat_block_size", "nat_mask_token_id", "nat_block_size", "nat_objective", "diffusion_blocks",
    "num_mtp_layers", "mtp_layer_types", "mtp_mlp_layer_types",
    # media (the checks require a text-only model)
    "vision_config", "audio_config", "vq_config", "image_token_id", "image_start_token_id", "image_end_token_id",
    "audio_token_id", "audio_start_token_id", "audio_end_token_id", "image_vocab_offset",
    "media_bidirectional_attention",
})
# AgillmConfig's own fields (those it inherits from PreTrainedConfig are not settings of the model).
AGILLM_FIELDS = tuple(sorted({field.name for field in fields(AgillmConfig)} - {field.name for field in fields(
    PreTrainedConfig)}))
# The state-dict entries of what `drop_heads` drops (MTP modules are `model.layers.{num_hidden_layers + k}`).
DROPPED_HEAD_WEIGHTS = re.compile(r"^(sat_head|nat_head|diffusion_blocks_state)\.")
DROP_HEADS_HINT = "pass drop_heads=True (--drop-heads) to export the trunk with its AR head only"


@dataclass
class AgillmSource:
    """An AGILLM model to export, read from a model object or a saved folder."""

    config: AgillmConfig
    tensors: Mapping[str, torch.Tensor]  # a state dict, or a lazy `CheckpointFolderTensors`
    dtype: torch.dtype
    generation_config: GenerationConfig
    tokenizer: PreTrainedTokenizerBase | None
    name: str  # how the model card and the GGUF file name the source


# --------------------------------------------------------------------------------------------------- reading


def _as_tokenizer(tokenizer) -> PreTrainedTokenizerBase | None:
    """A tokenizer object as it is, or one loaded from a path without running code: an AGILLM folder's config and
    tokenizer_config name AGILLM's processor (remote code), but its tokenizer is a plain `tokenizers` one."""
    if tokenizer is None or isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    with reading(tokenizer, "tokenizer"):
        return AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=False)


def read_agillm_source(source, tokenizer=None) -> AgillmSource:
    """An `AgillmForCausalLM` (this repository's class or one loaded as remote code), or a saved AGILLM folder.

    A folder is read with this repository's `AgillmConfig` and its weights lazily, tensor by tensor: no code from
    the folder runs and no model is built.
    """
    if not isinstance(source, (str, os.PathLike)):
        config = getattr(source, "config", None)
        if not isinstance(source, PreTrainedModel) or getattr(config, "model_type", None) != "agillm":
            raise ConversionError(
                f"Cannot export a {type(source).__name__}: pass an AGILLM model object or a saved AGILLM folder."
            )
        if type(source).__name__ != "AgillmForCausalLM":  # e.g. a classification model: its head is no LM head
            raise ConversionError(f"Cannot export a {type(source).__name__}: Llama has only the causal-LM head.")
        generation_config = getattr(source, "generation_config", None) or GenerationConfig.from_model_config(config)
        return AgillmSource(
            config=AgillmConfig.from_dict(config.to_dict()),  # this repository's class, whatever loaded the model
            tensors=source.state_dict(),
            dtype=source.dtype,
            generation_config=copy.deepcopy(generation_config),
            tokenizer=_as_tokenizer(tokenizer),
            name=Path(config.name_or_path).name or "AGILLM model",
        )
    folder = Path(source)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{folder} is not a saved AGILLM folder (it has no config.json).")
    model_type = read_json(config_path, "config").get("model_type")
    if model_type != "agillm":
        raise ConversionError(f"{folder} holds a {model_type!r} model, not an AGILLM one (model_type 'agillm').")
    with reading(config_path, "config"):
        config = AgillmConfig.from_pretrained(folder)
    tensors = CheckpointFolderTensors(folder)
    generation_config = read_generation_config(folder, config)
    if tokenizer is None and any((folder / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = folder
    return AgillmSource(
        config=config,
        tensors=tensors,
        dtype=_config_dtype(config),
        generation_config=generation_config,
        tokenizer=_as_tokenizer(tokenizer),
        name=folder.absolute().name,
    )


# --------------------------------------------------------------------------------------------------- config


def llama_expressibility_problems(config: AgillmConfig, drop_heads: bool = False) -> list[str]:
    """What in `config` a Llama model cannot compute, one line per field; empty when the export is exact."""
    problems = []

    def require(condition: bool, problem: str) -> None:
        if not condition:
            problems.append(problem)

    require(config.norm_type == "rms_norm", f"norm_type={config.norm_type!r}: Llama normalises with RMSNorm only")
    require(config.position_embedding_type == "rope",
            f"position_embedding_type={config.position_embedding_type!r}: Llama has rotary positions only")
    rope_type = config.rope_parameters.get("rope_type")
    require(rope_type == "default" or rope_type in ROPE_INIT_FUNCTIONS,
            f"rope_parameters rope_type={rope_type!r}: not a RoPE type transformers' Llama knows")
    require(not config.nope_layers, f"nope_layers={config.nope_layers}: Llama applies RoPE in every layer")
    require(set(config.layer_types) == {"full_attention"},
            f"layer_types={sorted(set(config.layer_types))}: Llama attends over the full context in every layer")
    require(not config.use_qk_norm, "use_qk_norm=True: Llama has no query/key norm")
    require(not config.is_mla, f"kv_lora_rank={config.kv_lora_rank}: Llama has no multi-head latent attention")
    require(not config.shares_kv, f"kv_source_layers={config.kv_source_layers}: Llama layers never share K/V")
    require(not config.tie_kv, "tie_kv=True: Llama has separate key and value projections")
    require(config.attention_output_bias == config.attention_bias,
            f"attention_bias={config.attention_bias} with attention_output_bias={config.attention_output_bias}: "
            "Llama's one attention_bias flag covers q/k/v and o_proj alike")
    require(config.mlp_type == "gated", f"mlp_type={config.mlp_type!r}: Llama's MLP is gated")
    require(config.hidden_act == "silu",
            f"hidden_act={config.hidden_act!r}: Llama checkpoints are SiLU (vLLM's and llama.cpp's Llama run "
            "SiLU only)")
    require(not config.num_experts, f"num_experts={config.num_experts}: Llama has dense MLPs only")
    require(not config.head_bias, "head_bias=True: Llama's lm_head has no bias")
    media = [name for name in ("vision_config", "audio_config", "vq_config") if getattr(config, name) is not None]
    require(not media, f"{', '.join(media)}: Llama is a text-only model")
    if not drop_heads:
        extra_heads = [head for head in config.heads if head != "ar"]
        require(not extra_heads, f"heads={config.heads}: Llama has the AR head only; {DROP_HEADS_HINT}")
        require(config.diffusion_blocks is None,
                f"diffusion_blocks is set: Llama has no DiffusionBlocks sampler; {DROP_HEADS_HINT}")
        require(not config.num_mtp_layers,
                f"num_mtp_layers={config.num_mtp_layers}: Llama has no MTP modules; {DROP_HEADS_HINT}")
    return problems


def _round_trip_differences(config: AgillmConfig, llama_config: LlamaConfig) -> list[str]:
    """Fields the Llama import would not give back: everything that shapes the AR forward must survive."""
    reimported = agillm_config_from(llama_config)
    differences = []
    for name in AGILLM_FIELDS:
        if name not in UNUSED_BY_THE_AR_TRUNK and getattr(config, name) != getattr(reimported, name):
            differences.append(f"{name}={getattr(config, name)!r} (as Llama: {getattr(reimported, name)!r})")
    return differences


def llama_config_from(config: AgillmConfig, drop_heads: bool = False) -> LlamaConfig:
    """The `LlamaConfig` computing what `config`'s trunk and AR head compute.

    Raises:
        ConversionError: naming every field Llama cannot express (see `llama_expressibility_problems`).
    """
    problems = llama_expressibility_problems(config, drop_heads)
    if not problems:
        llama_fields = {name: getattr(config, name) for name in SHARED_FIELDS}
        llama_fields.update({name: copy.deepcopy(getattr(config, name)) for name in LLAMA_ONLY_FIELDS})
        llama_config = LlamaConfig(**llama_fields)
        problems = [f"{difference}: no Llama field holds it" for difference in _round_trip_differences(
            config, llama_config)]
    if problems:
        raise ConversionError("This AGILLM model cannot be exported as Llama: " + "; ".join(problems) + ".")
    if config.hidden_dropout:
        logger.warning(f"hidden_dropout={config.hidden_dropout} (training only) has no Llama field; it is left out.")
    return llama_config


# --------------------------------------------------------------------------------------------------- weights


def _dropped_weight_names(source: AgillmSource) -> list[str]:
    mtp_prefixes = tuple(f"model.layers.{source.config.num_hidden_layers + k}." for k in range(
        source.config.num_mtp_layers))
    return [name for name in source.tensors if DROPPED_HEAD_WEIGHTS.match(name) or name.startswith(mtp_prefixes)]


def build_llama_model(source: AgillmSource, dtype: torch.dtype, drop_heads: bool = False) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` holding the AGILLM weights (cast to `dtype`), without a random init first."""
    llama_config = llama_config_from(source.config, drop_heads)
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(llama_config)
    expected_shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    dropped = _dropped_weight_names(source)
    if dropped:
        logger.warning(f"drop_heads: exporting the trunk and the AR head; left out {len(dropped)} tensors of the "
                       f"other heads ({', '.join(sorted({name.split('.')[0] for name in dropped}))}, MTP layers).")
    kept = {name: source.tensors[name] for name in source.tensors if name not in set(dropped)}
    try:
        weights = collect_agillm_weights(kept, expected_shapes, llama_config.tie_word_embeddings, dtype)
    except ConversionError as error:  # the config passed its checks, so the checkpoint contradicts it
        raise ConversionError(f"The AGILLM weights do not fit the Llama model of their config: {error}") from error
    model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()
    unfilled = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if unfilled:
        raise RuntimeError(f"Export left parameters unfilled: {unfilled}")
    model.config.dtype = dtype
    model.generation_config = _generation_config(source.generation_config)
    return model.eval()


# --------------------------------------------------------------------------------------------------- saving


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """The tokenizer files, without AGILLM's processor: the folder loads with plain `AutoTokenizer`."""
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        tokenizer_config = json.loads(config_path.read_text())
        # AGILLM's processor, and the loading flags transformers 5 records (`is_local`, `local_files_only`).
        agillm_keys = [key for key in ("processor_class", "auto_map", "is_local", "local_files_only")
                       if key in tokenizer_config]
        for key in agillm_keys:
            del tokenizer_config[key]
        if agillm_keys:
            config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")


def _model_card(source: AgillmSource, drop_heads: bool) -> str:
    heads = [head for head in source.config.heads if head != "ar"]
    dropped = ""
    if drop_heads and (heads or source.config.diffusion_blocks is not None or source.config.num_mtp_layers):
        diffusion_blocks = "on" if source.config.diffusion_blocks is not None else "off"
        dropped = (f"\nThe AGILLM model's other predictors (heads {', '.join(heads) or 'none'}, DiffusionBlocks "
                   f"{diffusion_blocks}, {source.config.num_mtp_layers} MTP layers) were left out (`drop_heads`): "
                   "this folder decodes autoregressively only.\n")
    return (
        "---\nlibrary_name: transformers\ntags:\n- llama\n- agillm\n---\n\n"
        f"# {source.name}, exported as Llama\n\n"
        "A stock `LlamaForCausalLM` (no remote code) computing what the AGILLM model's trunk and AR head compute: "
        "written by `python -m convert --export-llama`, which checks that every AGILLM setting has a Llama "
        "equivalent.\n" + dropped
    )


def export_llama(
    agillm_folder_or_model,
    output_dir,
    *,
    dtype=None,
    overwrite: bool = False,
    drop_heads: bool = False,
    tokenizer=None,
    max_shard_size: int | str = "200MB",
) -> Path:
    """Write an AGILLM model as a stock transformers Llama folder (config, safetensors, tokenizer, generation config).

    Args:
        agillm_folder_or_model: an `AgillmForCausalLM` or a saved AGILLM folder.
        output_dir: the folder to create; it appears complete or not at all.
        dtype: weight dtype of the output (`"bfloat16"`, `torch.float16`, ...); default: the source's.
        overwrite: replace an existing `output_dir` (only once the new folder is complete).
        drop_heads: leave out SAT/NAT heads, DiffusionBlocks and MTP modules (otherwise they stop the export).
        tokenizer: a tokenizer object or path; by default the folder's own, if any.
        max_shard_size: largest safetensors shard, as for `save_pretrained`.

    Returns:
        The absolute path of the Llama folder.

    Raises:
        ConversionError: the model uses something Llama cannot express (every such field is named).
        FileExistsError: `output_dir` exists and `overwrite` is False.
    """
    output_dir = Path(output_dir).absolute()
    check_output_dir(output_dir, overwrite)
    is_path = isinstance(agillm_folder_or_model, (str, os.PathLike))
    if is_path and Path(agillm_folder_or_model).absolute() == output_dir:
        raise ConversionError("output_dir must differ from the source folder.")
    source = read_agillm_source(agillm_folder_or_model, tokenizer)
    model = build_llama_model(source, _resolve_dtype(dtype, source.dtype), drop_heads)
    if source.tokenizer is not None and len(source.tokenizer) > model.config.vocab_size:
        raise ConversionError(f"The tokenizer has {len(source.tokenizer)} tokens but the model only "
                              f"{model.config.vocab_size} embeddings.")
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if source.tokenizer is not None:
            _save_tokenizer(source.tokenizer, staging)
        (staging / "README.md").write_text(_model_card(source, drop_heads))
        _verify_llama_folder(staging, model)
    return output_dir


def _verify_llama_folder(folder: Path, model: LlamaForCausalLM) -> None:
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "llama" or "auto_map" in config:
        raise RuntimeError(f"The exported config.json is not a stock Llama config: {config}")
    if not (folder / "generation_config.json").is_file():
        raise RuntimeError("The exported folder lacks generation_config.json.")
    expected = set(model.state_dict()) - ({TIED_TARGET} if model.config.tie_word_embeddings else set())
    saved = set(CheckpointFolderTensors(folder))
    if saved != expected:
        raise RuntimeError(f"Saved weights differ from the model's: {sorted(saved ^ expected)[:8]}")
