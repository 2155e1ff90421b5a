"""`attn_implementation="agillm"`: AGILLM's attention, registered with transformers' attention and mask interfaces.

    import kernels
    kernels.enable()
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="agillm")

What runs:
- CUDA tensors, or `TRITON_INTERPRET=1` in the environment (CPU, for tests): the Triton flash-attention kernel of
  `kernels/triton_attention.py` (forward and backward, GQA without copying K/V, any boolean mask with skipping of
  tiles nobody may see, ALiBi computed in the kernel).
- CPU otherwise, the faster of PyTorch's two fused attentions for the case (measured: bench/attention_kernels.md):
  * inference prefill of at least `FLEX_MIN_LENGTH` tokens: compiled `flex_attention`, whose block mask comes from
    the same tile table the Triton kernel uses (hidden blocks skipped: the causal triangle, outside a sliding
    window) and which adds ALiBi per score (`score_mod`) instead of reading a dense bias;
  * everything else (training: PyTorch has no flex backward on CPU; short inputs; decoding; dropout):
    `scaled_dot_product_attention` with grouped K/V heads passed as they are (`enable_gqa`, where transformers'
    stock `sdpa` path copies them with `repeat_kv` whenever a mask is present) and ALiBi folded into the mask once
    per forward and mask, as the model does for the stock backends.

Masks come from transformers' `sdpa_mask` (registered under the same name): a boolean `[B, 1, Q, K]` "may attend"
mask, or None when sdpa's `is_causal` is enough. The function also accepts additive float masks (e.g. ALiBi folded
in by the model) and, because it declares `computes_alibi`, AGILLM models hand it ALiBi as `alibi_slopes`,
`alibi_query_positions`, `alibi_key_positions` and `alibi_kind` instead of a dense bias.
"""

import os

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    add_offsets_to_mask_function,
    and_masks,
    causal_mask_function,
    padding_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)
from transformers.utils import logging


logger = logging.get_logger(__name__)


ATTN_IMPLEMENTATION = "agillm"


# ------------------------------------------------------------------------------------------------ ALiBi


def alibi_bias(slopes, query_positions, key_positions, kind: str) -> torch.Tensor:
    """`[B, H, Q, K]` fp32 bias: `alibi` -> `-m_h |j - i|`, `agillm_alibi` -> `-m_h max(j - i, 0)` (the model's)."""
    distance = key_positions[:, None, None, :] - query_positions[:, None, :, None]
    distance = distance.abs() if kind == "alibi" else distance.clamp(min=0)
    return -slopes.to(distance.device, torch.float32)[None, :, None, None] * distance.to(torch.float32)


def _per_forward_cache(owner: torch.Tensor, key: tuple, build):
    """Memoise `build()` on `owner`, a tensor the model creates once per forward and hands to every layer."""
    cache = owner.__dict__.setdefault("_agillm_attention_cache", {})
    if key not in cache:
        cache.clear()  # one entry per owner is all a forward needs; never keep stale tensors alive
        cache[key] = build()
    return cache[key]


def _folded_alibi_mask(mask, slopes, query_positions, key_positions, kind: str, dtype) -> torch.Tensor:
    """The additive mask sdpa needs for ALiBi: the bias where `mask` ("causal", bool, float or None) allows, the
    dtype's minimum elsewhere. Built once per forward and mask (the layers share both), as the stock path does."""

    def build():
        bias = alibi_bias(slopes, query_positions, key_positions, kind).to(dtype)
        allowed = _causal_mask(*bias.shape[-2:], bias.device) if isinstance(mask, str) else mask
        if allowed is None:
            return bias
        if allowed.dtype == torch.bool:
            return bias.masked_fill(~allowed, torch.finfo(dtype).min)
        return bias + allowed

    mask_key = mask if mask is None or isinstance(mask, str) else (id(mask), mask._version)
    return _per_forward_cache(slopes, ("folded", mask_key, dtype, kind, key_positions.shape[-1]), build)


