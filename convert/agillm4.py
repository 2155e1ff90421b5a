"""`convert_agillm4`: a native AGILLM 4.x `.pt` checkpoint in, a complete AGILLM folder out.

The native format (FORMAT.md of the AGILLM 4.1 reference fixtures) is a possibly zstd-wrapped legacy `torch.save` of
`{"core": Encoder state, "ar"/"sat"/"nat": head states, "cfg": {...}, "tie_weights": bool, tokenizer_*, ...}`.

Steps: read the file with `weights_only=True` (`agillm4_container`) -> normalize the state dicts (strip
`_orig_mod.`, fuse legacy `mha.q/k/v`) -> check every key against the layouts this converter understands and every
shape against `cfg` -> derive the `AgillmConfig` from the shapes, cross-checked with `cfg` (never from environment
variables, as the trainer's own loader would) -> map the tensors (the per-layer low-rank metric `U` is folded into
the query projection) -> save model, tokenizer (when the checkpoint embeds a real one; `agillm4_metadata`),
generation config and model card into a staging folder that replaces the target only when complete.

Name mapping (d = width, H = heads, d_k = d / H):

| AGILLM                                             | native                                              |
|----------------------------------------------------|-----------------------------------------------------|
| model.embed_tokens.weight                          | core emb.weight                                     |
| model.layers.i.input_layernorm / post_attention_layernorm | core blocks.i.ln1 / ln2 (weight, bias)       |
| model.layers.i.self_attn.q_proj.weight             | qkv.weight rows [0, d), per head h: (U Uᵀ) · W_q,h  |
| model.layers.i.self_attn.k_proj / v_proj.weight    | qkv.weight rows [d, 2d) / [2d, 3d) (no v with tie_kv) |
| model.layers.i.self_attn.o_proj.weight             | blocks.i.mha.proj.weight                            |
| model.layers.i.mlp.up_proj / down_proj             | blocks.i.ff.0 / ff.2 (dense ReLU MLP with biases)   |
| model.layers.i.mlp.gate.weight                     | blocks.i.ff.router.weight (MoE)                     |
| model.layers.i.mlp.experts.{up,down}_proj[_bias]   | stacks of blocks.i.ff.experts.e.{0,2}.*             |
| model.layers.i.mlp.shared_expert.*                 | blocks.i.ff.shared.k.* joined into one wider MLP    |
| model.norm                                         | core ln                                             |
| lm_head / sat_head.proj / sat_head.gate / nat_head | ar proj / sat proj / sat gate / nat proj            |

Folding U is exact: the native scores are (Q_h U)(K_h U)ᵀ = Q_h (U Uᵀ) K_hᵀ on the low-rank path (r <= d_k) and
Q_h (U Uᵀ) K_hᵀ directly on the metric path (r > d_k); U Uᵀ is symmetric, so
Q_h (U Uᵀ) = x ((U Uᵀ) W_q,h)ᵀ.
"""

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from huggingface_hub.errors import StrictDataclassError
from transformers import GenerationConfig
from transformers.utils.logging import tqdm

from configuration_agillm import AgillmConfig
from modeling_agillm import AgillmForCausalLM
from processing_agillm import AgillmProcessor

from .agillm4_container import read_native_checkpoint
from .agillm4_metadata import native_provenance, restore_tokenizer
from .atomic import atomic_directory, check_output_dir
from .config_mapping import ConversionError
from .converter import _resolve_dtype, _verify_folder, ship_code_files
from .model_card import Provenance, write_model_card


logger = logging.getLogger(__name__)

HEAD_GROUPS = ("ar", "sat", "nat")
COMPILE_PREFIX = "_orig_mod."  # torch.compile wraps modules; their state-dict keys carry this component
DEFAULT_CONTEXT = 2048  # max_position_embeddings when the provenance records no block_size (ALiBi is not bound by it)
# AGILLM 4.x constants that no checkpoint records (FORMAT.md sections 6.2, 6.5, 6.6, 6.9; the trainer's losses).
NATIVE_NORM_EPS = 1e-5
NATIVE_SAT_BLOCK = 2
NATIVE_ATTENTION_OUTPUT_DROPOUT = 0.1
NATIVE_DENSE_MLP_MULT = 4
# The trainer's AR and SAT token losses use CrossEntropyLoss(label_smoothing=0.1), NAT none; continued training keeps it.
NATIVE_LABEL_SMOOTHING = {"ar": 0.1, "sat": 0.1, "nat": 0.0}

