"""Triton grouped-GEMM kernels for `agillm_grouped` on GPU (see `kernels/moe.py` for the algorithm and the CPU path).

One kernel, `_grouped_gemm_kernel`, multiplies rows sorted by expert with their expert's weight matrix. Its grid is
(row tile, column tile); a row tile never straddles two experts, so every program reads one expert's weights.
Optional parts, chosen at compile time:

- a gather of the input rows (`hidden_states[token_index]` without materialising it);
- a gated first projection: two accumulators, columns `n` (gate) and `n + I` (up) of the `[gate; up]` weight;
- a bias, an activation (SiLU, ReLU, GELU erf / tanh) and `act(gate) * up` in the epilogue, the pre-activation
  rows written out for the backward;
- a per-row scale (the routing weight) in the epilogue of the down projection.

Forward: gate_up kernel (gather + bias + activation + gating), down kernel (bias + routing weight), then a
deterministic per-token sum. Backward (`kernels.moe.experts_backward`): the same kernel without epilogue for the
two data gradients, torch for the elementwise parts and the per-expert weight gradients.

Tested on CPU with `TRITON_INTERPRET=1` (`tests/test_moe_kernels.py`), which must be set before this module is
imported.
"""

import torch
import triton
import triton.language as tl

from .moe import ExpertWeights, RoutingPlan, experts_backward, _has_default_gate


