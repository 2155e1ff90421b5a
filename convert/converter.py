"""`convert_to_agillm`: a transformers Llama / Mistral / Qwen2 / Qwen3 / Mixtral / Qwen3-MoE / DeepSeek-V3 / Llama 4 (text) checkpoint in, a complete AGILLM folder out.

Steps: read the source (model object, checkpoint folder or GGUF file) -> map its config (`config_mapping`) ->
build an empty AGILLM model and fill it tensor by tensor (`weights`) -> save model, code files, tokenizer +
processor, generation config and model card into a staging folder that replaces the target only when complete
(`atomic`).
"""

import copy
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.repocard import metadata_load
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

import modeling_agillm
import processing_agillm
from modeling_agillm import AgillmForCausalLM
from processing_agillm import AgillmProcessor

from .atomic import atomic_directory, check_output_dir
from .config_mapping import ConversionError, agillm_config_from, check_model_type
from .deepseek_v3 import prepare_deepseek_v3_source
from .llama4 import prepare_llama4_text_source
from .model_card import Provenance, write_model_card
from .reading import check_gguf_file, read_json, reading
from .weights import TIED_TARGET, CheckpointFolderTensors, collect_agillm_weights


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def code_files(module) -> tuple[str, ...]:
    """`module`'s file and every sibling it imports as `from .x import y`, recursively: the files transformers copies
    into a saved folder for a class defined in `module` (`get_relative_import_files`, the walk it uses itself)."""
    path = Path(module.__file__).resolve()
    return (path.name, *sorted(Path(name).name for name in get_relative_import_files(str(path))))


# The one list of the model's code files: what `save_pretrained` ships for `AgillmForCausalLM` (modeling_agillm.py,
# configuration_agillm.py and every sibling module they import).
MODEL_CODE_FILES = code_files(modeling_agillm)
# The processor and its image / audio sub-processors, shipped beside them (`ship_code_files`), so that a converted
# folder can be given an `AgillmImageProcessor` / `AgillmFeatureExtractor` later without this repository.
PROCESSOR_CODE_FILES = ("processing_agillm.py", "image_processing_agillm.py", "feature_extraction_agillm.py")
# What a converted folder must hold besides its weights; checked before it replaces the target.
REQUIRED_FILES = ("config.json", "generation_config.json", *MODEL_CODE_FILES, *PROCESSOR_CODE_FILES, "README.md")
CODE_DIR = Path(processing_agillm.__file__).resolve().parent
HUB_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class Source:
    """Everything the converter reads from a source, whatever its form."""

    config: PreTrainedConfig
    tensors: Mapping[str, torch.Tensor]  # a state dict, or a lazy `CheckpointFolderTensors`
    dtype: torch.dtype  # the source's own weight dtype, the default output dtype
    generation_config: GenerationConfig
    tokenizer: PreTrainedTokenizerBase | None
    provenance: Provenance


# --------------------------------------------------------------------------------------------------- reading sources


def _hub_id_or_none(name: str | None) -> str | None:
    """`name` if it looks like a Hub repo id (`owner/name`) rather than a local path."""
    if name and HUB_REPO_ID.match(name) and not os.path.exists(name):
        return name
    return None


def _as_tokenizer(tokenizer) -> PreTrainedTokenizerBase | None:
    if tokenizer is None or isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    with reading(tokenizer, "tokenizer"):
        return AutoTokenizer.from_pretrained(tokenizer)


def _from_model_object(model, tokenizer, source_name, description=None, license=None, language=None) -> Source:
    config = getattr(model, "config", None)
    if not isinstance(model, PreTrainedModel) or config is None:
        raise ConversionError(
            f"Cannot convert a {type(model).__name__}: pass a transformers model object or a local folder path."
        )
    check_model_type(getattr(config, "model_type", None))
    generation_config = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(config)
    hub_id = _hub_id_or_none(config.name_or_path)  # a local path would mean nothing on another machine
    return Source(
        config=config,
        tensors=model.state_dict(),
        dtype=model.dtype,
        generation_config=copy.deepcopy(generation_config),
        tokenizer=_as_tokenizer(tokenizer),
        provenance=Provenance(
            model_type=config.model_type,
            description=description or f"in-memory `{type(model).__name__}`" + (f" of `{hub_id}`" if hub_id else ""),
            base_model=source_name or hub_id,
            license=license,
            language=language,
        ),
    )


def _from_gguf(folder: Path, gguf_file: str, tokenizer, source_name) -> Source:
    gguf_path = folder / gguf_file
    if not gguf_path.is_file():
        raise ConversionError(f"GGUF file {gguf_path} not found.")
    # The header alone (fast) names the architecture and license; check it (and that the file is whole) before
    # dequantizing the whole file.
    metadata = check_gguf_file(gguf_path)
    check_model_type(metadata["general.architecture"])
    with reading(gguf_path, "GGUF file"):
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    return _from_model_object(
        model,
        tokenizer,
        source_name,
        description=f"GGUF file `{gguf_path.name}`, dequantized to float32 by transformers' GGUF loader",
        license=metadata.get("general.license"),
        language=metadata.get("general.languages"),
    )