# Every key of the layouts this converter maps. A key outside them is a feature AGILLM would silently drop.
LAYER_KEY = re.compile(
    r"blocks\.(?P<layer>\d+)\.(?P<name>ln[12]\.(?:weight|bias)|mha\.(?:U|qkv\.weight|proj\.weight)"
    r"|ff\.[02]\.(?:weight|bias)|ff\.router\.weight|ff\.(?:experts|shared)\.\d+\.[02]\.(?:weight|bias))"
)
GROUP_KEYS = {
    "core": re.compile(rf"emb\.weight|ln\.(?:weight|bias)|{LAYER_KEY.pattern}"),
    "ar": re.compile(r"proj\.(?:weight|bias)"),
    "sat": re.compile(r"proj\.(?:weight|bias)|gate\.(?:weight|bias)"),
    "nat": re.compile(r"proj\.(?:weight|bias)"),
}
# Native features AGILLM has no module for, recognised by key, to say what the checkpoint uses.
KNOWN_UNSUPPORTED = (
    (re.compile(r"(^|\.)anchor\."), "anchor memory (--anchor_memory)"),
    (re.compile(r"^dblock_loop_embed\."), "a DiffusionBlocks looped model (dblock_loop_embed)"),
    (re.compile(r"^proj\.\d+\."), "the MLP SAT head (sat_head_mlp)"),
    (re.compile(r"\.mha\.(?:qkv|proj)\.bias$"), "attention biases, which AGILLM 4.x never has"),
)


# --------------------------------------------------------------------------------------------------- reading


def load_agillm4_checkpoint(path) -> dict:
    """The checkpoint dict of a native AGILLM 4.x `.pt` file (zstd/zlib wrapper removed), read with weights_only."""
    return read_native_checkpoint(path)[0]


def _check_checkpoint_dict(checkpoint: Mapping) -> None:
    """Refuse the checkpoint kinds this converter cannot map faithfully, before looking at any tensor."""
    if checkpoint.get("delta") or ("weights" in checkpoint and "core" not in checkpoint):
        raise ConversionError(
            "This is a delta (weight-only) checkpoint: it has no `cfg`, and the trainer's own loader then assumes "
            "the `large` preset. Convert the full checkpoint it belongs to instead."
        )
    if not isinstance(checkpoint.get("cfg"), Mapping):
        raise ConversionError(
            "The checkpoint has no `cfg` dict (keys: "
            f"{', '.join(map(str, list(checkpoint)[:12]))}); the architecture cannot be known without guessing."
        )
    for group in ("core", "ar", "sat"):
        if not isinstance(checkpoint.get(group), Mapping):
            raise ConversionError(
                f"The checkpoint has no `{group}` state dict; it is not a full AGILLM 4.x checkpoint."
            )
    if checkpoint.get("sat_head_mlp"):
        raise ConversionError(
            "The checkpoint uses the MLP SAT head (`sat_head_mlp`), which AGILLM does not implement."
        )


def _fuse_legacy_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old checkpoints store `mha.q/k/v.weight` separately; the trainer concatenates them (q, k, v) along dim 0."""
    for key in [key for key in state if key.endswith(".mha.q.weight")]:
        prefix = key.removesuffix("q.weight")
        parts = [state.pop(f"{prefix}{name}.weight", None) for name in ("q", "k", "v")]
        if parts[1] is None:
            raise ConversionError(f"core[{key!r}] has no matching {prefix}k.weight to fuse into {prefix}qkv.weight.")
        if f"{prefix}qkv.weight" in state:
            raise ConversionError(f"core holds both {prefix}qkv.weight and the legacy {prefix}q/k/v.weight.")
        state[f"{prefix}qkv.weight"] = torch.cat([part for part in parts if part is not None], dim=0)
    return state


def _normalized_group(checkpoint: Mapping, group: str) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in checkpoint[group].items():
        name = str(key).replace(COMPILE_PREFIX, "")
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{group}[{key!r}] is a {type(value).__name__}, not a tensor.")
        if not value.is_floating_point():
            raise ConversionError(f"{group}[{key!r}] is {value.dtype}, not a float tensor.")
        state[name] = value
    return _fuse_legacy_qkv(state) if group == "core" else state


def _check_known_keys(group: str, state: Mapping[str, torch.Tensor]) -> None:
    for key in state:
        if GROUP_KEYS[group].fullmatch(key):
            continue
        feature = next((what for pattern, what in KNOWN_UNSUPPORTED if pattern.search(key)), None)
        uses = f": it belongs to {feature}" if feature else ""
        raise ConversionError(
            f"Unsupported AGILLM 4.x layout: {group}[{key!r}] (shape {list(state[key].shape)}) has no AGILLM "
            f"counterpart{uses}. Converting would silently drop it."
        )


# --------------------------------------------------------------------------------------------------- architecture


@dataclass
class NativeArchitecture:
    """What the state dicts and `cfg` together say about the model; everything `AgillmConfig` needs."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    rank: int
    tie_kv: bool
    tied_heads: bool
    has_nat: bool
    num_experts: int = 0
    top_k: int = 1
    expert_size: int = 0
    shared_sizes: list[int] = field(default_factory=list)  # per-layer list of shared expert widths (same each layer)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class ShapeChecker:
    """Checks one tensor after another against the shape the architecture implies, naming the key on failure."""

    def __init__(self, groups: Mapping[str, Mapping[str, torch.Tensor]]):
        self.groups = groups

    def get(self, group: str, key: str, shape: tuple[int, ...] | None = None, why: str = "") -> torch.Tensor:
        state = self.groups[group]
        if key not in state:
            raise ConversionError(f"{group}[{key!r}] is missing{why}.")
        tensor = state[key]
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ConversionError(
                f"Shape mismatch: {group}[{key!r}] is {list(tensor.shape)}, expected {list(shape)}{why}."
            )
        return tensor