# config.hidden_act -> the kernel's ACTIVATION code
ACTIVATIONS = {"identity": 0, "silu": 1, "swish": 1, "relu": 2, "gelu": 3, "gelu_pytorch_tanh": 4}
_SQRT_HALF = 0.7071067811865476
_SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _activate(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:  # silu
        x = x * tl.sigmoid(x)
    elif ACTIVATION == 2:  # relu
        x = tl.maximum(x, 0.0)
    elif ACTIVATION == 3:  # gelu (erf)
        x = 0.5 * x * (1.0 + tl.erf(x * _SQRT_HALF))
    elif ACTIVATION == 4:  # gelu, tanh approximation: tanh(z) = 2 * sigmoid(2z) - 1
        inner = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        x = x * tl.sigmoid(2.0 * inner)
    return x


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, row_index_ptr, w_ptr, bias_ptr, scale_ptr, out_ptr, pre_ptr,
    tile_expert_ptr, tile_row_ptr, segment_end_ptr,
    N, K,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_be, stride_bn,
    stride_om, stride_on, stride_pm, stride_pn,
    GATHER: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    HAS_SCALE: tl.constexpr, STORE_PRE: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[r, n] = epilogue(sum_k A[src(r), k] * W[e(r), k, n]) for the rows of one expert's tile."""
    expert = tl.load(tile_expert_ptr + tl.program_id(0))
    if expert < 0:  # the grid is an upper bound on the number of row tiles
        return
    row_start = tl.load(tile_row_ptr + tl.program_id(0))
    row_end = tl.load(segment_end_ptr + expert)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    if GATHER:
        source_rows = tl.load(row_index_ptr + rows, mask=row_mask, other=0)
    else:
        source_rows = rows
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N

    w_expert = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(
            a_ptr + source_rows.to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak,
            mask=row_mask[:, None] & k_mask[None, :], other=0.0,
        )
        w_mask = k_mask[:, None] & col_mask[None, :]
        w = tl.load(w_expert + ks[:, None] * stride_wk + cols[None, :] * stride_wn, mask=w_mask, other=0.0)
        if DOT_FP32:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        if GATED:
            w_up_ptrs = w_expert + ks[:, None] * stride_wk + (cols + N)[None, :] * stride_wn
            w_up = tl.load(w_up_ptrs, mask=w_mask, other=0.0)
            if DOT_FP32:
                w_up = w_up.to(tl.float32)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_be + cols * stride_bn, mask=col_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
        if GATED:
            up_bias = tl.load(bias_ptr + expert * stride_be + (cols + N) * stride_bn, mask=col_mask, other=0.0)
            acc_up += up_bias.to(tl.float32)[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    if STORE_PRE:  # pre-activation rows for the backward: [gate | up] or [x]
        pre = pre_ptr + rows.to(tl.int64)[:, None] * stride_pm + cols[None, :] * stride_pn
        tl.store(pre, acc.to(pre_ptr.dtype.element_ty), mask=out_mask)
        if GATED:
            tl.store(pre + N * stride_pn, acc_up.to(pre_ptr.dtype.element_ty), mask=out_mask)
    if GATED:
        # The eager path rounds gate and up to the weight dtype before the activation; so does this.
        gate = acc.to(pre_ptr.dtype.element_ty).to(tl.float32)
        up = acc_up.to(pre_ptr.dtype.element_ty).to(tl.float32)
        acc = _activate(gate, ACTIVATION) * up
    else:
        acc = _activate(acc.to(pre_ptr.dtype.element_ty).to(tl.float32), ACTIVATION)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def tile_table(offsets: torch.Tensor, block_m: int, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert, first row) of every row tile, without a host sync: the grid is `cdiv(S, BM) + E` tiles, an upper
    bound on `sum_e cdiv(count_e, BM)`; the tiles past the real ones get expert -1 and return at once."""
    num_experts = offsets.shape[0]
    ends = offsets.to(torch.int64)
    starts = ends - torch.diff(ends, prepend=ends.new_zeros(1))
    tiles = torch.div(ends - starts + block_m - 1, block_m, rounding_mode="floor")
    tile_ends = tiles.cumsum(0)
    tile_ids = torch.arange(triton.cdiv(num_rows, block_m) + num_experts, device=offsets.device)
    expert = torch.searchsorted(tile_ends, tile_ids, right=True)
    valid = expert < num_experts
    expert = expert.clamp(max=num_experts - 1)
    first_row = starts[expert] + (tile_ids - (tile_ends[expert] - tiles[expert])) * block_m
    return torch.where(valid, expert, -1).to(torch.int32), first_row.to(torch.int32)


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 products as torch's own matmul would do them (TF32 only where the user allowed it)."""
    if triton.knobs.runtime.interpret or dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def launch_grouped_gemm(
    rows: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    *,
    row_index: torch.Tensor | None = None,
    num_rows: int | None = None,
    gated: bool = False,
    bias: torch.Tensor | None = None,
    activation: int = 0,
    scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    store_pre: bool = False,
    block_m: int = 64,
    block_n: int = 64,
    block_k: int = 32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`epilogue(A[row_index] @ weight[e])` over expert segments; `weight` is a `[E, K, N']` view (N' = 2N gated).

    Returns `(out [S, N], pre-activation [S, N'] or None)`.
    """
    num_rows = rows.shape[0] if num_rows is None else num_rows
    num_experts, reduction, width = weight.shape
    if rows.shape[1] != reduction or offsets.shape[0] != num_experts:
        raise ValueError(f"grouped GEMM shapes do not match: rows {tuple(rows.shape)}, weight {tuple(weight.shape)}.")
    out_width = width // 2 if gated else width
    out = rows.new_empty(num_rows, out_width, dtype=out_dtype or weight.dtype)
    pre = rows.new_empty(num_rows, width, dtype=weight.dtype) if store_pre else out
    if num_rows == 0:
        return out, (pre if store_pre else None)
    tile_expert, tile_row = tile_table(offsets, block_m, num_rows)
    grid = (tile_expert.shape[0], triton.cdiv(out_width, block_n))
    bias_arg = bias if bias is not None else weight  # unused pointer when HAS_BIAS is off
    _grouped_gemm_kernel[grid](
        rows, row_index if row_index is not None else tile_row, weight, bias_arg,
        scale if scale is not None else weight, out, pre,
        tile_expert, tile_row, offsets,
        out_width, reduction,
        rows.stride(0), rows.stride(1), weight.stride(0), weight.stride(1), weight.stride(2),
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        out.stride(0), out.stride(1), pre.stride(0), pre.stride(1),
        GATHER=row_index is not None, GATED=gated, HAS_BIAS=bias is not None, ACTIVATION=activation,
        HAS_SCALE=scale is not None, STORE_PRE=store_pre, INPUT_PRECISION=_input_precision(weight.dtype),
        DOT_FP32=triton.knobs.runtime.interpret,  # the interpreter's tl.dot gets 16-bit floats wrong
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out, (pre if store_pre else None)


# Block sizes; tests shrink them to run the interpreter on small shapes.
BLOCKS = {"block_m": 64, "block_n": 64, "block_k": 32}


def triton_grouped_mm(rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Drop-in for `kernels.moe.grouped_mm` (no epilogue): `rows [S, K]` by `weight[e] [K, N]` per segment."""
    return launch_grouped_gemm(rows, weight, offsets, **BLOCKS)[0]


def _activation_code(experts: torch.nn.Module) -> int | None:
    return ACTIVATIONS.get(getattr(getattr(experts, "config", None), "hidden_act", None))


def triton_experts_supported(experts: torch.nn.Module, hidden_states: torch.Tensor) -> bool:
    """The kernel knows the activation and the gate (`act(gate) * up` or none) and the dtype is a float one;
    anything else runs the torch path (it works on GPU too)."""
    gate_ok = _has_default_gate(experts) or not experts.has_gate
    return (
        gate_ok
        and _activation_code(experts) is not None
        and hidden_states.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and experts.down_proj.dtype == hidden_states.dtype  # tl.dot takes one dtype for both operands
    )


def _forward_rows(experts, hidden_states, routing_weights, weights: ExpertWeights, plan: RoutingPlan):
    """`(output [T, H], pre-activation rows)`: the two fused kernels and a deterministic per-token sum."""
    num_pairs = plan.order.shape[0]
    activated, projected = launch_grouped_gemm(
        hidden_states, weights.up.transpose(1, 2), plan.offsets, row_index=plan.token_index, num_rows=num_pairs,
        gated=experts.has_gate, bias=weights.up_bias, activation=_activation_code(experts), store_pre=True, **BLOCKS,
    )
    out_rows, _ = launch_grouped_gemm(
        activated, weights.down.transpose(1, 2), plan.offsets, bias=weights.down_bias, scale=routing_weights,
        **BLOCKS,
    )
    # Back to (token, slot) order, then sum over the slots: no atomics, so the result is reproducible.
    inverse = torch.empty_like(plan.order).scatter_(0, plan.order, torch.arange(num_pairs, device=plan.order.device))
    top_k = num_pairs // hidden_states.shape[0]
    output = out_rows[inverse].view(hidden_states.shape[0], top_k, -1).sum(dim=1)
    return output.to(hidden_states.dtype), projected


class TritonGroupedExpertsFunction(torch.autograd.Function):
    """Same contract and saved tensors as `kernels.moe.GroupedExpertsFunction`, with the Triton GEMMs."""

    @staticmethod
    def forward(ctx, hidden_states, top_k_weights, up, up_bias, down, down_bias, plan, experts):
        weights = ExpertWeights(up, up_bias, down, down_bias)
        routing_weights = top_k_weights.reshape(-1)[plan.order].contiguous()
        output, projected = _forward_rows(experts, hidden_states, routing_weights, weights, plan)
        ctx.save_for_backward(hidden_states, routing_weights, up, down, down_bias, projected)
        ctx.plan, ctx.experts, ctx.weights_shape = plan, experts, top_k_weights.shape
        return output

    @staticmethod
    def backward(ctx, grad_output):
        return experts_backward(ctx, grad_output.contiguous(), triton_grouped_mm)


def triton_grouped_experts(experts, hidden_states, top_k_weights, weights: ExpertWeights, plan: RoutingPlan):
    """Forward (and, through autograd, backward) of the experts with the Triton kernels."""
    return TritonGroupedExpertsFunction.apply(
        hidden_states.contiguous(), top_k_weights, weights.up, weights.up_bias, weights.down, weights.down_bias,
        plan, experts,
    )
