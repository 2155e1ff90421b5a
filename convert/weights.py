"""Source weights onto an AGILLM model: read checkpoint folders lazily and check every tensor on the way.

AGILLM's parameter names are those of Llama/Qwen3, so a source tensor goes to the AGILLM parameter of the same
name. The work is in the checks: every AGILLM parameter must be filled, every source tensor must be used (a tensor
with no AGILLM home, e.g. an o_proj bias the config does not announce, means the source computes something AGILLM
would silently drop), and shapes must agree.

MoE experts are AGILLM 3-D parameters, `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows, then up rows) and
`mlp.experts.down_proj` [E, H, I], with the router at `mlp.gate.weight` [E, H]: the layout of transformers 5.x's
Mixtral and Qwen3-MoE modules, so a live model's `state_dict` maps by name. Checkpoint files (the Hub's, and what
transformers' own `save_pretrained` writes back) store one 2-D `[out, in]` matrix per expert instead; those are
stacked here, without transposing:

| family    | per-expert source names                                   | router                         |
|-----------|-----------------------------------------------------------|--------------------------------|
| mixtral   | `block_sparse_moe.experts.N.{w1 (gate), w3 (up), w2 (down)}` | `block_sparse_moe.gate.weight` |
| qwen3_moe | `mlp.experts.N.{gate_proj, up_proj, down_proj}`            | `mlp.gate.weight`              |
"""

import re
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from transformers.utils.logging import tqdm

from .config_mapping import ConversionError
from .reading import read_json, safetensors_names, safetensors_tensor, shard_path, torch_load


# Rotary tables are recomputed from the config; old `.bin` checkpoints still carry them as buffers.
IGNORED_SOURCE_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
TIED_TARGET, TIED_SOURCE = "lm_head.weight", "model.embed_tokens.weight"
KEPT_IN_FP32 = ("e_score_correction_bias",)  # = AgillmModel._keep_in_fp32_modules_strict
# Mixtral checkpoints name the MoE block `block_sparse_moe`; transformers 5.x and AGILLM call it `mlp`.
MIXTRAL_MOE_BLOCK = re.compile(r"\.block_sparse_moe\.")
# One expert's matrix in a per-expert checkpoint, e.g. `model.layers.3.mlp.experts.7.w1.weight`.
PER_EXPERT_NAME = re.compile(r"^(?P<block>.+\.mlp)\.experts\.(?P<expert>\d+)\.(?P<projection>\w+)\.weight$")
# Each per-expert projection's role: Mixtral's w1/w3/w2 are Qwen3-MoE's gate_proj/up_proj/down_proj.
EXPERT_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
# AGILLM 3-D parameter <- the roles concatenated (along the output rows) for each expert, in order.
STACKED_EXPERT_PARAMETERS = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}