def _cfg_int(cfg: Mapping, name: str) -> int:
    value = cfg.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConversionError(f"cfg[{name!r}] must be a positive integer, got {value!r}.")
    return value


def _layer_indices(core: Mapping[str, torch.Tensor]) -> list[int]:
    return sorted({int(match["layer"]) for key in core if (match := LAYER_KEY.fullmatch(key))})


def _indices(core: Mapping, prefix: str) -> list[int]:
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)\.")
    return sorted({int(match[1]) for key in core if (match := pattern.match(key))})


def _tied_heads(checkpoint: Mapping, groups: Mapping[str, Mapping[str, torch.Tensor]]) -> bool:
    """`tie_weights` from the checkpoint, checked against the head weights it implies (aliased or absent when tied)."""
    embedding = groups["core"]["emb.weight"]
    heads = [group for group in HEAD_GROUPS if group in groups]

    def shares_embedding(group: str) -> bool:
        weight = groups[group].get("proj.weight")
        return weight is None or (
            weight.shape == embedding.shape and weight.data_ptr() == embedding.data_ptr()
        ) or torch.equal(weight, embedding)

    flag = checkpoint.get("tie_weights")
    if flag is None:  # older files: the storage tells (torch.load re-aliases tensors saved as one)
        flag = shares_embedding("ar")
        logger.info("The checkpoint has no tie_weights key; inferred tie_weights=%s from the AR head weight.", flag)
    if not isinstance(flag, bool):
        raise ConversionError(f"tie_weights must be a bool, got {flag!r}.")
    for group in heads:
        if flag and not shares_embedding(group):
            raise ConversionError(
                f"tie_weights is True but {group}['proj.weight'] differs from core['emb.weight']; the file "
                "contradicts itself."
            )
        if not flag and "proj.weight" not in groups[group]:
            raise ConversionError(f"{group}['proj.weight'] is missing and tie_weights is False.")
        if flag and "proj.bias" in groups[group]:
            raise ConversionError(f"{group}['proj.bias'] is present but tied heads (tie_weights=True) have no bias.")
    return flag


