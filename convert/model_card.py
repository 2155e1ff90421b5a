"""Model card (README.md with Hub metadata) for a converted folder."""

from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData

from configuration_agillm import AgillmConfig


@dataclass
class Provenance:
    """Where the weights came from, as far as the converter knows."""

    model_type: str  # the source family: llama, mistral, qwen2, qwen3
    description: str  # e.g. "local folder `x`" or "GGUF file `y`, dequantized to float by transformers"
    base_model: str | None = None  # a Hub repo id, written as `base_model` metadata
    license: str | None = None
    language: list[str] | None = None


def _architecture_rows(config: AgillmConfig, dtype: torch.dtype) -> list[tuple[str, str]]:
    kinds = sorted(set(config.layer_types))
    attention = ", ".join(f"{config.layer_types.count(kind)} x {kind}" for kind in kinds)
    if config.sliding_window is not None:
        attention += f" (window {config.sliding_window})"
    return [
        ("layers / hidden / MLP", f"{config.num_hidden_layers} / {config.hidden_size} / {config.intermediate_size}"),
        ("heads (query / key-value) x head_dim",
         f"{config.num_attention_heads} / {config.num_key_value_heads} x {config.head_dim}"),
        ("attention layers", attention),
        ("bias (q/k/v, o, MLP)", f"{config.attention_bias}, {config.attention_output_bias}, {config.mlp_bias}"),
        ("QK-norm", str(config.use_qk_norm)),
        ("RoPE", ", ".join(f"{key}={value}" for key, value in config.rope_parameters.items())),
        ("vocabulary / context", f"{config.vocab_size} / {config.max_position_embeddings}"),
        ("tied embeddings", str(config.tie_word_embeddings)),
        ("weights dtype", str(dtype).removeprefix("torch.")),
    ]


def build_model_card(
    config: AgillmConfig, provenance: Provenance, dtype: torch.dtype, has_chat_template: bool
) -> ModelCard:
    tags = ["agillm", "custom_code", "converted", provenance.model_type]
    if has_chat_template:
        tags.append("conversational")
    metadata = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        license=provenance.license,
        language=provenance.language,
        base_model=provenance.base_model,
    )
    what = f"a {provenance.model_type} model"
    if provenance.base_model:
        what = f"[`{provenance.base_model}`](https://huggingface.co/{provenance.base_model}), {what},"
    table = "\n".join(f"| {name} | {value} |" for name, value in _architecture_rows(config, dtype))
    license_line = "That of the source model."
    if provenance.license:
        license_line = f"`{provenance.license}`, as the source model."
    body = f"""
# AGILLM conversion of {provenance.base_model or f"a {provenance.model_type} model"}

This folder holds {what} converted to AGILLM: the weights are copied one to one into the AGILLM decoder, whose
configuration reproduces the source's computation (logits match transformers' implementation of the source
within fp32 rounding).

- Source: {provenance.description}.
- Converted with `convert/` of the AGILLM repository (`python -m convert SOURCE OUTPUT_DIR`).

## Architecture

| field | value |
|---|---|
{table}

## Usage

The model code ships in this folder (`configuration_agillm.py`, `modeling_agillm.py`, `processing_agillm.py`),
so load it with `trust_remote_code=True`:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder", trust_remote_code=True)
inputs = tokenizer("The capital of France is", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))
```

## License

{license_line}
"""
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n{body}")


def write_model_card(folder: Path, *args, **kwargs) -> None:
    build_model_card(*args, **kwargs).save(Path(folder) / "README.md")