def _card_metadata(folder: Path) -> dict:
    card = folder / "README.md"
    with reading(card, "model card"):
        metadata = metadata_load(card) if card.is_file() else None
    metadata = metadata or {}
    language = metadata.get("language")
    return {"license": metadata.get("license"), "language": [language] if isinstance(language, str) else language}


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _from_folder(folder: Path, tokenizer, source_name) -> Source:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{folder} has no config.json.")
    # Checked on the raw file: AutoConfig would fail less clearly on a type transformers does not know.
    check_model_type(read_json(config_path, "config").get("model_type"))
    with reading(config_path, "config"):
        config = AutoConfig.from_pretrained(folder)
    tensors = CheckpointFolderTensors(folder)  # checks the index and every safetensors header now
    if tokenizer is None and any((folder / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = folder
    generation_config = read_generation_config(folder, config)
    metadata = _card_metadata(folder)
    return Source(
        config=config,
        tensors=tensors,
        dtype=_config_dtype(config),
        generation_config=generation_config,
        tokenizer=_as_tokenizer(tokenizer),
        provenance=Provenance(
            model_type=config.model_type,
            description=f"local folder `{folder.name}`",
            base_model=source_name,
            license=metadata["license"],
            language=metadata["language"],
        ),
    )


def read_generation_config(folder: Path, config) -> GenerationConfig:
    """The folder's `generation_config.json` (read through `reading`: a broken file is named), else the defaults
    `config` implies."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return GenerationConfig.from_model_config(config)
    read_json(path, "generation config")
    with reading(path, "generation config"):
        return GenerationConfig.from_pretrained(folder)


# A Hub model id ("owner/name"), as opposed to a path (which may also contain one "/", so a path is tried first).
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def cached_hub_snapshot(repo_id: str) -> Path:
    """The folder of a Hub model already in the local Hugging Face cache. The converter never downloads: a model that
    is not cached is an error that says how to fetch it."""
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError as error:
        raise ConversionError(
            f"{repo_id} is neither a local folder nor a model in the Hugging Face cache "
            f"({hub_constants.HF_HUB_CACHE}); fetch it first, e.g. `hf download {repo_id}`."
        ) from error


def read_source(source, *, tokenizer=None, gguf_file=None, source_name=None) -> Source:
    """Read a model object, a checkpoint folder, a folder + `gguf_file`, a `.gguf` file path, or the id of a Hub
    model in the local cache (recorded as the card's `base_model`)."""
    if not isinstance(source, (str, os.PathLike)):
        return _from_model_object(source, tokenizer, source_name)
    path = Path(source)
    if not path.exists() and HUB_ID.fullmatch(str(source)):
        path, source_name = cached_hub_snapshot(str(source)), source_name or str(source)
    if path.is_file() and path.suffix == ".gguf" and gguf_file is None:
        path, gguf_file = path.parent, path.name
    if not path.is_dir():
        raise ConversionError(f"{source} is not a local folder (the converter reads local files and the Hugging Face "
                              "cache only).")
    if gguf_file is not None:
        return _from_gguf(path, gguf_file, tokenizer, source_name)
    return _from_folder(path, tokenizer, source_name)


# --------------------------------------------------------------------------------------------------- building


def _resolve_dtype(dtype, default: torch.dtype) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ConversionError(f"dtype must be a floating torch dtype (e.g. 'bfloat16'), got {dtype!r}.")
    return resolved


# Families whose checkpoints need rewriting before the name-for-name mapping: `(config, tensors) -> (config, tensors)`
# with AGILLM names (DeepSeek-V3 also sets the MTP layer count its checkpoint holds).
SOURCE_PREPARERS = {"deepseek_v3": prepare_deepseek_v3_source, "llama4_text": prepare_llama4_text_source}


def build_agillm_model(source: Source, dtype: torch.dtype) -> AgillmForCausalLM:
    """An `AgillmForCausalLM` holding the source's weights (cast to `dtype`), without a random init first."""
    source_config, source_tensors = source.config, source.tensors
    if source_config.model_type in SOURCE_PREPARERS:
        source_config, source_tensors = SOURCE_PREPARERS[source_config.model_type](source_config, source_tensors)
    config = agillm_config_from(source_config)
    with init_empty_weights(include_buffers=False):  # parameters on "meta"; rotary tables are computed for real
        model = AgillmForCausalLM(config)
    expected_shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    weights = collect_agillm_weights(source_tensors, expected_shapes, config.tie_word_embeddings, dtype)
    model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()  # `assign` replaced the embedding; point the tied head at the new one
    unfilled = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if unfilled:
        raise RuntimeError(f"Conversion left parameters unfilled: {unfilled}")
    model.config.dtype = dtype
    model.generation_config = _generation_config(source.generation_config)
    return model.eval()


def _generation_config(source_generation_config: GenerationConfig) -> GenerationConfig:
    """The source's generation defaults; with no pad id, pad with eos (what `generate` would do, minus the warning)."""
    generation_config = copy.deepcopy(source_generation_config)
    eos = generation_config.eos_token_id
    if generation_config.pad_token_id is None and eos is not None:
        generation_config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return generation_config


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    if len(tokenizer) > vocab_size:
        raise ConversionError(
            f"The tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} embeddings; "
            "ids beyond the embedding table would be rejected by the model."
        )


# --------------------------------------------------------------------------------------------------- saving


def _verify_folder(folder: Path, weight_names: set[str]) -> None:
    """Check the staging folder is complete before it replaces the target."""
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"The converted folder lacks {missing}.")
    auto_map = json.loads((folder / "config.json").read_text()).get("auto_map", {})
    if "AutoModelForCausalLM" not in auto_map:
        raise RuntimeError(f"config.json has no AutoModelForCausalLM in auto_map ({auto_map}).")
    saved = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as file:
            saved.update(file.keys())
    if saved != weight_names:
        raise RuntimeError(f"Saved weights differ from the model's: {sorted(saved ^ weight_names)[:8]}")


def ship_code_files(folder: Path) -> None:
    """Copy the processor code files that the folder does not hold yet."""
    for name in PROCESSOR_CODE_FILES:
        if not (folder / name).is_file():
            shutil.copy(CODE_DIR / name, folder / name)


def save_agillm_folder(
    model: AgillmForCausalLM, source: Source, output_dir: Path, max_shard_size, overwrite: bool
) -> None:
    weight_names = set(model.state_dict())
    if model.config.tie_word_embeddings:
        weight_names.discard(TIED_TARGET)
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        # Writes config.json (with the full auto_map), the weights, generation_config.json and the code files.
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if source.tokenizer is not None:
            # Writes the tokenizer files, the chat template and processor_config.json.
            AgillmProcessor(tokenizer=source.tokenizer).save_pretrained(staging)
        ship_code_files(staging)  # the processor's code is shipped even without a tokenizer
        has_chat_template = bool(getattr(source.tokenizer, "chat_template", None))
        write_model_card(staging, model.config, source.provenance, model.dtype, has_chat_template)
        _verify_folder(staging, weight_names)


def convert_to_agillm(
    source,
    output_dir,
    *,
    tokenizer=None,
    gguf_file: str | None = None,
    dtype=None,
    max_shard_size: int | str = "200MB",
    overwrite: bool = False,
    source_name: str | None = None,
) -> Path:
    """Convert a transformers Llama / Mistral / Qwen2 / Qwen3 / Mixtral / Qwen3-MoE / DeepSeek-V3 / Llama 4 (text) model into an AGILLM folder.

    Args:
        source: a transformers model object, or a local folder (config.json + safetensors/.bin weights, or with
            `gguf_file`), or the path of a `.gguf` file, or the id of a Hub model already in the local Hugging Face
            cache (`"owner/name"`; nothing is downloaded).
        output_dir: the folder to create. It appears complete or not at all.
        tokenizer: a tokenizer object or path; by default a folder's (or GGUF file's) own tokenizer, if any.
        gguf_file: a GGUF file inside the `source` folder; transformers dequantizes it to float32.
        dtype: weight dtype of the output (`torch.bfloat16`, `"float32"`, ...); default: the source's.
        max_shard_size: largest safetensors shard, as for `save_pretrained`.
        overwrite: replace an existing `output_dir` (only once the new folder is complete).
        source_name: the source's Hub id, recorded as `base_model` in the model card.

    Returns:
        The absolute path of the converted folder.

    Raises:
        ConversionError: an unsupported or inconsistent source (nothing is written).
        FileExistsError: `output_dir` exists and `overwrite` is False.
    """
    output_dir = Path(output_dir).absolute()
    check_output_dir(output_dir, overwrite)
    if isinstance(source, (str, os.PathLike)) and Path(source).absolute() == output_dir:
        raise ConversionError("output_dir must differ from the source folder.")
    loaded = read_source(source, tokenizer=tokenizer, gguf_file=gguf_file, source_name=source_name)
    if loaded.tokenizer is not None:
        _check_tokenizer(loaded.tokenizer, loaded.config.vocab_size)
    model = build_agillm_model(loaded, _resolve_dtype(dtype, loaded.dtype))
    save_agillm_folder(model, loaded, output_dir, max_shard_size, overwrite)
    return output_dir