def _moe_architecture(cfg: Mapping, core: Mapping[str, torch.Tensor], num_layers: int, d: int) -> dict:
    """Expert count, top-k and widths from the state dict, checked against `cfg` and across layers."""
    checker = ShapeChecker({"core": core})
    router = checker.get("core", "blocks.0.ff.router.weight")
    num_experts = router.shape[0]
    if cfg.get("moe_experts") is not None and cfg["moe_experts"] != num_experts:
        raise ConversionError(
            f"cfg says moe_experts={cfg['moe_experts']} but core['blocks.0.ff.router.weight'] is {list(router.shape)}."
        )
    if cfg.get("moe_top_k") is None:
        raise ConversionError("The checkpoint has MoE layers but cfg has no moe_top_k; refusing to guess it.")
    top_k = min(_cfg_int(cfg, "moe_top_k"), num_experts)  # the trainer caps it the same way
    expert_size = checker.get("core", "blocks.0.ff.experts.0.0.weight").shape[0]
    if cfg.get("moe_mlp_mult") and expert_size != cfg["moe_mlp_mult"] * d:
        raise ConversionError(
            f"Shape mismatch: core['blocks.0.ff.experts.0.0.weight'] has {expert_size} rows, cfg moe_mlp_mult="
            f"{cfg['moe_mlp_mult']} implies {cfg['moe_mlp_mult'] * d}."
        )
    shared_sizes = [
        checker.get("core", f"blocks.0.ff.shared.{k}.0.weight").shape[0] for k in _indices(core, "blocks.0.ff.shared.")
    ]
    # A checkpoint without the shared experts cfg announces loads them freshly initialised in the trainer, whose
    # zero output layer makes them a no-op: exactly "no shared expert". More than announced cannot be loaded.
    announced = cfg.get("moe_shared_experts")
    if announced is not None and len(shared_sizes) > announced:
        raise ConversionError(
            f"cfg says moe_shared_experts={announced} but core holds {len(shared_sizes)} (blocks.0.ff.shared.*)."
        )
    for layer in range(num_layers):
        prefix = f"blocks.{layer}.ff."
        checker.get("core", f"{prefix}router.weight", (num_experts, d))
        if _indices(core, f"{prefix}experts.") != list(range(num_experts)):
            raise ConversionError(
                f"core holds experts {_indices(core, f'{prefix}experts.')} in layer {layer}, but the router scores "
                f"{num_experts} ({prefix}router.weight is {[num_experts, d]})."
            )
        widths = [(f"{prefix}experts.{e}.", expert_size) for e in range(num_experts)]
        if _indices(core, f"{prefix}shared.") != list(range(len(shared_sizes))):
            raise ConversionError(f"Layer {layer} has shared experts {_indices(core, f'{prefix}shared.')}, "
                                  f"layer 0 has {list(range(len(shared_sizes)))}.")
        widths += [(f"{prefix}shared.{k}.", size) for k, size in enumerate(shared_sizes)]
        for expert_prefix, width in widths:
            for key, shape in _plain_mlp_shapes(expert_prefix, d, width).items():
                checker.get("core", key, shape, " (expert shapes must agree across experts and layers)")
    return {"num_experts": num_experts, "top_k": top_k, "expert_size": expert_size, "shared_sizes": shared_sizes}