# ------------------------------------------------------------------------------------------------ tiles


def tile_kinds(mask: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """Summarise a boolean mask `[B, H, Q, K]` per `[block_m, block_n]` tile: 0 empty, 1 partial, 2 full (int8).

    Padding past the edges counts as "not visible", so edge tiles are at most partial (kernels bounds-check them).
    """
    batch, heads, q_len, kv_len = mask.shape
    tiles_m, tiles_n = -(-q_len // block_m), -(-kv_len // block_n)
    padded = torch.zeros(batch, heads, tiles_m * block_m, tiles_n * block_n, dtype=torch.bool, device=mask.device)
    padded[..., :q_len, :kv_len] = mask
    padded = padded.view(batch, heads, tiles_m, block_m, tiles_n, block_n)
    any_visible = padded.any(dim=5).any(dim=3)
    all_visible = padded.all(dim=5).all(dim=3)
    return (any_visible.to(torch.int8) + all_visible.to(torch.int8)).contiguous()


def cached_tile_kinds(mask: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """`tile_kinds`, computed once per mask tensor: every layer of one type receives the same mask object."""
    key = ("tiles", block_m, block_n, mask._version)
    return _per_forward_cache(mask, key, lambda: tile_kinds(mask, block_m, block_n))


# ------------------------------------------------------------------------------------------------ CPU path

# Prefill without gradients from this many queries and keys on: compiled flex attention, which skips the blocks a
# mask hides (sliding windows, the causal upper triangle) and adds ALiBi per score. Below it, or with gradients
# (PyTorch has no flex backward on CPU), PyTorch's fused sdpa. See bench/attention_kernels.md for the crossover.
FLEX_MIN_LENGTH = 256
FLEX_BLOCK_SIZE = 128
# Flex is compiled for static shapes (torch 2.13's inductor miscompiles the dynamic-shape recompile of CPU flex:
# "cur_kvSplitSize5 was not declared"), so every new prefill shape compiles once (seconds). After this many
# distinct shapes, new ones stay on sdpa instead of compiling again.
FLEX_MAX_COMPILED_SHAPES = 8
_flex_shapes: set = set()


def _causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """sdpa's `is_causal` pattern (upper-left aligned): key j visible to query i iff j <= i."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()[None, None]


def sdpa_attention(query, key, value, mask, scale, dropout=0.0, alibi=None) -> torch.Tensor:
    """PyTorch's fused attention `[B, Q, H, Dv]`; `mask` as in `triton_attention` ("causal" / bool / float / None).

    K/V heads stay grouped (`enable_gqa`); ALiBi (`alibi = (slopes, query_positions, key_positions, kind)`) becomes
    an additive mask shared by the layers of one forward.
    """
    is_causal = isinstance(mask, str)
    if alibi is not None:
        mask, is_causal = _folded_alibi_mask(mask, *alibi, dtype=query.dtype), False
    elif is_causal:
        mask = None
    if query.shape[1] != key.shape[1] and not _gqa_supported(query, mask):
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous()


def _gqa_supported(query: torch.Tensor, mask) -> bool:
    """PyTorch's CPU kernels take grouped K/V heads with or without a mask; its CUDA ones need no mask."""
    return query.device.type == "cpu" or mask is None


def _index_mask_mod(mask: torch.Tensor):
    """The mask as index arithmetic, if `agillm_mask` built it: transformers' mask function with padding and offsets
    (what its own flex path uses), cheaper for flex to evaluate than reading the dense mask."""
    args = getattr(mask, "_agillm_mask_arguments", None)
    if args is None:
        return None
    mask_function = args["mask_function"]
    padding = prepare_padding_mask(args["attention_mask"], args["kv_length"], args["kv_offset"])
    if padding is not None:
        mask_function = and_masks(mask_function, padding_mask_function(padding))
    return add_offsets_to_mask_function(mask_function, args["q_offset"], args["kv_offset"])


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def _flex_block_mask(mask, q_len: int, kv_len: int, device):
    """A flex `BlockMask` from our mask: its tile table says which blocks to skip, compute whole, or mask with the
    pattern's index rule."""
    from torch.nn.attention.flex_attention import BlockMask

    causal = isinstance(mask, str)
    if causal:  # tiles of the sdpa-style causal pattern, cached per shape
        mask = _causal_masks(q_len, kv_len, str(device))

    def build():
        kinds = tile_kinds(mask, FLEX_BLOCK_SIZE, FLEX_BLOCK_SIZE)
        partial, full = kinds == 1, kinds == 2
        mask_mod = _causal_mask_mod if causal else _index_mask_mod(mask)

        def blocks(which):  # how many, then their indices first (stable order)
            order = torch.argsort((~which).to(torch.int8), dim=-1, stable=True).to(torch.int32)
            return which.sum(-1).to(torch.int32), order

        return BlockMask.from_kv_blocks(
            *blocks(partial), *blocks(full), BLOCK_SIZE=FLEX_BLOCK_SIZE, mask_mod=mask_mod, seq_lengths=(q_len, kv_len)
        )

    return _per_forward_cache(mask, ("flex", mask._version), build)


_CAUSAL_MASKS: dict = {}


def _causal_masks(q_len: int, kv_len: int, device: str) -> torch.Tensor:
    key = (q_len, kv_len, device)
    if key not in _CAUSAL_MASKS:
        _CAUSAL_MASKS.clear()  # one shape at a time is what prefill needs
        _CAUSAL_MASKS[key] = _causal_mask(q_len, kv_len, device)
    return _CAUSAL_MASKS[key]


_compiled_flex_attention = None


def flex_attention(query, key, value, mask, scale, alibi=None) -> torch.Tensor:
    """Compiled flex attention `[B, Q, H, Dv]` (no gradients): boolean / "causal" masks, ALiBi as a `score_mod`."""
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention as eager_flex_attention

        _compiled_flex_attention = torch.compile(eager_flex_attention, dynamic=False)
    score_mod = None
    if alibi is not None:
        slopes, query_positions, key_positions, kind = alibi
        slopes = slopes.to(query.device, torch.float32)
        query_positions = query_positions.expand(query.shape[0], -1).to(torch.float32)
        key_positions = key_positions.expand(query.shape[0], -1).to(torch.float32)
        symmetric = kind == "alibi"

        def score_mod(score, b, h, q_idx, kv_idx):
            distance = key_positions[b, kv_idx] - query_positions[b, q_idx]
            distance = distance.abs() if symmetric else distance.clamp(min=0)
            return score - slopes[h] * distance

    block_mask = None if mask is None else _flex_block_mask(mask, query.shape[2], key.shape[2], query.device)
    out = _compiled_flex_attention(
        query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous()


def _flex_fits(query, key, value, mask) -> bool:
    """Where compiled flex beats sdpa on CPU: long inference prefill with no mask, the causal one, or a boolean mask
    `agillm_mask` built (whose index rule flex evaluates), in a shape already compiled or while there is room."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    boolean_mask = mask is None or isinstance(mask, str) or _index_mask_mod(mask) is not None
    fits = (
        not needs_grad
        and boolean_mask
        and min(query.shape[2], key.shape[2]) >= FLEX_MIN_LENGTH
        and query.shape[-1] == value.shape[-1]
        and query.dtype in (torch.float32, torch.bfloat16)
    )
    shape = (tuple(query.shape), tuple(key.shape), query.dtype)
    return fits and (shape in _flex_shapes or len(_flex_shapes) < FLEX_MAX_COMPILED_SHAPES)


_flex_failed = False


def torch_attention(query, key, value, mask, scale, dropout=0.0, alibi=None) -> torch.Tensor:
    """The CPU path: compiled flex attention where it is faster (`_flex_fits`), else fused sdpa.

    If compiling flex fails (e.g. no C++ compiler for inductor), say so once and stay on sdpa: same answer, slower.
    """
    global _flex_failed
    if dropout == 0.0 and query.device.type == "cpu" and not _flex_failed and _flex_fits(query, key, value, mask):
        try:
            out = flex_attention(query, key, value, mask, scale, alibi)
            _flex_shapes.add((tuple(query.shape), tuple(key.shape), query.dtype))
            return out
        except Exception as error:  # noqa: BLE001 -- any compile failure; the fallback computes the same thing
            _flex_failed = True
            logger.warning(f"attn_implementation='agillm': compiled flex attention failed ({error!r}); using sdpa.")
    return sdpa_attention(query, key, value, mask, scale, dropout, alibi)


# ------------------------------------------------------------------------------------------------ dispatch


def _triton_module():
    """`kernels.triton_attention`, imported on first use (triton reads TRITON_INTERPRET when the module loads)."""
    from . import triton_attention

    return triton_attention


def uses_triton(query: torch.Tensor) -> bool:
    """The Triton kernel on CUDA, and on CPU when the environment asks for triton's interpreter."""
    if query.is_cuda:
        return True
    return query.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def agillm_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    alibi_slopes: torch.Tensor | None = None,
    alibi_query_positions: torch.Tensor | None = None,
    alibi_key_positions: torch.Tensor | None = None,
    alibi_kind: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: q `[B, H, Q, D]`, k/v `[B, H_kv, K, D*]` -> (`[B, Q, H, Dv]`, None).

    `attention_mask` None means sdpa's rule: causal when `is_causal` (else the module's) and more than one query.
    `sliding_window` needs no handling: the registered mask function already wrote the window into the mask.
    """
    if kwargs.get("output_attentions"):
        raise ValueError("attn_implementation='agillm' does not return attention weights; use 'eager' for them.")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = attention_mask
    if mask is None and is_causal and query.shape[2] > 1:
        mask = "causal"
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    alibi = None
    if alibi_kind is not None:
        alibi = (alibi_slopes, alibi_query_positions, alibi_key_positions, alibi_kind)
    dropout = dropout if module.training else 0.0
    if dropout == 0.0 and uses_triton(query):
        out = _triton_module().triton_attention(
            query, key, value, mask, scale, alibi_slopes, alibi_query_positions, alibi_key_positions, alibi_kind
        )
    else:  # CPU, or attention dropout (the kernel has none): PyTorch's fused attention
        out = torch_attention(query, key, value, mask, scale, dropout, alibi)
    return out, None


# The model reads these (through ALL_ATTENTION_FUNCTIONS) to decide what to hand over.
agillm_attention_forward.computes_alibi = True  # give me slopes + positions, not a dense bias in the mask
agillm_attention_forward.supports_block_masks = True  # any boolean pattern: SAT/NAT blocks, bidirectional, media


def agillm_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                attention_mask=None, use_vmap=False, **kwargs):
    """transformers' `sdpa_mask` (boolean `[B, 1, Q, K]`, or None where `is_causal` suffices), remembering how it was
    built so that the flex route can evaluate the pattern by index arithmetic instead of reading it."""
    arguments = dict(q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     mask_function=mask_function, attention_mask=attention_mask, use_vmap=use_vmap)
    mask = sdpa_mask(batch_size, **arguments, **kwargs)
    if mask is not None and not use_vmap:  # patterns built with vmap may not be index arithmetic
        mask._agillm_mask_arguments = arguments
    return mask


def register() -> None:
    """Make `attn_implementation="agillm"` selectable (function and its mask builder, see the module docstring)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, agillm_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, agillm_mask)


__all__ = [
    "ATTN_IMPLEMENTATION", "agillm_attention_forward", "register", "torch_attention", "sdpa_attention",
    "flex_attention", "alibi_bias", "tile_kinds",
]
