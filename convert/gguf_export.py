"""`export_gguf`: an AGILLM model Llama can express, out as one llama-architecture GGUF file for llama.cpp.

The model goes through `llama_export.build_llama_model` first (same checks, same refusals, `drop_heads`), so the
GGUF holds exactly the weights of the exported Llama folder. What this module adds is llama.cpp's layout:

* tensor names from gguf-py's own table (`gguf.get_tensor_name_map(MODEL_ARCH.LLAMA)`, what llama.cpp's
  `convert_hf_to_gguf.py` uses), e.g. `model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`;
* the query/key rows permuted from transformers' rotate-half RoPE layout (the two halves of each head) to ggml's
  interleaved pairs (`permute_for_gguf`); transformers' GGUF loader undoes exactly this
  (`LlamaTensorProcessor._reverse_permute_weights`), and q/k biases are permuted with their rows;
* RoPE scaling as llama.cpp reads it: `linear` as `rope.scaling.type/factor`, `llama3` as the per-frequency divisors
  of a `rope_freqs` tensor (the default inverse frequencies over transformers' llama3 ones). Other types (yarn,
  dynamic NTK, longrope) are computed differently by llama.cpp and are refused;
* the tokenizer as GGUF metadata (`tokenizer.ggml.*`): byte-level BPE only (llama.cpp's `gpt2` model, which
  AGILLM's shipped tokenizer and SmolLM2's are), with the pre-tokenizer named for llama.cpp;
* weight types F32, F16 or Q8_0 (quantized in Python by gguf-py); 1-D tensors (norms, biases) stay F32 as in
  llama.cpp's converter, and a matrix whose rows do not split into 32-value Q8_0 blocks is written F16.
"""

import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import LlamaForCausalLM
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .atomic import atomic_file, check_output_file
from .config_mapping import ConversionError
from .llama_export import build_llama_model, read_agillm_source


