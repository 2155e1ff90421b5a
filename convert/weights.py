"""Source weights onto an AGILLM model: read checkpoint folders lazily and check every tensor on the way.

AGILLM's parameter names are those of Llama/Qwen3, so a source tensor goes to the AGILLM parameter of the same
name. The work is in the checks: every AGILLM parameter must be filled, every source tensor must be used (a tensor
with no AGILLM home, e.g. an o_proj bias the config does not announce, means the source computes something AGILLM
would silently drop), and shapes must agree.
"""

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from transformers.utils.logging import tqdm

from .config_mapping import ConversionError


# Rotary tables are recomputed from the config; old `.bin` checkpoints still carry them as buffers.
IGNORED_SOURCE_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
TIED_TARGET, TIED_SOURCE = "lm_head.weight", "model.embed_tokens.weight"


class CheckpointFolderTensors(Mapping):
    """Read-only `name -> tensor` view of a folder's weights (safetensors preferred, else `.bin`), loaded per access.

    `.bin` shards are read with `torch.load(weights_only=True, mmap=True)`, so no pickled code runs.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._bin_cache: tuple[Path, dict] | None = None  # (path, tensors) of the last `.bin` shard read
        self._file_of = self._index_weight_files()

    def _index_weight_files(self) -> dict[str, Path]:
        layouts = ((SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME), (WEIGHTS_INDEX_NAME, WEIGHTS_NAME))
        for index_name, single_name in layouts:
            if (self.folder / index_name).is_file():
                weight_map = json.loads((self.folder / index_name).read_text())["weight_map"]
                return {name: self.folder / file for name, file in weight_map.items()}
            if (self.folder / single_name).is_file():
                return {name: self.folder / single_name for name in self._names_in(self.folder / single_name)}
        raise ConversionError(
            f"No weights in {self.folder}: expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, {WEIGHTS_NAME} "
            f"or {WEIGHTS_INDEX_NAME} (for a GGUF file pass gguf_file=...)."
        )

    def _names_in(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as file:
                return list(file.keys())
        return list(self._load_bin(path))

    def _load_bin(self, path: Path) -> dict:
        if self._bin_cache is None or self._bin_cache[0] != path:  # shards are read in order: keep the last one
            try:
                tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the pre-zipfile format (torch < 1.6) cannot be memory-mapped
                tensors = torch.load(path, map_location="cpu", weights_only=True)
            self._bin_cache = (path, tensors)
        return self._bin_cache[1]

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self._file_of[name]
        if not path.is_file():
            raise ConversionError(f"{path.name} (listed for {name!r} in the weight index) is missing.")
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as file:
                return file.get_tensor(name)
        return self._load_bin(path)[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def _source_name_per_agillm_name(source_names) -> dict[str, str]:
    """`{agillm name: source name}`; a base-model checkpoint (no `model.` prefix, no head) gets the prefix added."""
    names = [name for name in source_names if not IGNORED_SOURCE_KEYS.search(name)]
    is_base_model = "embed_tokens.weight" in names and not any(name.startswith("model.") for name in names)
    return {(f"model.{name}" if is_base_model else name): name for name in names}


def _format_names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _check_names(expected: set[str], available: set[str]) -> None:
    missing = sorted(expected - available)
    unexpected = sorted(available - expected)
    problems = []
    if missing:
        problems.append(f"missing from the source: {_format_names(missing)}")
    if unexpected:
        problems.append(f"in the source but with no AGILLM parameter to hold them: {_format_names(unexpected)}")
    if problems:
        raise ConversionError(
            "The source weights do not match its config (" + "; ".join(problems) + "). Check the config flags "
            "(attention_bias, tie_word_embeddings, num_hidden_layers, ...) against the checkpoint."
        )


def collect_agillm_weights(
    source: Mapping[str, torch.Tensor], expected_shapes: dict[str, torch.Size], tied: bool, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The tensors for every AGILLM parameter in `expected_shapes`, taken from `source` and cast to `dtype`.

    With `tied`, `lm_head.weight` is left out (it is tied to the embedding afterwards); a source that still lists
    it (a live model's `state_dict` does) must hold the embedding there, or the source contradicts its own config.

    Raises:
        ConversionError: a missing or unused tensor, a shape mismatch, a non-float tensor, or a tied head that is
            not the embedding.
    """
    source_name_of = _source_name_per_agillm_name(source.keys())
    expected = dict(expected_shapes)
    tied_head_name = None
    if tied:
        expected.pop(TIED_TARGET, None)
        tied_head_name = source_name_of.pop(TIED_TARGET, None)
    _check_names(set(expected), set(source_name_of))

    weights = {}
    for name in tqdm(sorted(expected), desc="Converting weights", unit="tensor"):
        tensor = source[source_name_of[name]]
        if tuple(tensor.shape) != tuple(expected[name]):
            raise ConversionError(
                f"Shape mismatch for {name}: the source has {tuple(tensor.shape)}, its config implies "
                f"{tuple(expected[name])}."
            )
        if not tensor.is_floating_point():
            raise ConversionError(f"{name} is {tensor.dtype}, not a float tensor (a quantized checkpoint?).")
        weights[name] = tensor.detach().to(dtype=dtype).contiguous()

    if tied_head_name is not None and not torch.equal(source[tied_head_name].to(dtype), weights[TIED_SOURCE]):
        raise ConversionError(
            "tie_word_embeddings is set, but the source's lm_head.weight differs from its embed_tokens.weight; "
            "fix the config (tie_word_embeddings=False) or the checkpoint."
        )
    return weights
