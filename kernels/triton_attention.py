"""Flash attention in Triton (FA2 structure), forward and backward, for AGILLM's attention patterns.

One kernel covers what the model asks of attention:
- GQA/MQA: query head `h` reads key/value head `h // groups`; keys and values are never repeated in memory.
- Masks: none (full), in-kernel causal (upper-left aligned, as sdpa's `is_causal`), a boolean "may attend" mask as
  transformers' `sdpa_mask` builds it (`[B or 1, 1 or H, Q, K]`, any pattern: causal, sliding, chunked, left
  padding, SAT/NAT blocks, media blocks), or an additive float mask. A boolean mask is summarised per tile on the
  host (`tile_kinds`): tiles nobody may see are skipped, tiles everybody may see are computed without reading it.
- ALiBi from per-head slopes and per-batch query/key positions, in the kernel: `alibi` adds `-m_h * |j - i|`,
  `agillm_alibi` adds `-m_h * max(j - i, 0)` (`i`, `j`: absolute query / key positions).
- Query and value head dims may differ (MLA); any dims (padded to a power of two >= 16 inside the kernel).
- fp32 / bf16 / fp16 inputs, fp32 accumulation; the log-sum-exp is stored and the backward recomputes the scores.
- A query row that may see no key gives zeros (and zero gradients), as sdpa does, never NaN.

`TRITON_INTERPRET=1` must be in the environment before this module is imported for the kernels to run on CPU
(triton reads it when `@triton.jit` decorates them); `kernels.attention` imports this module lazily for that reason.
"""

import torch
import triton
import triton.language as tl

from .attention import cached_tile_kinds, tile_kinds


# MASK_KIND: how the kernel decides which keys a query may see.
MASK_FULL, MASK_CAUSAL, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2, 3
# ALIBI: which linear bias the kernel adds to the scores.
ALIBI_NONE, ALIBI_SYMMETRIC, ALIBI_FUTURE = 0, 1, 2
ALIBI_KINDS = {None: ALIBI_NONE, "alibi": ALIBI_SYMMETRIC, "agillm_alibi": ALIBI_FUTURE}