GGUF_TYPES = {  # --gguf-type -> (matrix type, general.file_type)
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
GGUF_ROPE_TYPES = ("default", "linear", "llama3")
# llama.cpp's name for the GPT-2 split (byte-level BPE with the regex built into `ByteLevel`).
GPT2_PRE_TOKENIZER = "gpt-2"
# The split regexes transformers' GGUF loader rebuilds per `tokenizer.ggml.pre` name, inverted: the first name
# llama.cpp uses for each regex.
PRE_TOKENIZER_NAMES = {}
for _name, _regex in GGUF_PRE_TOKENIZER_SPLITS.items():
    PRE_TOKENIZER_NAMES.setdefault(_regex, _name)


def permute_for_gguf(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Rows of each head from rotate-half order `[x_0..x_{d/2-1}, y_0..y_{d/2-1}]` to ggml's pairs `[x_0, y_0, ...]`.

    llama.cpp's `LlamaModel.permute`; works on a weight `[heads * d, in]` and on a bias `[heads * d]`.
    """
    head_dim = weights.shape[0] // num_heads
    return weights.reshape(num_heads, 2, head_dim // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


# --------------------------------------------------------------------------------------------------- metadata


def _add_model_metadata(writer: gguf.GGUFWriter, config, file_type, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    if file_type == gguf.LlamaFileType.MOSTLY_Q8_0:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _check_rope(config) -> None:
    rope_type = config.rope_parameters["rope_type"]
    if rope_type not in GGUF_ROPE_TYPES:
        raise ConversionError(
            f"rope_parameters rope_type={rope_type!r}: the GGUF export writes {', '.join(GGUF_ROPE_TYPES)} RoPE, "
            "which llama.cpp computes as transformers does; export the Llama folder (export_llama) instead."
        )


def _rope_frequency_factors(config) -> np.ndarray | None:
    """llama.cpp's `rope_freqs` for llama3 RoPE: it divides each default frequency by its factor."""
    if config.rope_parameters["rope_type"] != "llama3":
        return None
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, device=None)
    default = 1.0 / config.rope_parameters["rope_theta"] ** (
        torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim
    )
    return (default / scaled).to(torch.float32).numpy()


def _add_rope_scaling(writer: gguf.GGUFWriter, config) -> None:
    if config.rope_parameters["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_parameters["factor"])
    factors = _rope_frequency_factors(config)
    if factors is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors)


# --------------------------------------------------------------------------------------------------- tokenizer


def _pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for a byte-level BPE pre-tokenizer, from its tokenizer.json entry."""
    if pre_tokenizer and pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return GPT2_PRE_TOKENIZER
    steps = (pre_tokenizer or {}).get("pretokenizers", [])
    if (
        pre_tokenizer and pre_tokenizer.get("type") == "Sequence" and len(steps) == 2
        and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True) and steps[0].get("pattern", {}).get("Regex") in PRE_TOKENIZER_NAMES
    ):
        return PRE_TOKENIZER_NAMES[steps[0]["pattern"]["Regex"]]
    raise ConversionError(
        f"The tokenizer's pre-tokenizer has no llama.cpp name known here ({json.dumps(pre_tokenizer)[:200]}); the "
        "GGUF export handles GPT-2-style byte-level BPE and the splits transformers' GGUF loader knows."
    )


def _token_types(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token string and llama.cpp type (unused ids of a larger embedding become `[PADn]`, UNUSED)."""
    tokens = [f"[PAD{index}]" for index in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in tokenizer.get_vocab().items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    return tokens, types


def _adds_special_token(tokenizer: PreTrainedTokenizerBase, token_id: int | None, first: bool) -> bool:
    with_special = tokenizer("a b").input_ids
    without = tokenizer("a b", add_special_tokens=False).input_ids
    if token_id is None or len(with_special) == len(without):
        return False
    return (with_special[0] if first else with_special[-1]) == token_id


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    description = json.loads(backend.to_str()) if backend is not None else {}
    model = description.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or description.get("normalizer") is not None:
        raise ConversionError(
            f"The GGUF export writes byte-level BPE tokenizers (llama.cpp's 'gpt2'), not this "
            f"{type(tokenizer).__name__} ({model.get('type')} model, normalizer {description.get('normalizer')})."
        )
    if len(tokenizer) > vocab_size:
        raise ConversionError(f"The tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} embeddings.")
    tokens, types = _token_types(tokenizer, vocab_size)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(description.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(_adds_special_token(tokenizer, tokenizer.bos_token_id, first=True))
    writer.add_add_eos_token(_adds_special_token(tokenizer, tokenizer.eos_token_id, first=False))
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


# --------------------------------------------------------------------------------------------------- tensors


def _gguf_tensors(model: LlamaForCausalLM):
    """`(gguf name, float32 array)` for every tensor, in llama.cpp's layout (q/k permuted, no tied output)."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when there is no output.weight
        array = tensor.detach().to(torch.float32).numpy()
        if ".self_attn.q_proj." in name:
            array = permute_for_gguf(array, config.num_attention_heads)
        elif ".self_attn.k_proj." in name:
            array = permute_for_gguf(array, config.num_key_value_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise RuntimeError(f"No GGUF name for {name}.")
        yield gguf_name, array


def _add_tensor(writer: gguf.GGUFWriter, name: str, array: np.ndarray, matrix_type) -> None:
    block_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if array.ndim == 1 or matrix_type == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    elif matrix_type == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % block_size == 0:
        quantized = gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), matrix_type)
        writer.add_tensor(name, quantized, raw_dtype=matrix_type)
    else:  # F16, and Q8_0 rows that are not whole blocks (as llama.cpp's converter falls back)
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float16))


def export_gguf(
    agillm_folder_or_model,
    gguf_path,
    *,
    gguf_type: str = "f16",
    drop_heads: bool = False,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Write an AGILLM model as a llama-architecture GGUF file llama.cpp runs (and transformers reads back).

    Args:
        agillm_folder_or_model: an `AgillmForCausalLM` or a saved AGILLM folder.
        gguf_path: the `.gguf` file to create; it appears complete or not at all.
        gguf_type: `"f32"`, `"f16"` or `"q8_0"` (weight matrices; norms and biases stay F32).
        drop_heads: leave out SAT/NAT heads, DiffusionBlocks and MTP modules (otherwise they stop the export).
        tokenizer: a tokenizer object or path; by default the folder's own. Without one the file has no
            vocabulary, which llama.cpp needs to tokenize text (token ids still work).
        overwrite: replace an existing file.

    Raises:
        ConversionError: the model uses something Llama or this GGUF writer cannot express (named in the message).
    """
    gguf_path = Path(gguf_path).absolute()
    check_output_file(gguf_path, overwrite)
    if gguf_type not in GGUF_TYPES:
        raise ConversionError(f"gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}.")
    matrix_type, file_type = GGUF_TYPES[gguf_type]
    source = read_agillm_source(agillm_folder_or_model, tokenizer)
    model = build_llama_model(source, torch.float32, drop_heads)
    _check_rope(model.config)
    with atomic_file(gguf_path, overwrite=overwrite) as staging:
        writer = gguf.GGUFWriter(os.fspath(staging), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        _add_model_metadata(writer, model.config, file_type, name=f"{source.name} (AGILLM as Llama)")
        if source.tokenizer is not None:
            _add_tokenizer(writer, source.tokenizer, model.config.vocab_size)
        _add_rope_scaling(writer, model.config)
        for name, array in _gguf_tensors(model):
            _add_tensor(writer, name, array, matrix_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return gguf_path
