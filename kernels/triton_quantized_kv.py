"""Triton kernel: attention of a few query rows over int8 / int4 codes, dequantized tile by tile in registers.

One program handles one (batch, key/value head) pair and one contiguous split of the quantized tokens
(flash-decoding: several splits keep a GPU busy when batch x heads is small). It loads `BLOCK_N` tokens of codes,
their scales and offsets, dequantizes them in registers (`code * scale + offset`, per group of channels), scores all
the query rows that share the head (GQA groups x query length), and folds the tile into an online softmax. Each
split writes its normalised output and log-sum-exp; `quantized_attention_triton` merges the splits. The memory read
per step is the codes, scales and offsets (plus the mask row), never a full-precision copy of the cache.

int4 codes hold channel `j` in the low nibble and channel `j + width / 2` in the high nibble (`kernels.quantized_kv`),
so the two halves of the width are processed as two parts with the same code (`PACK = 2`).

Tested on CPU under `TRITON_INTERPRET=1` against `kernels.quantized_kv`'s PyTorch reference
(`tests/test_quantized_kv.py`).
"""

import math

import torch
import triton
import triton.language as tl


MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2


@triton.jit
def _dequantized_part(codes_ptr, scale_ptr, offset_ptr, token_offsets, token_ok, part_offsets, part_ok,
                      stride_code_t, stride_scale_t, PART: tl.constexpr, PACK: tl.constexpr,
                      PART_WIDTH: tl.constexpr, GROUP: tl.constexpr):  # fmt: skip
    """fp32 `[BLOCK_N, BLOCK_P]` states of one part of the width (PACK=2: the low or the high nibbles)."""
    load_ok = token_ok[:, None] & part_ok[None, :]
    codes = tl.load(codes_ptr + token_offsets[:, None] * stride_code_t + part_offsets[None, :], mask=load_ok, other=0)
    if PACK == 2:
        codes = (codes >> (4 * PART)) & 15
    channels = PART * PART_WIDTH + part_offsets
    group_offsets = token_offsets[:, None] * stride_scale_t + (channels // GROUP)[None, :]
    scale = tl.load(scale_ptr + group_offsets, mask=load_ok, other=0.0)
    offset = tl.load(offset_ptr + group_offsets, mask=load_ok, other=0.0)
    return codes.to(tl.float32) * scale + offset


@triton.jit
def _matmul(a, b, USE_DOT: tl.constexpr):
    """`a [M, K] @ b [K, N]` in fp32: `tl.dot` (exact fp32, no tf32) when the shapes allow it, else a broadcast sum
    (widths below 16, e.g. the tiny test models)."""
    if USE_DOT:
        return tl.dot(a, b, input_precision="ieee")
    return tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _quantized_attention_kernel(
    query_ptr, key_codes_ptr, key_scale_ptr, key_offset_ptr, value_codes_ptr, value_scale_ptr, value_offset_ptr,
    mask_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kcb, stride_kch, stride_kct, stride_ksb, stride_ksh, stride_kst,
    stride_vcb, stride_vch, stride_vct, stride_vsb, stride_vsh, stride_vst,
    stride_mb, stride_mh, stride_mm,
    stride_os, stride_ob, stride_oh, stride_om,
    num_kv_heads, rows, q_len, kv_len, quantized_len, tokens_per_split, sliding_window,
    WIDTH: tl.constexpr, PACK: tl.constexpr, GROUP: tl.constexpr, MASK_KIND: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, USE_DOT: tl.constexpr,
):  # fmt: skip
    batch_head, split = tl.program_id(0), tl.program_id(1)
    batch, head = batch_head // num_kv_heads, batch_head % num_kv_heads
    PART_WIDTH: tl.constexpr = WIDTH // PACK

    row_offsets = tl.arange(0, BLOCK_M)
    row_ok = row_offsets < rows
    part_offsets = tl.arange(0, BLOCK_P)
    part_ok = part_offsets < PART_WIDTH
    query_rows = query_ptr + batch * stride_qb + head * stride_qh + row_offsets[:, None] * stride_qm
    query_ok = row_ok[:, None] & part_ok[None, :]
    query_low = tl.load(query_rows + part_offsets[None, :], mask=query_ok, other=0.0)
    if PACK == 2:
        query_high = tl.load(query_rows + PART_WIDTH + part_offsets[None, :], mask=query_ok, other=0.0)
    query_positions = kv_len - q_len + row_offsets % q_len  # rows repeat the queries once per head of the group

    key_codes = key_codes_ptr + batch * stride_kcb + head * stride_kch
    key_scale = key_scale_ptr + batch * stride_ksb + head * stride_ksh
    key_offset = key_offset_ptr + batch * stride_ksb + head * stride_ksh
    value_codes = value_codes_ptr + batch * stride_vcb + head * stride_vch
    value_scale = value_scale_ptr + batch * stride_vsb + head * stride_vsh
    value_offset = value_offset_ptr + batch * stride_vsb + head * stride_vsh

    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    normaliser = tl.zeros((BLOCK_M,), tl.float32)
    acc_low = tl.zeros((BLOCK_M, BLOCK_P), tl.float32)
    acc_high = tl.zeros((BLOCK_M, BLOCK_P), tl.float32)

    split_start = split * tokens_per_split
    split_end = tl.minimum(split_start + tokens_per_split, quantized_len)
    for start in range(split_start, split_end, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)
        token_ok = tokens < split_end

        keys = _dequantized_part(key_codes, key_scale, key_offset, tokens, token_ok, part_offsets, part_ok,
                                 stride_kct, stride_kst, 0, PACK, PART_WIDTH, GROUP)  # fmt: skip
        scores = _matmul(query_low, tl.trans(keys), USE_DOT)
        if PACK == 2:
            keys = _dequantized_part(key_codes, key_scale, key_offset, tokens, token_ok, part_offsets, part_ok,
                                     stride_kct, stride_kst, 1, PACK, PART_WIDTH, GROUP)  # fmt: skip
            scores += _matmul(query_high, tl.trans(keys), USE_DOT)

        allowed = row_ok[:, None] & token_ok[None, :]
        if MASK_KIND == 0:  # no mask: causal, aligned to the last key (sdpa's convention)
            allowed &= tokens[None, :] <= query_positions[:, None]
            if HAS_WINDOW:
                allowed &= tokens[None, :] > query_positions[:, None] - sliding_window
        else:
            mask_tile = mask_ptr + batch * stride_mb + head * stride_mh + row_offsets[:, None] * stride_mm
            mask_tile += tokens[None, :]
            if MASK_KIND == 1:
                allowed &= tl.load(mask_tile, mask=allowed, other=0) != 0
            else:
                scores += tl.load(mask_tile, mask=allowed, other=0.0)
        scores = tl.where(allowed, scores, float("-inf"))

        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probabilities = tl.exp(scores - safe_max[:, None])
        correction = tl.exp(running_max - safe_max)
        normaliser = normaliser * correction + tl.sum(probabilities, axis=1)
        running_max = new_max

        values = _dequantized_part(value_codes, value_scale, value_offset, tokens, token_ok, part_offsets, part_ok,
                                   stride_vct, stride_vst, 0, PACK, PART_WIDTH, GROUP)  # fmt: skip
        acc_low = acc_low * correction[:, None] + _matmul(probabilities, values, USE_DOT)
        if PACK == 2:
            values = _dequantized_part(value_codes, value_scale, value_offset, tokens, token_ok, part_offsets,
                                       part_ok, stride_vct, stride_vst, 1, PACK, PART_WIDTH, GROUP)  # fmt: skip
            acc_high = acc_high * correction[:, None] + _matmul(probabilities, values, USE_DOT)

    attended = normaliser > 0
    inverse = tl.where(attended, 1.0 / tl.where(attended, normaliser, 1.0), 0.0)
    lse = tl.where(attended, running_max + tl.log(tl.where(attended, normaliser, 1.0)), float("-inf"))
    out_rows = out_ptr + split * stride_os + batch * stride_ob + head * stride_oh + row_offsets[:, None] * stride_om
    tl.store(out_rows + part_offsets[None, :], acc_low * inverse[:, None], mask=query_ok)
    if PACK == 2:
        tl.store(out_rows + PART_WIDTH + part_offsets[None, :], acc_high * inverse[:, None], mask=query_ok)
    lse_offsets = ((split * tl.num_programs(0) + batch_head) * BLOCK_M) + row_offsets
    tl.store(lse_ptr + lse_offsets, lse, mask=row_ok)


def default_num_splits(batch_heads: int, quantized_len: int, block_n: int) -> int:
    """Splits of the tokens so that about 128 programs run (a GPU has ~100 SMs), each at least one tile."""
    return max(1, min(math.ceil(128 / batch_heads), math.ceil(quantized_len / block_n)))


def _mask_argument(mask: torch.Tensor | None, query_rows: torch.Tensor):
    """`(kind, tensor, strides)` for the kernel; a broadcast head dimension gets stride 0."""
    if mask is None:
        return MASK_NONE, query_rows, (0, 0, 0)
    if mask.stride(-1) != 1:
        mask = mask.contiguous()
    if mask.dtype == torch.bool:
        kind, mask = MASK_BOOL, mask.view(torch.uint8)
    else:
        kind, mask = MASK_ADDITIVE, mask.float()
    head_stride = 0 if mask.shape[1] == 1 else mask.stride(1)
    return kind, mask, (mask.stride(0), head_stride, mask.stride(2))


def quantized_attention_triton(query_rows, key, value, mask, q_len: int, kv_len: int, sliding_window: int | None,
                               block_n: int = 64, num_splits: int | None = None):  # fmt: skip
    """Attention of `query_rows [B, H_kv, rows, D]` (fp32, already scaled) over the quantized part of `key` and
    `value` (`QuantizedKV`); `mask` `[B, 1 | H_kv, rows, kv_len]` or None (causal). Returns the normalised output
    `[B, H_kv, rows, D]` and the log-sum-exp `[B, H_kv, rows]` (-inf where nothing was attended), to be merged with
    the recent full-precision tokens."""
    batch, num_kv_heads, rows, width = query_rows.shape
    if value.shape[-1] != width or key.nbits != value.nbits:
        raise ValueError("the Triton kernel needs keys and values of one width and one bit width.")
    if key.scale.stride() != key.offset.stride() or value.scale.stride() != value.offset.stride():
        raise ValueError("scales and offsets must share their layout.")
    group = width // key.scale.shape[-1]
    if value.shape[-1] // value.scale.shape[-1] != group:
        raise ValueError("keys and values must use the same group size in the Triton kernel.")
    pack = 2 if key.nbits == 4 else 1
    quantized_len = key.quantized_length
    query_rows = query_rows.float().contiguous()
    batch_heads = batch * num_kv_heads
    num_splits = num_splits or default_num_splits(batch_heads, quantized_len, block_n)
    tokens_per_split = math.ceil(max(quantized_len, 1) / num_splits / block_n) * block_n
    num_splits = max(1, math.ceil(quantized_len / tokens_per_split))

    block_m = max(16, triton.next_power_of_2(rows))
    block_p = triton.next_power_of_2(width // pack)
    out = torch.empty((num_splits, batch, num_kv_heads, rows, width), device=query_rows.device, dtype=torch.float32)
    lse = torch.empty((num_splits, batch_heads, block_m), device=query_rows.device, dtype=torch.float32)
    mask_kind, mask_tensor, mask_strides = _mask_argument(mask, query_rows)
    _quantized_attention_kernel[(batch_heads, num_splits)](
        query_rows, key.codes, key.scale, key.offset, value.codes, value.scale, value.offset, mask_tensor, out, lse,
        *query_rows.stride()[:3], *key.codes.stride()[:3], *key.scale.stride()[:3],
        *value.codes.stride()[:3], *value.scale.stride()[:3], *mask_strides, *out.stride()[:4],
        num_kv_heads, rows, q_len, kv_len, quantized_len, tokens_per_split, sliding_window or 0,
        WIDTH=width, PACK=pack, GROUP=group, MASK_KIND=mask_kind, HAS_WINDOW=sliding_window is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_P=block_p, USE_DOT=block_p >= 16,
    )  # fmt: skip
    lse = lse[..., :rows].reshape(num_splits, batch, num_kv_heads, rows)
    return merge_splits(out, lse)


def merge_splits(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-split softmax outputs `[S, ..., D]` with their log-sum-exps `[S, ...]` into one."""
    total = torch.logsumexp(lse, dim=0)
    weights = torch.exp(lse - torch.where(torch.isfinite(total), total, 0.0))  # 0 for empty splits and rows
    return (weights[..., None] * out).sum(0), total
