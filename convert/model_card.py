"""Model card (README.md with Hub metadata) for a converted folder."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData

from configuration_agillm import AgillmConfig
from model_card_agillm import architecture_rows, table


@dataclass
class Provenance:
    """Where the weights came from, as far as the converter knows."""

    model_type: str  # the source family: llama, mistral, qwen2, qwen3, agillm4
    description: str  # e.g. "local folder `x`" or "GGUF file `y`, dequantized to float by transformers"
    base_model: str | None = None  # a Hub repo id, written as `base_model` metadata
    name: str | None = None  # how the card names the source; default "a <model_type> model"
    license: str | None = None
    language: list[str] | None = None
    # How faithful the conversion is, completing "This folder holds ... converted to AGILLM: ...".
    fidelity: str = (
        "the weights are copied one to one into the AGILLM decoder, whose configuration reproduces the source's "
        "computation (logits match transformers' implementation of the source within fp32 rounding)"
    )
    command: str = "python -m convert SOURCE OUTPUT_DIR"
    source_details: list[tuple[str, str]] = field(default_factory=list)  # rows of a "Source checkpoint" table
    source_record: dict | None = None  # the source's own metadata, shown verbatim as JSON
    notes: list[str] = field(default_factory=list)  # caveats worth a line each (e.g. no tokenizer was found)


def _source_sections(provenance: Provenance) -> str:
    """The source checkpoint's own record (table of scalars, full JSON) and the caveats, when there are any."""
    sections = ""
    if provenance.source_details:
        sections += f"""
## Source checkpoint

| field | value |
|---|---|
{table(provenance.source_details)}
"""
    if provenance.source_record:
        record = json.dumps(provenance.source_record, indent=1, default=str)
        sections += f"""
<details><summary>Full metadata recorded in the source checkpoint</summary>

```json
{record}
```

</details>
"""
    if provenance.notes:
        sections += "\n## Notes\n\n" + "\n".join(f"- {note}" for note in provenance.notes) + "\n"
    return sections


def _usage(has_tokenizer: bool) -> str:
    if has_tokenizer:
        return """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder", trust_remote_code=True)
inputs = tokenizer("The capital of France is", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))
```"""
    return """This folder has no tokenizer (see the notes above); the model takes token ids:

```python
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)
print(model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=20))
```"""


def build_model_card(
    config: AgillmConfig,
    provenance: Provenance,
    dtype: torch.dtype,
    has_chat_template: bool,
    has_tokenizer: bool = True,
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
    what = provenance.name or f"a {provenance.model_type} model"
    if provenance.base_model:
        what = f"[`{provenance.base_model}`](https://huggingface.co/{provenance.base_model}), {what},"
    rows = table(architecture_rows(config, dtype))
    license_line = "That of the source model."
    if provenance.license:
        license_line = f"`{provenance.license}`, as the source model."
    body = f"""
# AGILLM conversion of {provenance.base_model or what}

This folder holds {what} converted to AGILLM: {provenance.fidelity}.

- Source: {provenance.description}.
- Converted with `convert/` of the AGILLM repository (`{provenance.command}`).
{_source_sections(provenance)}
## Architecture

| field | value |
|---|---|
{rows}

## Usage

The model code ships in this folder (`configuration_agillm.py`, `modeling_agillm.py`, `processing_agillm.py`),
so load it with `trust_remote_code=True`:

{_usage(has_tokenizer)}

## License

{license_line}
"""
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n{body}")


def write_model_card(folder: Path, *args, **kwargs) -> None:
    build_model_card(*args, **kwargs).save(Path(folder) / "README.md")