class CheckpointFolderTensors(Mapping):
    """Read-only `name -> tensor` view of a folder's weights (safetensors preferred, else `.bin`), loaded per access.

    Every file goes through `reading`, so a bad file stops the conversion with a `ConversionError` naming it. The
    index and every safetensors header are checked when the view is built, before any model is: a missing shard,
    a truncated or corrupt one, or an index listing a tensor its shard does not hold fails at once, not after
    minutes of conversion. `.bin` shards are read with `torch.load(weights_only=True)`, so no pickled code runs.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._bin_cache: tuple[Path, dict] | None = None  # (path, tensors) of the last `.bin` shard read
        self._file_of = self._index_weight_files()
        self._check_safetensors_shards()

    def _index_weight_files(self) -> dict[str, Path]:
        layouts = ((SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME), (WEIGHTS_INDEX_NAME, WEIGHTS_NAME))
        for index_name, single_name in layouts:
            if (self.folder / index_name).is_file():
                return self._read_index(self.folder / index_name)
            if (self.folder / single_name).is_file():
                return {name: self.folder / single_name for name in self._names_in(self.folder / single_name)}
        raise ConversionError(
            f"No weights in {self.folder}: expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, {WEIGHTS_NAME} "
            f"or {WEIGHTS_INDEX_NAME} (for a GGUF file pass gguf_file=...)."
        )

    def _read_index(self, index_path: Path) -> dict[str, Path]:
        weight_map = read_json(index_path, "weight index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"Cannot read weight index {index_path}: it has no `weight_map` of tensor names.")
        file_of = {name: shard_path(self.folder, file, index_path) for name, file in weight_map.items()}
        for path in sorted(set(file_of.values())):
            if not path.is_file():
                listed = [name for name, file in file_of.items() if file == path]
                raise ConversionError(
                    f"Shard {path} (listed in {index_path.name} for {_format_names(listed, limit=3)}) is missing."
                )
        return file_of

    def _check_safetensors_shards(self) -> None:
        # Opening a safetensors file reads only its header, which safetensors checks against the file's size.
        listed = defaultdict(set)
        for name, path in self._file_of.items():
            listed[path].add(name)
        for path, names in sorted(listed.items()):
            if path.suffix != ".safetensors":
                continue
            absent = sorted(names - set(safetensors_names(path)))
            if absent:
                raise ConversionError(
                    f"The weight index lists {_format_names(absent, limit=3)} in {path}, which does not hold them."
                )

    def _names_in(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            return safetensors_names(path)
        return list(self._load_bin(path))

    def _load_bin(self, path: Path) -> dict:
        if self._bin_cache is None or self._bin_cache[0] != path:  # shards are read in order: keep the last one
            tensors = torch_load(path)
            if not isinstance(tensors, dict):
                raise ConversionError(f"Cannot read torch checkpoint {path}: it holds a {type(tensors).__name__}, "
                                      "not a dict of tensors.")
            self._bin_cache = (path, tensors)
        return self._bin_cache[1]

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self._file_of[name]
        if path.suffix == ".safetensors":
            return safetensors_tensor(path, name)
        tensors = self._load_bin(path)
        if name not in tensors:
            raise ConversionError(f"The weight index lists {name} in {path}, which does not hold it.")
        return tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


@dataclass(frozen=True)
class StackedExperts:
    """An AGILLM 3-D expert parameter assembled from per-expert source matrices.

    `parts[e]` lists the source names of expert e, concatenated along their output rows (gate, then up); the
    experts are then stacked along a new first dimension.
    """

    parts: tuple[tuple[str, ...], ...]

    def load(self, source: Mapping[str, torch.Tensor], agillm_name: str) -> torch.Tensor:
        matrices = [[source[name] for name in names] for names in self.parts]
        # Gate, up and down matrices are each [out, in] with out = I for gate/up: one shape per parameter.
        shapes = {tuple(matrix.shape) for expert in matrices for matrix in expert}
        if len(shapes) != 1:
            raise ConversionError(
                f"The per-expert matrices of {agillm_name} differ in shape ({sorted(shapes)}); every expert (and "
                "its gate and up projection) must have the same size."
            )
        return torch.stack([torch.cat(expert, dim=0) for expert in matrices])


def _stack_per_expert_tensors(per_expert: dict[str, dict[str, dict[int, str]]]) -> dict[str, StackedExperts]:
    """`{block: {role: {expert: source name}}}` -> `{AGILLM 3-D parameter name: StackedExperts}`.

    Raises:
        ConversionError: a block lacks a role (e.g. no up projections) or some expert of a role.
    """
    stacked = {}
    for block, roles in per_expert.items():
        expected_roles = {role for role_group in STACKED_EXPERT_PARAMETERS.values() for role in role_group}
        num_experts = 1 + max(expert for experts in roles.values() for expert in experts)
        for role in sorted(expected_roles):
            missing = sorted(set(range(num_experts)) - set(roles.get(role, {})))
            if missing:
                raise ConversionError(
                    f"{block}.experts: the {role} projection of expert(s) {_format_names([str(m) for m in missing])} "
                    f"is missing from the source ({num_experts} experts found)."
                )
        for parameter, role_group in STACKED_EXPERT_PARAMETERS.items():
            parts = tuple(tuple(roles[role][expert] for role in role_group) for expert in range(num_experts))
            stacked[f"{block}.experts.{parameter}"] = StackedExperts(parts)
    return stacked


def _source_name_per_agillm_name(source_names) -> dict[str, "str | StackedExperts"]:
    """`{agillm name: source name, or the per-expert tensors to stack}`.

    A base-model checkpoint (no `model.` prefix, no head) gets the prefix added; per-expert matrices are grouped
    into AGILLM's 3-D expert parameters. A per-expert name with an unknown projection stays as it is, so the name
    check reports it as unused.
    """
    names = [name for name in source_names if not IGNORED_SOURCE_KEYS.search(name)]
    is_base_model = "embed_tokens.weight" in names and not any(name.startswith("model.") for name in names)
    mapping = {}
    per_expert = defaultdict(lambda: defaultdict(dict))  # block -> role -> expert index -> source name
    for name in names:
        agillm_name = MIXTRAL_MOE_BLOCK.sub(".mlp.", f"model.{name}" if is_base_model else name)
        match = PER_EXPERT_NAME.match(agillm_name)
        if match and match["projection"] in EXPERT_ROLE:
            per_expert[match["block"]][EXPERT_ROLE[match["projection"]]][int(match["expert"])] = name
        else:
            _add_source(mapping, agillm_name, name)
    for agillm_name, stacked in _stack_per_expert_tensors(per_expert).items():
        _add_source(mapping, agillm_name, stacked)
    return mapping


def _add_source(mapping: dict, agillm_name: str, source) -> None:
    # Two source layouts for one parameter (e.g. `mlp.gate` next to `block_sparse_moe.gate`, or 3-D experts next to
    # per-expert ones): keeping either would silently drop the other.
    if agillm_name in mapping:
        raise ConversionError(f"The source holds {agillm_name} twice, in two layouts; keep one of them.")
    mapping[agillm_name] = source


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
        source_name = source_name_of[name]
        if isinstance(source_name, StackedExperts):
            tensor = source_name.load(source, name)
        else:
            tensor = source[source_name]
        if tuple(tensor.shape) != tuple(expected[name]):
            raise ConversionError(
                f"Shape mismatch for {name}: the source has {tuple(tensor.shape)}, its config implies "
                f"{tuple(expected[name])}."
            )
        if not tensor.is_floating_point():
            raise ConversionError(f"{name} is {tensor.dtype}, not a float tensor (a quantized checkpoint?).")
        # DeepSeek-V3's balancing bias steers the expert choice by small margins: it stays fp32 in any dtype.
        tensor_dtype = torch.float32 if name.endswith(KEPT_IN_FP32) else dtype
        weights[name] = tensor.detach().to(dtype=tensor_dtype).contiguous()

    if tied_head_name is not None and not torch.equal(source[tied_head_name].to(dtype), weights[TIED_SOURCE]):
        raise ConversionError(
            "tie_word_embeddings is set, but the source's lm_head.weight differs from its embed_tokens.weight; "
            "fix the config (tie_word_embeddings=False) or the checkpoint."
        )
    return weights