def _plain_mlp_shapes(prefix: str, d: int, width: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of a native `Sequential(Linear(d, width), ReLU, Linear(width, d))`."""
    return {
        f"{prefix}0.weight": (width, d),
        f"{prefix}0.bias": (width,),
        f"{prefix}2.weight": (d, width),
        f"{prefix}2.bias": (d,),
    }


def _check_layer_shapes(checker: ShapeChecker, arch: NativeArchitecture, layer: int, is_moe: bool) -> None:
    d, d_k = arch.hidden_size, arch.head_dim
    prefix = f"blocks.{layer}."
    for norm in ("ln1", "ln2"):
        for kind in ("weight", "bias"):
            checker.get("core", f"{prefix}{norm}.{kind}", (d,))
    checker.get("core", f"{prefix}mha.U", (d_k, arch.rank), f" (U is [d_k, rank] with d_k = d/heads = {d_k})")
    projections = 2 if arch.tie_kv else 3
    checker.get("core", f"{prefix}mha.qkv.weight", (projections * d, d),
                f" ({'2d rows with tie_kv' if arch.tie_kv else '3d rows for q, k, v'}, d = {d})")
    checker.get("core", f"{prefix}mha.proj.weight", (d, d))
    if is_moe:
        return  # checked with the MoE architecture
    for key, shape in _plain_mlp_shapes(f"{prefix}ff.", d, NATIVE_DENSE_MLP_MULT * d).items():
        checker.get("core", key, shape, f" (the dense FFN is {NATIVE_DENSE_MLP_MULT}d wide)")


def _check_head_shapes(checker: ShapeChecker, arch: NativeArchitecture) -> None:
    shape = (arch.vocab_size, arch.hidden_size)
    for group in [group for group in HEAD_GROUPS if group in checker.groups]:
        if not arch.tied_heads:
            checker.get(group, "proj.weight", shape)
            if group == "ar":  # the trainer loads the AR head strictly; SAT/NAT biases it zero-fills (see below)
                checker.get(group, "proj.bias", shape[:1])
        if "proj.bias" in checker.groups[group]:
            checker.get(group, "proj.bias", shape[:1])
    checker.get("sat", "gate.weight", (2, arch.hidden_size), " (the SAT stride gate has 2 classes)")
    if "gate.bias" in checker.groups["sat"]:
        checker.get("sat", "gate.bias", (2,))


def native_architecture(checkpoint: Mapping, groups: Mapping[str, Mapping[str, torch.Tensor]]) -> NativeArchitecture:
    """Read the architecture from the tensors and check it against `cfg`, every tensor's shape included."""
    cfg, core = checkpoint["cfg"], groups["core"]
    checker = ShapeChecker(groups)
    embedding = checker.get("core", "emb.weight")
    if embedding.dim() != 2:
        raise ConversionError(f"core['emb.weight'] must be 2-D [vocab, d], got {list(embedding.shape)}.")
    d, num_layers, num_heads = _cfg_int(cfg, "d"), _cfg_int(cfg, "layers"), _cfg_int(cfg, "heads")
    if embedding.shape[1] != d:
        raise ConversionError(f"Shape mismatch: cfg says d={d} but core['emb.weight'] is {list(embedding.shape)}.")
    if d % num_heads:
        raise ConversionError(f"cfg heads={num_heads} does not divide d={d}.")
    if _layer_indices(core) != list(range(num_layers)):
        raise ConversionError(
            f"cfg says layers={num_layers} but core holds blocks {_layer_indices(core)}."
        )
    if cfg.get("nat_head") is False and "nat" in groups:
        raise ConversionError("cfg says nat_head=False but the checkpoint holds a `nat` head.")

    moe_layers = [layer for layer in range(num_layers) if f"blocks.{layer}.ff.router.weight" in core]
    is_moe = bool(moe_layers)
    if moe_layers and len(moe_layers) != num_layers:
        raise ConversionError(f"Only layers {moe_layers} of {num_layers} are MoE; AGILLM 4.x builds all or none.")
    if cfg.get("moe_ffn") is not None and bool(cfg["moe_ffn"]) != is_moe:
        found = "core['blocks.0.ff.router.weight']" if is_moe else "core['blocks.0.ff.0.weight'] (a dense FFN)"
        raise ConversionError(
            f"cfg says moe_ffn={cfg['moe_ffn']} but the state dict has {found}. (The trainer would copy a dense FFN "
            "into every expert behind a randomly initialised router, which no converter can reproduce.)"
        )
    qkv_rows = checker.get("core", "blocks.0.mha.qkv.weight").shape[0]
    tie_kv = bool(cfg.get("tie_kv", False))
    if qkv_rows not in (2 * d, 3 * d) or (qkv_rows == 2 * d) != tie_kv:
        raise ConversionError(
            f"Shape mismatch: core['blocks.0.mha.qkv.weight'] has {qkv_rows} rows; with d={d} and "
            f"tie_kv={tie_kv} it must have {(2 if tie_kv else 3) * d}."
        )
    rank = checker.get("core", "blocks.0.mha.U").shape[-1]
    if rank != _cfg_int(cfg, "rank"):
        raise ConversionError(
            f"Shape mismatch: cfg says rank={cfg['rank']} but core['blocks.0.mha.U'] is "
            f"{list(core['blocks.0.mha.U'].shape)}."
        )
    arch = NativeArchitecture(
        vocab_size=embedding.shape[0], hidden_size=d, num_layers=num_layers, num_heads=num_heads, rank=rank,
        tie_kv=tie_kv, tied_heads=_tied_heads(checkpoint, groups), has_nat="nat" in groups,
    )
    if is_moe:
        for name, value in _moe_architecture(cfg, core, num_layers, d).items():
            setattr(arch, name, value)
    for layer in range(num_layers):
        _check_layer_shapes(checker, arch, layer, is_moe)
    checker.get("core", "ln.weight", (d,))
    checker.get("core", "ln.bias", (d,))
    _check_head_shapes(checker, arch)
    return arch


def _special_ids(checkpoint: Mapping) -> tuple[int | None, int | None]:
    special = checkpoint.get("tokenizer_special") or {}
    pad, eos = special.get("pad_token_id"), special.get("eos_token_id")
    return (pad if isinstance(pad, int) else None), (eos if isinstance(eos, int) else None)


def _context_length(checkpoint: Mapping) -> int:
    block_size = (checkpoint.get("agillm43_provenance") or {}).get("block_size")
    return block_size if isinstance(block_size, int) and block_size > 0 else DEFAULT_CONTEXT


def agillm4_config(checkpoint: Mapping, arch: NativeArchitecture) -> AgillmConfig:
    """The `AgillmConfig` computing what the native model computes (FORMAT.md section 6)."""
    pad_id, eos_id = _special_ids(checkpoint)
    if arch.has_nat and pad_id is None:
        raise ConversionError("The checkpoint has a NAT head but no tokenizer_special pad_token_id, its mask id.")
    moe = {}
    if arch.num_experts:
        moe = {
            "num_experts": arch.num_experts,
            "num_experts_per_tok": arch.top_k,
            "moe_intermediate_size": arch.expert_size,
            # top-1 uses the chosen expert's output unscaled; top-k>1 is a softmax over the k best logits, which
            # equals the full softmax's top-k renormalised.
            "router_type": "top1_straight_through" if arch.top_k == 1 else "softmax_topk",
            "norm_topk_prob": True,
            "shared_expert_intermediate_size": sum(arch.shared_sizes),
        }
    try:
        return AgillmConfig(
            vocab_size=arch.vocab_size,
            hidden_size=arch.hidden_size,
            intermediate_size=NATIVE_DENSE_MLP_MULT * arch.hidden_size,
            num_hidden_layers=arch.num_layers,
            num_attention_heads=arch.num_heads,
            num_key_value_heads=arch.num_heads,
            head_dim=arch.head_dim,
            max_position_embeddings=_context_length(checkpoint),
            position_embedding_type="agillm_alibi",
            layer_types=["full_attention"] * arch.num_layers,
            attention_bias=False,
            attention_output_bias=False,
            tie_kv=arch.tie_kv,
            hidden_dropout=NATIVE_ATTENTION_OUTPUT_DROPOUT,
            mlp_type="plain",
            hidden_act="relu",
            mlp_bias=True,
            **moe,
            norm_type="layer_norm",
            rms_norm_eps=NATIVE_NORM_EPS,
            heads=["ar", "sat", "nat"] if arch.has_nat else ["ar", "sat"],
            head_bias=not arch.tied_heads,
            tie_word_embeddings=arch.tied_heads,
            sat_block_size=NATIVE_SAT_BLOCK,
            sat_gate_loss=False,
            nat_mask_token_id=pad_id if pad_id is not None else 0,
            nat_block_size=None,
            label_smoothing=NATIVE_LABEL_SMOOTHING,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            bos_token_id=None,
        )
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ConversionError(f"This AGILLM 4.x checkpoint cannot be expressed as an AgillmConfig: {error}") from error


# --------------------------------------------------------------------------------------------------- tensors


def _fold_metric_into_query(query: torch.Tensor, metric: torch.Tensor, num_heads: int) -> torch.Tensor:
    """W_q,h <- (U Uᵀ) W_q,h for every head h; in float64 so the fold adds no rounding of its own."""
    d_k = metric.shape[0]
    gram = metric.double() @ metric.double().T  # [d_k, d_k], symmetric
    per_head = query.double().reshape(num_heads, d_k, -1)
    return torch.einsum("ij,hjc->hic", gram, per_head).reshape(query.shape).to(query.dtype)


def _plain_mlp(core, prefix: str) -> tuple[torch.Tensor, ...]:
    return tuple(core[f"{prefix}{index}.{kind}"] for index in (0, 2) for kind in ("weight", "bias"))


def _layer_tensors(core: Mapping[str, torch.Tensor], arch: NativeArchitecture, layer: int) -> dict[str, torch.Tensor]:
    native, ours = f"blocks.{layer}.", f"model.layers.{layer}."
    d = arch.hidden_size
    qkv = core[f"{native}mha.qkv.weight"]
    tensors = {
        f"{ours}input_layernorm.weight": core[f"{native}ln1.weight"],
        f"{ours}input_layernorm.bias": core[f"{native}ln1.bias"],
        f"{ours}post_attention_layernorm.weight": core[f"{native}ln2.weight"],
        f"{ours}post_attention_layernorm.bias": core[f"{native}ln2.bias"],
        f"{ours}self_attn.q_proj.weight": _fold_metric_into_query(qkv[:d], core[f"{native}mha.U"], arch.num_heads),
        f"{ours}self_attn.k_proj.weight": qkv[d : 2 * d],
        f"{ours}self_attn.o_proj.weight": core[f"{native}mha.proj.weight"],
    }
    if not arch.tie_kv:
        tensors[f"{ours}self_attn.v_proj.weight"] = qkv[2 * d :]
    if not arch.num_experts:
        up, up_bias, down, down_bias = _plain_mlp(core, f"{native}ff.")
        tensors |= {f"{ours}mlp.up_proj.weight": up, f"{ours}mlp.up_proj.bias": up_bias,
                    f"{ours}mlp.down_proj.weight": down, f"{ours}mlp.down_proj.bias": down_bias}
        return tensors
    experts = [_plain_mlp(core, f"{native}ff.experts.{e}.") for e in range(arch.num_experts)]
    tensors[f"{ours}mlp.gate.weight"] = core[f"{native}ff.router.weight"]
    for index, name in enumerate(("up_proj", "up_proj_bias", "down_proj", "down_proj_bias")):
        tensors[f"{ours}mlp.experts.{name}"] = torch.stack([expert[index] for expert in experts])
    if arch.shared_sizes:
        # Shared experts are all added unweighted: k ReLU MLPs side by side are one MLP of the summed width.
        shared = [_plain_mlp(core, f"{native}ff.shared.{k}.") for k in range(len(arch.shared_sizes))]
        tensors[f"{ours}mlp.shared_expert.up_proj.weight"] = torch.cat([s[0] for s in shared], dim=0)
        tensors[f"{ours}mlp.shared_expert.up_proj.bias"] = torch.cat([s[1] for s in shared], dim=0)
        tensors[f"{ours}mlp.shared_expert.down_proj.weight"] = torch.cat([s[2] for s in shared], dim=1)
        tensors[f"{ours}mlp.shared_expert.down_proj.bias"] = torch.stack([s[3] for s in shared]).sum(dim=0)
    return tensors


def _head_tensors(groups, arch: NativeArchitecture) -> dict[str, torch.Tensor]:
    """Head projections (untied only: tied ones are the embedding) and the SAT gate; missing SAT/NAT biases are
    zero-filled, as the trainer's inference loader does."""
    vocab = arch.vocab_size
    tensors = {
        "sat_head.gate.weight": groups["sat"]["gate.weight"],
        "sat_head.gate.bias": groups["sat"].get("gate.bias", torch.zeros(2, dtype=groups["sat"]["gate.weight"].dtype)),
    }
    if arch.tied_heads:
        return tensors
    names = {"ar": "lm_head", "sat": "sat_head.proj", "nat": "nat_head"}
    for group in [group for group in HEAD_GROUPS if group in groups]:
        weight = groups[group]["proj.weight"]
        tensors[f"{names[group]}.weight"] = weight
        tensors[f"{names[group]}.bias"] = groups[group].get("proj.bias", torch.zeros(vocab, dtype=weight.dtype))
        if "proj.bias" not in groups[group]:
            logger.info("%s['proj.bias'] is missing; zero-filled as the AGILLM 4.x inference loader does.", group)
    return tensors


def agillm4_tensors(groups, arch: NativeArchitecture) -> dict[str, torch.Tensor]:
    """Every AGILLM parameter (by name) from the native state dicts."""
    core = groups["core"]
    tensors = {"model.embed_tokens.weight": core["emb.weight"]}
    for layer in range(arch.num_layers):
        tensors |= _layer_tensors(core, arch, layer)
    tensors |= {"model.norm.weight": core["ln.weight"], "model.norm.bias": core["ln.bias"]}
    return tensors | _head_tensors(groups, arch)


def _tied_parameter_names(model: AgillmForCausalLM) -> set[str]:
    """Head projections that are the embedding itself (tied heads): not loaded, not saved."""
    return set(model.get_expanded_tied_weights_keys())  # empty unless config.tie_word_embeddings


def _load_weights(model: AgillmForCausalLM, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    tied = _tied_parameter_names(model)
    expected = {name: tensor.shape for name, tensor in model.state_dict().items() if name not in tied}
    if set(expected) != set(tensors):  # the mapping and the model disagree: a converter bug, not a bad checkpoint
        raise RuntimeError(f"AGILLM 4.x mapping does not match the model's parameters: "
                           f"{sorted(set(expected) ^ set(tensors))[:8]}")
    weights = {}
    for name in tqdm(sorted(tensors), desc="Converting AGILLM 4.x tensors", unit="tensor"):
        if tuple(tensors[name].shape) != tuple(expected[name]):
            raise RuntimeError(f"{name}: mapped {list(tensors[name].shape)}, the model has {list(expected[name])}.")
        weights[name] = tensors[name].detach().to(dtype=dtype).clone().contiguous()
    model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()  # `assign` replaced the embedding; point the tied heads at the new one
    unfilled = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if unfilled:
        raise RuntimeError(f"Conversion left parameters unfilled: {unfilled}")


GENERATION_NOTE = (
    "generation_config.json asks for greedy AR decoding with the checkpoint's eos/pad ids and no penalties, which "
    "reproduces the native `infer --mode ar --greedy` with penalties off. The native AR defaults are sampling at "
    "temperature 0.7, top-p 0.9, with repetition (1.3) and frequency (0.3) penalties over the last 128 ids; "
    "`generate(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.3)` comes close (transformers has no "
    "frequency penalty)."
)


def agillm4_generation_config(checkpoint: Mapping) -> GenerationConfig:
    """Greedy AR decoding with the checkpoint's eos/pad ids (the native CLI's penalties are not HF defaults)."""
    pad_id, eos_id = _special_ids(checkpoint)
    return GenerationConfig(do_sample=False, bos_token_id=None, eos_token_id=eos_id,
                            pad_token_id=pad_id if pad_id is not None else eos_id)


def agillm4_to_agillm(checkpoint: Mapping, dtype=None) -> AgillmForCausalLM:
    """An `AgillmForCausalLM` (eval mode) computing what the native AGILLM 4.x checkpoint dict computes.

    Args:
        checkpoint: the checkpoint dict, as `load_agillm4_checkpoint` returns it.
        dtype: weight dtype (`torch.bfloat16`, `"float32"`, ...); default: the checkpoint's embedding dtype.

    Raises:
        ConversionError: a delta checkpoint, no `cfg`, an unknown key, or a shape that contradicts `cfg`.
    """
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"Expected an AGILLM 4.x checkpoint dict, got {type(checkpoint).__name__}.")
    _check_checkpoint_dict(checkpoint)
    groups = {group: _normalized_group(checkpoint, group) for group in ("core", *HEAD_GROUPS) if group in checkpoint}
    for group, state in groups.items():
        _check_known_keys(group, state)
    arch = native_architecture(checkpoint, groups)
    config = agillm4_config(checkpoint, arch)
    dtype = _resolve_dtype(dtype, groups["core"]["emb.weight"].dtype)
    tensors = agillm4_tensors(groups, arch)
    with init_empty_weights(include_buffers=False):  # parameters on "meta"; buffers (ALiBi slopes) are real
        model = AgillmForCausalLM(config)
    _load_weights(model, tensors, dtype)
    model.config.dtype = dtype
    model.generation_config = agillm4_generation_config(checkpoint)
    return model.eval()


# --------------------------------------------------------------------------------------------------- saving


def _save_folder(model, tokenizer, provenance: Provenance, output_dir: Path, overwrite: bool) -> None:
    weight_names = set(model.state_dict()) - _tied_parameter_names(model)
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        # config.json (with the full auto_map), safetensors, generation_config.json and the code files.
        model.save_pretrained(staging)
        if tokenizer is not None:
            AgillmProcessor(tokenizer=tokenizer).save_pretrained(staging)
        ship_code_files(staging)  # the processor's code is shipped even without a tokenizer
        write_model_card(staging, model.config, provenance, model.dtype,
                         has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
                         has_tokenizer=tokenizer is not None)
        _verify_folder(staging, weight_names)


def convert_agillm4(checkpoint_path, output_dir, *, dtype=None, overwrite: bool = False) -> Path:
    """Convert a native AGILLM 4.x `.pt` checkpoint into an AGILLM folder (remote code, safetensors).

    Args:
        checkpoint_path: the `.pt` file (zstd-wrapped or plain); read with `weights_only=True`.
        output_dir: the folder to create. It appears complete or not at all.
        dtype: weight dtype of the output; default: the checkpoint's.
        overwrite: replace an existing `output_dir` (only once the new folder is complete).

    Returns:
        The absolute path of the converted folder.

    Raises:
        ConversionError: an unreadable, delta, inconsistent or unsupported checkpoint (nothing is written).
        FileExistsError: `output_dir` exists and `overwrite` is False.
    """
    output_dir = Path(output_dir).absolute()
    check_output_dir(output_dir, overwrite)
    checkpoint, container = read_native_checkpoint(checkpoint_path)
    model = agillm4_to_agillm(checkpoint, dtype=dtype)
    tokenizer, tokenizer_note = restore_tokenizer(checkpoint, model.config.vocab_size)
    if tokenizer is None:
        logger.warning(tokenizer_note)
    notes = [tokenizer_note, GENERATION_NOTE]
    if model.config.tie_word_embeddings:
        heads = ", ".join(head.upper() for head in model.config.heads)
        notes.append(f"The {heads} output projections are the embedding matrix (tied), as in the native checkpoint.")
    _save_folder(model, tokenizer, native_provenance(checkpoint, container, notes), output_dir, overwrite)
    return output_dir