# ------------------------------------------------------------------------------------------ shared tile math


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _scores(
    q, k, scale, offs_m, offs_n, q_len, kv_len, slope, q_pos, kv_pos_ptr, mask_ptrs, tile_kind,
    MASK_KIND: tl.constexpr, ALIBI: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Scaled scores of one `[BLOCK_M, BLOCK_N]` tile with ALiBi and the mask applied (-inf where not allowed)."""
    s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale
    in_bounds = (offs_m[:, None] < q_len) & (offs_n[None, :] < kv_len)
    if ALIBI != 0:
        kv_pos = tl.load(kv_pos_ptr + offs_n, mask=offs_n < kv_len, other=0).to(tl.float32)
        distance = kv_pos[None, :] - q_pos[:, None]
        if ALIBI == 1:
            distance = tl.abs(distance)
        else:
            distance = tl.maximum(distance, 0.0)
        s = s - slope * distance
    allowed = in_bounds
    if MASK_KIND == 1:
        allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
    if MASK_KIND == 2:  # only a partial tile reads the mask (a masked-out load moves no memory)
        partial = (offs_n[None, :] * 0 + tile_kind) == 1  # (a block, not a scalar: the interpreter needs it)
        visible = tl.load(mask_ptrs, mask=in_bounds & partial, other=1)
        allowed = allowed & (visible != 0)
    if MASK_KIND == 3:
        s = s + tl.load(mask_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def _key_range(start_m, kv_len, BLOCK_M: tl.constexpr, MASK_KIND: tl.constexpr):
    """Keys a query tile may reach: with the in-kernel causal mask, none past the tile's last query."""
    if MASK_KIND == 1:
        return tl.minimum(kv_len, start_m + BLOCK_M)
    return kv_len


# ------------------------------------------------------------------------------------------ forward


@triton.jit
def _attention_forward_kernel(
    Q, K, V, Out, Lse, Mask, TileKinds, Slopes, QPos, KPos,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_tb, stride_th, stride_tm, stride_tn,
    stride_qpb, stride_kpb,
    num_heads, num_groups, q_len, kv_len, scale,
    HEAD_DIM_QK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, ALIBI: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    kv_head = head // num_groups
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_ptrs = Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_dqk[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < q_len) & (offs_dqk[None, :] < HEAD_DIM_QK), other=0.0)
    K += batch * stride_kb + kv_head * stride_kh
    V += batch * stride_vb + kv_head * stride_vh
    Mask += batch * stride_mb + head * stride_mh
    TileKinds += batch * stride_tb + head * stride_th + pid_m * stride_tm
    slope = 0.0
    q_pos = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ALIBI != 0:
        slope = tl.load(Slopes + head)
        q_pos = tl.load(QPos + batch * stride_qpb + offs_m, mask=offs_m < q_len, other=0).to(tl.float32)

    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(0, _key_range(start_m, kv_len, BLOCK_M, MASK_KIND), BLOCK_N):
        tile_kind = 2
        if MASK_KIND == 2:
            tile_kind = tl.load(TileKinds + (start_n // BLOCK_N) * stride_tn)
        if tile_kind != 0:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = tl.load(K + offs_n[:, None] * stride_kn + offs_dqk[None, :] * stride_kd,
                        mask=(offs_n[:, None] < kv_len) & (offs_dqk[None, :] < HEAD_DIM_QK), other=0.0)
            v = tl.load(V + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                        mask=(offs_n[:, None] < kv_len) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
            mask_ptrs = Mask + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
            s = _scores(q, k, scale, offs_m, offs_n, q_len, kv_len, slope, q_pos, KPos + batch * stride_kpb,
                        mask_ptrs, tile_kind, MASK_KIND, ALIBI, PRECISION, UPCAST)
            new_max = tl.maximum(running_max, tl.max(s, 1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows with nothing visible yet
            p = tl.exp(s - safe_max[:, None])
            correction = tl.exp(running_max - safe_max)
            running_sum = running_sum * correction + tl.sum(p, 1)
            acc = acc * correction[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
            running_max = new_max

    empty_row = running_sum == 0.0
    out = acc / tl.where(empty_row, 1.0, running_sum)[:, None]
    safe_max = tl.where(running_max == float("-inf"), 0.0, running_max)
    lse = tl.where(empty_row, 0.0, safe_max + tl.log(tl.where(empty_row, 1.0, running_sum)))
    out_ptrs = Out + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(Lse + pid_bh * q_len + offs_m, lse, mask=offs_m < q_len)


# ------------------------------------------------------------------------------------------ backward


@triton.jit
def _attention_backward_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, Mask, TileKinds, Slopes, QPos, KPos,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_tb, stride_th, stride_tm, stride_tn,
    stride_qpb, stride_kpb,
    num_heads, num_kv_heads, num_groups, q_len, kv_len, scale,
    HEAD_DIM_QK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, ALIBI: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One key tile of one kv head: sums dK and dV over every query head of its group (no atomics needed)."""
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    batch = pid_bkv // num_kv_heads
    kv_head = pid_bkv % num_kv_heads
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    key_rows = offs_n[:, None] < kv_len
    # dK / dV share K / V's strides (the host allocates them with `empty_like`)
    k_offsets = batch * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kn + offs_dqk[None, :] * stride_kd
    v_offsets = batch * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    k = tl.load(K + k_offsets, mask=key_rows & (offs_dqk[None, :] < HEAD_DIM_QK), other=0.0)
    v = tl.load(V + v_offsets, mask=key_rows & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # in-kernel causal: query tiles before this key tile see none of it
    first_m = 0
    if MASK_KIND == 1:
        first_m = (start_n // BLOCK_M) * BLOCK_M
    for group in range(0, num_groups):
        head = kv_head * num_groups + group
        bh = batch * num_heads + head
        slope = 0.0
        if ALIBI != 0:
            slope = tl.load(Slopes + head)
        for start_m in range(first_m, q_len, BLOCK_M):
            tile_kind = 2
            if MASK_KIND == 2:
                tile_kind = tl.load(TileKinds + batch * stride_tb + head * stride_th
                                    + (start_m // BLOCK_M) * stride_tm + pid_n * stride_tn)
            if tile_kind != 0:
                offs_m = start_m + tl.arange(0, BLOCK_M)
                query_rows = offs_m < q_len
                q = tl.load(Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm
                            + offs_dqk[None, :] * stride_qd,
                            mask=query_rows[:, None] & (offs_dqk[None, :] < HEAD_DIM_QK), other=0.0)
                do = tl.load(DO + batch * stride_dob + head * stride_doh + offs_m[:, None] * stride_dom
                             + offs_dv[None, :] * stride_dod,
                             mask=query_rows[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
                lse = tl.load(Lse + bh * q_len + offs_m, mask=query_rows, other=0.0)
                delta = tl.load(Delta + bh * q_len + offs_m, mask=query_rows, other=0.0)
                q_pos = tl.zeros([BLOCK_M], dtype=tl.float32)
                if ALIBI != 0:
                    q_pos = tl.load(QPos + batch * stride_qpb + offs_m, mask=query_rows, other=0).to(tl.float32)
                mask_ptrs = (Mask + batch * stride_mb + head * stride_mh
                             + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn)
                s = _scores(q, k, scale, offs_m, offs_n, q_len, kv_len, slope, q_pos, KPos + batch * stride_kpb,
                            mask_ptrs, tile_kind, MASK_KIND, ALIBI, PRECISION, UPCAST)
                p = tl.exp(s - lse[:, None])  # 0 where masked (s = -inf)
                dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
                dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
                ds = p * (dp.to(tl.float32) - delta[:, None])
                dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)
    dk = dk * scale
    tl.store(DK + k_offsets, dk.to(DK.dtype.element_ty), mask=key_rows & (offs_dqk[None, :] < HEAD_DIM_QK))
    tl.store(DV + v_offsets, dv.to(DV.dtype.element_ty), mask=key_rows & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _attention_backward_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Mask, TileKinds, Slopes, QPos, KPos,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_tb, stride_th, stride_tm, stride_tn,
    stride_qpb, stride_kpb,
    num_heads, num_groups, q_len, kv_len, scale,
    HEAD_DIM_QK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, ALIBI: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One query tile of one head: dQ over the keys it may see."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    kv_head = head // num_groups
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    query_rows = offs_m < q_len
    q_offsets = batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_dqk[None, :] * stride_qd
    q = tl.load(Q + q_offsets, mask=query_rows[:, None] & (offs_dqk[None, :] < HEAD_DIM_QK), other=0.0)
    do_offsets = batch * stride_dob + head * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod
    do = tl.load(DO + do_offsets, mask=query_rows[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    lse = tl.load(Lse + pid_bh * q_len + offs_m, mask=query_rows, other=0.0)
    delta = tl.load(Delta + pid_bh * q_len + offs_m, mask=query_rows, other=0.0)
    K += batch * stride_kb + kv_head * stride_kh
    V += batch * stride_vb + kv_head * stride_vh
    Mask += batch * stride_mb + head * stride_mh
    TileKinds += batch * stride_tb + head * stride_th + pid_m * stride_tm
    slope = 0.0
    q_pos = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ALIBI != 0:
        slope = tl.load(Slopes + head)
        q_pos = tl.load(QPos + batch * stride_qpb + offs_m, mask=query_rows, other=0).to(tl.float32)

    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    for start_n in range(0, _key_range(start_m, kv_len, BLOCK_M, MASK_KIND), BLOCK_N):
        tile_kind = 2
        if MASK_KIND == 2:
            tile_kind = tl.load(TileKinds + (start_n // BLOCK_N) * stride_tn)
        if tile_kind != 0:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = tl.load(K + offs_n[:, None] * stride_kn + offs_dqk[None, :] * stride_kd,
                        mask=(offs_n[:, None] < kv_len) & (offs_dqk[None, :] < HEAD_DIM_QK), other=0.0)
            v = tl.load(V + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                        mask=(offs_n[:, None] < kv_len) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
            mask_ptrs = Mask + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
            s = _scores(q, k, scale, offs_m, offs_n, q_len, kv_len, slope, q_pos, KPos + batch * stride_kpb,
                        mask_ptrs, tile_kind, MASK_KIND, ALIBI, PRECISION, UPCAST)
            p = tl.exp(s - lse[:, None])
            dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
            ds = p * (dp.to(tl.float32) - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
    dq = dq * scale
    tl.store(DQ + q_offsets, dq.to(DQ.dtype.element_ty), mask=query_rows[:, None] & (offs_dqk[None, :] < HEAD_DIM_QK))


# ------------------------------------------------------------------------------------------ host side


def _block_sizes(query: torch.Tensor, head_dim: int) -> tuple[int, int]:
    if not query.is_cuda:  # the interpreter: fewer, larger tiles run faster; 16 keeps small tests multi-tile
        return 16, 16
    return (64, 64) if head_dim <= 128 else (32, 32)


def _broadcast_strides(tensor: torch.Tensor, batch: int, heads: int) -> tuple[int, int, int, int]:
    """Strides of a `[B or 1, H or 1, Q, K]` tensor seen as `[B, H, Q, K]` (0 along broadcast dims)."""
    return tensor.expand(batch, heads, tensor.shape[2], tensor.shape[3]).stride()


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor, or a contiguous copy if `empty_like` (the gradient buffers) would not share its strides."""
    return tensor if torch.empty_like(tensor).stride() == tensor.stride() else tensor.contiguous()


class _Inputs:
    """Everything both passes launch with: mask, tile table, ALiBi tensors and their strides."""

    def __init__(self, query, key, mask, alibi_slopes, query_positions, key_positions, alibi_kind, block_m, block_n):
        batch, heads = query.shape[:2]
        device = query.device
        self.mask_kind, self.alibi = MASK_FULL, ALIBI_KINDS[alibi_kind]
        self.mask = self.tiles = torch.zeros(1, dtype=torch.int8, device=device)
        self.mask_strides = self.tile_strides = (0, 0, 0, 0)
        if isinstance(mask, str):  # "causal"
            self.mask_kind = MASK_CAUSAL
        elif mask is not None:
            self.mask_strides = _broadcast_strides(mask, batch, heads)
            if mask.dtype == torch.bool:
                self.mask_kind = MASK_BOOL
                self.tiles = cached_tile_kinds(mask, block_m, block_n)
                self.tile_strides = _broadcast_strides(self.tiles, batch, heads)
                self.mask = mask.view(torch.uint8)  # same bytes; triton's pointer type for it
            else:
                self.mask_kind = MASK_ADDITIVE
                self.mask = mask
        if self.alibi == ALIBI_NONE:
            self.slopes = self.query_positions = self.key_positions = self.mask.new_zeros(1)
            self.position_strides = (0, 0)
        else:
            self.slopes = alibi_slopes.to(device=device, dtype=torch.float32).contiguous()
            self.query_positions = query_positions.to(device).expand(batch, -1)
            self.key_positions = key_positions.to(device).expand(batch, -1)
            if self.query_positions.stride(1) != 1 or self.key_positions.stride(1) != 1:
                self.query_positions = self.query_positions.contiguous()
                self.key_positions = self.key_positions.contiguous()
            self.position_strides = (self.query_positions.stride(0), self.key_positions.stride(0))

    def launch_args(self):
        return (self.mask, self.tiles, self.slopes, self.query_positions, self.key_positions)

    def stride_args(self):
        return (*self.mask_strides, *self.tile_strides, *self.position_strides)


def _launch_constants(query, value, inputs, block_m: int, block_n: int) -> dict:
    """The `tl.constexpr` arguments all three kernels take (each distinct set compiles once)."""
    upcast = query.dtype == torch.bfloat16 and not query.is_cuda  # the interpreter multiplies bf16 as raw bits
    return dict(
        HEAD_DIM_QK=query.shape[-1],
        HEAD_DIM_V=value.shape[-1],
        BLOCK_DQK=max(16, triton.next_power_of_2(query.shape[-1])),
        BLOCK_DV=max(16, triton.next_power_of_2(value.shape[-1])),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        MASK_KIND=inputs.mask_kind,
        ALIBI=inputs.alibi,
        # fp32 in: exact fp32 products (tensor cores' tf32 would drop the precision the caller asked for)
        PRECISION="ieee" if query.dtype == torch.float32 or upcast else "tf32",
        UPCAST=upcast,
    )


class TritonFlashAttention(torch.autograd.Function):
    """`out [B, Q, H, Dv]` (transformers' attention output layout) from q `[B, H, Q, D]`, k/v `[B, H_kv, K, D*]`."""

    @staticmethod
    def forward(ctx, query, key, value, mask, scale, alibi_slopes, query_positions, key_positions, alibi_kind):
        query, key, value = (_dense(t) for t in (query, key, value))  # gradients are written with these strides
        batch, heads, q_len, _ = query.shape
        kv_heads, kv_len = key.shape[1], key.shape[2]
        block_m, block_n = _block_sizes(query, max(query.shape[-1], value.shape[-1]))
        inputs = _Inputs(query, key, mask, alibi_slopes, query_positions, key_positions, alibi_kind, block_m, block_n)
        constants = _launch_constants(query, value, inputs, block_m, block_n)
        out = torch.empty(batch, q_len, heads, value.shape[-1], dtype=query.dtype, device=query.device)
        lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=query.device)
        _attention_forward_kernel[(triton.cdiv(q_len, block_m), batch * heads)](
            query, key, value, out, lse, *inputs.launch_args(),
            *query.stride(), *key.stride(), *value.stride(),
            out.stride(0), out.stride(2), out.stride(1), out.stride(3),  # written as [B, H, Q, Dv]
            *inputs.stride_args(),
            heads, heads // kv_heads, q_len, kv_len, scale,
            **constants,
        )
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.inputs, ctx.scale, ctx.constants = inputs, scale, constants
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        inputs, scale, constants = ctx.inputs, ctx.scale, ctx.constants
        batch, heads, q_len, _ = query.shape
        kv_heads, kv_len = key.shape[1], key.shape[2]
        grad_out = grad_out.transpose(1, 2)  # [B, H, Q, Dv] view
        delta = (grad_out.float() * out.transpose(1, 2).float()).sum(-1).contiguous()  # rowsum(dO * O), [B, H, Q]
        grad_query, grad_key, grad_value = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        strides = (*query.stride(), *key.stride(), *value.stride(), *grad_out.stride(), *inputs.stride_args())
        _attention_backward_dkdv_kernel[(triton.cdiv(kv_len, constants["BLOCK_N"]), batch * kv_heads)](
            query, key, value, grad_out, lse, delta, grad_key, grad_value, *inputs.launch_args(), *strides,
            heads, kv_heads, heads // kv_heads, q_len, kv_len, scale,
            **constants,
        )
        _attention_backward_dq_kernel[(triton.cdiv(q_len, constants["BLOCK_M"]), batch * heads)](
            query, key, value, grad_out, lse, delta, grad_query, *inputs.launch_args(), *strides,
            heads, heads // kv_heads, q_len, kv_len, scale,
            **constants,
        )
        return grad_query, grad_key, grad_value, None, None, None, None, None, None


def triton_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | str | None = None,
    scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
    key_positions: torch.Tensor | None = None,
    alibi_kind: str | None = None,
) -> torch.Tensor:
    """Flash attention; returns `[B, Q, H, Dv]`.

    `mask`: None (every key), `"causal"` (key j visible to query i iff j <= i, sdpa's `is_causal`), a boolean
    `[B or 1, 1 or H, Q, K]` tensor (True = may attend) or an additive float tensor of that shape. `alibi_kind`
    (`"alibi"` / `"agillm_alibi"`) with `alibi_slopes [H]` and absolute `query_positions [B or 1, Q]`,
    `key_positions [B or 1, K]` adds ALiBi in the kernel.
    """
    if query.shape[1] % key.shape[1] or key.shape[1] != value.shape[1]:
        raise ValueError(
            f"{query.shape[1]} query heads cannot share {key.shape[1]} key / {value.shape[1]} value heads."
        )
    if key.shape[-1] != query.shape[-1] or key.shape[2] != value.shape[2]:
        raise ValueError(f"Mismatched shapes: query {tuple(query.shape)}, key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}.")
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"triton_attention supports fp32 / bf16 / fp16, got {query.dtype}.")
    if alibi_kind not in ALIBI_KINDS:
        raise ValueError(f"alibi_kind must be one of {list(ALIBI_KINDS)}, got {alibi_kind!r}.")
    if alibi_kind is not None and (alibi_slopes is None or query_positions is None or key_positions is None):
        raise ValueError("ALiBi needs alibi_slopes, query_positions and key_positions.")
    if isinstance(mask, torch.Tensor) and (mask.ndim != 4 or mask.shape[-2:] != (query.shape[2], key.shape[2])):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match q_len={query.shape[2]}, "
                         f"kv_len={key.shape[2]} (expected [B or 1, 1 or H, Q, K]).")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    key, value = key.to(query.dtype), value.to(query.dtype)
    return TritonFlashAttention.apply(
        query, key, value, mask, float(scale), alibi_slopes, query_positions, key_positions, alibi_kind
    )


__all__ = ["triton_attention", "tile_kinds", "TritonFlashAttention"]
