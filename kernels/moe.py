"""AGILLM's MoE experts kernel, `experts_implementation="agillm_grouped"`, for transformers' `ExpertsInterface`.

    import kernels
    kernels.enable()
    model = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, experts_implementation="agillm_grouped"
    )
    # or, on a loaded model: model.set_experts_implementation("agillm_grouped")

One forward over the (token, k) pairs of a layer:

1. sort the pairs by expert once (`RoutingPlan`): every expert's pairs become one contiguous segment of rows;
2. one grouped GEMM for `gate_up_proj` (or `up_proj`) over the segments, bias added, activation (`act(gate) * up`
   or `act(up)`) applied;
3. one grouped GEMM for `down_proj`, bias added, scaled by the routing weight of each pair;
4. one scatter-add of the rows back to their tokens.

It serves both AGILLM expert classes (`AgillmExperts`: gated, no bias; `AgillmPlainExperts`: ReLU with biases) and
any other class decorated with `@use_experts_implementation` that stores `[E, out, in]` weights. Llama-4-style
routing (the router scales the expert *input* and passes ones as weights) needs nothing special.

Backward is written out (`GroupedExpertsFunction`) instead of recorded op by op: it keeps only the pre-activation
rows `[S, 2I]` (transformers' implementations keep the gathered inputs, both activation halves, the activated rows
and the down-projected rows), recomputes the activation, and gets the routing-weight gradient from the `[S, I]`
product it needs anyway instead of from the `[S, H]` output rows.

On CUDA with Triton the two GEMMs run as Triton grouped-GEMM kernels with the gather, activation and routing
weights fused in (`kernels/triton_moe.py`). On CPU there are two schedules of the same math, picked by segment
length (`_by_segment`): whole-batch phases with `torch.nn.functional.grouped_mm` (one call for all experts; a loop
over non-empty segments where that op is missing) for many short segments, and one expert at a time, every step
on cache-resident rows, for long segments. A call on a few pairs (a decode step, a training call on a token or two)
skips the sort altogether (`PairList`: matrix-vector products per pair on the expert's weights in place, forward
and backward).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface, _default_apply_gate


EXPERTS_IMPLEMENTATION = "agillm_grouped"


# --------------------------------------------------------------------------------------------------- routing plan


@dataclass
class RoutingPlan:
    """The (token, k) pairs of one forward, sorted by expert (S = tokens * top_k rows).

    `order[i]` is the flat pair (`token * top_k + slot`) at sorted row `i`, `token_index[i]` its token,
    `expert_index[i]` its expert; rows `offsets[e-1]:offsets[e]` belong to expert `e` (int32 cumulative counts,
    the layout `torch.nn.functional.grouped_mm` takes).
    """

    order: torch.Tensor
    token_index: torch.Tensor
    expert_index: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def build(cls, top_k_index: torch.Tensor, num_experts: int) -> "RoutingPlan":
        flat = top_k_index.reshape(-1)
        # Stable, so each expert sees its tokens in order: results do not depend on the sort's tie-breaking.
        expert_index, order = torch.sort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts)
        if counts.numel() != num_experts:
            raise ValueError(f"top_k_index holds expert ids outside [0, num_experts) ({num_experts}).")
        token_index = torch.div(order, top_k_index.shape[-1], rounding_mode="floor")
        return cls(order, token_index, expert_index, counts.cumsum(0, dtype=torch.int32))


# --------------------------------------------------------------------------------------------------- grouped GEMMs


def _aligned(tensor: torch.Tensor) -> bool:
    """16-byte-aligned data and strides (apart from unit strides), as `grouped_mm` requires."""
    size = tensor.element_size()
    return tensor.data_ptr() % 16 == 0 and all(stride == 1 or stride * size % 16 == 0 for stride in tensor.stride())


def _grouped_mm_supported(*tensors: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` runs these tensors: torch's kernel has CPU support for fp32/bf16 since 2.9
    (16-byte-aligned data and strides); on CUDA only for bf16 on sm80+."""
    if not hasattr(F, "grouped_mm"):
        return False
    device, dtype = tensors[0].device, tensors[0].dtype
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16) and all(_aligned(t) for t in tensors)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return False


def _segments(offsets: torch.Tensor):
    """(expert, start, end) of every non-empty segment (one host read of the offsets)."""
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            yield expert, start, end
        start = end


def grouped_mm(rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`rows [S, K]` sorted by expert times `weight[e] [K, N]` per segment -> `[S, N]` (views of `weight` are fine)."""
    if _grouped_mm_supported(rows, weight):
        return F.grouped_mm(rows, weight, offs=offsets)
    out = rows.new_zeros(rows.shape[0], weight.shape[-1])
    for expert, start, end in _segments(offsets):
        torch.mm(rows[start:end], weight[expert], out=out[start:end])
    return out


def grouped_linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, offsets: torch.Tensor):
    """`grouped_mm` plus a per-expert bias `[E, N]`. With a bias, one `addmm` per segment adds it in the GEMM
    (gathering `bias[expert_index]` would cost an extra `[S, N]` tensor and two passes over it)."""
    if bias is None:
        return grouped_mm(rows, weight, offsets)
    out = rows.new_empty(rows.shape[0], weight.shape[-1])
    for expert, start, end in _segments(offsets):
        torch.addmm(bias[expert], rows[start:end], weight[expert], out=out[start:end])
    return out


def grouped_weight_grad(left: torch.Tensor, right: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per expert `left[seg].T @ right[seg]`: `[S, M]`, `[S, N]` -> `[E, M, N]` (zero for experts without rows)."""
    if _grouped_mm_supported(left, right):
        return F.grouped_mm(left.t(), right, offs=offsets)
    out = left.new_zeros(offsets.shape[0], left.shape[1], right.shape[1])
    for expert, start, end in _segments(offsets):
        torch.mm(left[start:end].t(), right[start:end], out=out[expert])
    return out


# --------------------------------------------------------------------------------------------------- experts


@dataclass
class ExpertWeights:
    """The tensors of one experts module, `[E, out, in]` layout: first projection (gate_up or up) and down."""

    up: torch.Tensor
    up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None

    @classmethod
    def of(cls, experts: torch.nn.Module) -> "ExpertWeights":
        if getattr(experts, "has_post_expert_norm", False):
            raise ValueError(f"{EXPERTS_IMPLEMENTATION} does not support experts with a post-expert norm.")
        if getattr(experts, "_is_expert_parallel", False):
            raise ValueError(f"{EXPERTS_IMPLEMENTATION} does not support expert parallelism; use 'grouped_mm'.")
        if not getattr(experts, "is_concatenated", True):
            raise ValueError(f"{EXPERTS_IMPLEMENTATION} needs gate_up_proj stored as [gate; up], not interleaved.")
        prefix = "gate_up_proj" if experts.has_gate else "up_proj"
        up, down = getattr(experts, prefix), experts.down_proj
        up_bias = getattr(experts, f"{prefix}_bias") if experts.has_bias else None
        down_bias = experts.down_proj_bias if experts.has_bias else None
        if getattr(experts, "is_transposed", False):  # stored [E, in, out]
            up, down = up.transpose(1, 2), down.transpose(1, 2)
        return cls(up, up_bias, down, down_bias)


def _has_default_gate(experts: torch.nn.Module) -> bool:
    """Gated experts that split `[gate; up]` and compute `act(gate) * up` (the backward below relies on it)."""
    return experts.has_gate and getattr(type(experts), "_apply_gate", _default_apply_gate) is _default_apply_gate


def _activate(experts: torch.nn.Module, projected: torch.Tensor) -> torch.Tensor:
    """`act(gate) * up` for gated experts (one fresh `[S, I]` tensor), `act(x)` otherwise."""
    if _has_default_gate(experts):
        gate, up = projected.chunk(2, dim=-1)
        return experts.act_fn(gate).mul_(up)
    activated = experts._apply_gate(projected) if experts.has_gate else experts.act_fn(projected)
    # Callers scale the result in place: never hand back the (saved) input itself, as an identity activation would.
    return activated.clone() if activated.data_ptr() == projected.data_ptr() else activated


def _activation_backward(act_fn, inputs: torch.Tensor, grad: torch.Tensor, out: torch.Tensor) -> None:
    """`out = act'(inputs) * grad` (`out` may be `grad` itself): native kernels for SiLU and ReLU, autograd else."""
    if isinstance(act_fn, (nn.SiLU, SiLUActivation)):
        torch.ops.aten.silu_backward.grad_input(grad, inputs, grad_input=out)
    elif isinstance(act_fn, nn.ReLU):
        torch.mul(grad, inputs > 0, out=out)
    else:
        with torch.enable_grad():
            leaf = inputs.detach().requires_grad_(True)
            (grad_inputs,) = torch.autograd.grad(act_fn(leaf), leaf, grad)
        out.copy_(grad_inputs)


def _project_up(x_sorted, weights: ExpertWeights, plan: RoutingPlan) -> torch.Tensor:
    """Pre-activation rows `[S, 2I or I]`."""
    return grouped_linear(x_sorted, weights.up.transpose(1, 2), weights.up_bias, plan.offsets)


def _project_down(activated, weights: ExpertWeights, plan: RoutingPlan, routing_weights) -> torch.Tensor:
    """Down projection with bias, scaled by each row's routing weight: `[S, H]` (`activated` is scaled in place)."""
    if weights.down_bias is None:  # scale the narrower side: (w * a) @ down.T == w * (a @ down.T)
        return grouped_mm(activated.mul_(routing_weights[:, None]), weights.down.transpose(1, 2), plan.offsets)
    out = grouped_linear(activated, weights.down.transpose(1, 2), weights.down_bias, plan.offsets)
    return out.mul_(routing_weights[:, None])


def _linear_into(out, rows, weight, bias) -> torch.Tensor:
    """`out = rows @ weight.T (+ bias)` for one expert's `[out, in]` weight, written in place."""
    if bias is None:
        return torch.mm(rows, weight.t(), out=out)
    return torch.addmm(bias, rows, weight.t(), out=out)


def _experts_rows_by_segment(experts, hidden_states, plan: RoutingPlan, routing_weights, weights: ExpertWeights):
    """The forward one expert at a time: each segment's rows go through gather, up projection, activation, down
    projection and scaling while they are in cache (the whole-batch phases stream `[S, 2I]` through memory)."""
    projected = hidden_states.new_empty(plan.order.shape[0], weights.up.shape[1], dtype=weights.up.dtype)
    out_rows = hidden_states.new_empty(plan.order.shape[0], hidden_states.shape[1], dtype=weights.up.dtype)
    routing_weights = routing_weights.to(projected.dtype)[:, None]
    for expert, start, end in _segments(plan.offsets):
        rows = hidden_states.index_select(0, plan.token_index[start:end]).to(projected.dtype)
        up_bias = weights.up_bias[expert] if weights.up_bias is not None else None
        activated = _activate(experts, _linear_into(projected[start:end], rows, weights.up[expert], up_bias))
        if weights.down_bias is None:  # scale the narrower side: (w * a) @ down.T == w * (a @ down.T)
            _linear_into(out_rows[start:end], activated.mul_(routing_weights[start:end]), weights.down[expert], None)
        else:
            _linear_into(out_rows[start:end], activated, weights.down[expert], weights.down_bias[expert])
            out_rows[start:end].mul_(routing_weights[start:end])
    output = torch.zeros_like(hidden_states).index_add_(0, plan.token_index, out_rows.to(hidden_states.dtype))
    return output, projected


@dataclass
class PairList:
    """The (token, expert) pairs of a small call in `top_k_index` order (pair `token * top_k + slot`).

    With a handful of pairs (a decode step, a 1-token training call), one matrix product per pair on its expert's
    weight in place costs less than sorting the pairs and running grouped GEMMs, which on CPU step through every
    expert, empty or not.
    """

    experts: list[int]  # expert of each pair, read once on the host
    expert_index: torch.Tensor  # the same as a tensor [P]
    top_k: int

    @classmethod
    def of(cls, top_k_index: torch.Tensor, num_experts: int) -> "PairList":
        experts = top_k_index.reshape(-1).tolist()
        if any(not 0 <= expert < num_experts for expert in experts):
            raise ValueError(f"top_k_index holds expert ids outside [0, num_experts) ({num_experts}).")
        return cls(experts, top_k_index.reshape(-1), top_k_index.shape[-1])

    def rows(self, per_token: torch.Tensor) -> torch.Tensor:
        """`[T, D]` per token -> `[P, D]` per pair."""
        return per_token if self.top_k == 1 else per_token.repeat_interleave(self.top_k, dim=0)

    def sum_per_token(self, per_pair: torch.Tensor) -> torch.Tensor:
        """`[P, D]` per pair -> `[T, D]`, the pairs of each token added up."""
        return per_pair if self.top_k == 1 else per_pair.view(-1, self.top_k, per_pair.shape[-1]).sum(1)


def _pairs_forward(experts, hidden_states, pairs: PairList, routing_weights, weights: ExpertWeights):
    """`(output [T, H], pre-activation rows [P, W])` one pair at a time; `routing_weights` `[P]`."""
    rows = pairs.rows(hidden_states.to(weights.up.dtype))
    projected = rows.new_empty(len(pairs.experts), weights.up.shape[1])
    for pair, expert in enumerate(pairs.experts):
        up_bias = weights.up_bias[expert] if weights.up_bias is not None else None
        _linear_into(projected[pair : pair + 1], rows[pair : pair + 1], weights.up[expert], up_bias)
    activated = _activate(experts, projected)
    scale = routing_weights.to(projected.dtype)[:, None]
    if weights.down_bias is None:  # scale the narrower side: (w * a) @ down.T == w * (a @ down.T)
        activated.mul_(scale)
    out_rows = rows.new_empty(len(pairs.experts), weights.down.shape[1])
    for pair, expert in enumerate(pairs.experts):
        down_bias = weights.down_bias[expert] if weights.down_bias is not None else None
        _linear_into(out_rows[pair : pair + 1], activated[pair : pair + 1], weights.down[expert], down_bias)
    if weights.down_bias is not None:
        out_rows.mul_(scale)
    return pairs.sum_per_token(out_rows).to(hidden_states.dtype), projected


class PairExpertsFunction(torch.autograd.Function):
    """`_pairs_forward` with a hand-written backward: a few matrix-vector products per pair, and weight gradients
    written as outer products into the pair's expert (same inputs as `GroupedExpertsFunction`, a `PairList` for
    the plan)."""

    @staticmethod
    def forward(ctx, hidden_states, top_k_weights, up, up_bias, down, down_bias, pairs, experts):
        routing_weights = top_k_weights.reshape(-1)
        weights = ExpertWeights(up, up_bias, down, down_bias)
        output, projected = _pairs_forward(experts, hidden_states, pairs, routing_weights, weights)
        ctx.save_for_backward(hidden_states, routing_weights, up, down, down_bias, projected)
        ctx.pairs, ctx.experts, ctx.weights_shape = pairs, experts, top_k_weights.shape
        return output

    @staticmethod
    def backward(ctx, grad_output):
        hidden_states, routing_weights, up, down, down_bias, projected = ctx.saved_tensors
        pairs, experts, needs = ctx.pairs, ctx.experts, ctx.needs_input_grad
        scale = routing_weights[:, None].to(projected.dtype)
        grad_rows = pairs.rows(grad_output.to(projected.dtype))  # d loss / d (down-projected row, unscaled)
        activated, gate_act = _recompute_activation(experts, projected)
        grad_activated = torch.empty_like(activated)
        for pair, expert in enumerate(pairs.experts):
            torch.mm(grad_rows[pair : pair + 1], down[expert], out=grad_activated[pair : pair + 1])
        grad_top_k_weights = grad_up = grad_up_bias = grad_down = grad_down_bias = grad_hidden = None
        if needs[1]:
            grad_pairs = torch.linalg.vecdot(grad_activated, activated)
            if down_bias is not None:
                grad_pairs += torch.linalg.vecdot(grad_rows, down_bias[pairs.expert_index])
            grad_top_k_weights = grad_pairs.view(ctx.weights_shape).to(routing_weights.dtype)
        if needs[4]:
            grad_down = torch.zeros_like(down)
            scaled = activated.mul_(scale)
            for pair, expert in enumerate(pairs.experts):
                grad_down[expert].addr_(grad_rows[pair], scaled[pair])
        if needs[5]:
            grad_down_bias = torch.zeros_like(down_bias).index_add_(0, pairs.expert_index, grad_rows * scale)
        grad_projected = _gate_backward(experts, projected, gate_act, grad_activated.mul_(scale))
        if needs[2]:
            rows = pairs.rows(hidden_states.to(projected.dtype))
            grad_up = torch.zeros_like(up)
            for pair, expert in enumerate(pairs.experts):
                grad_up[expert].addr_(grad_projected[pair], rows[pair])
        if needs[3]:
            grad_up_bias = grad_projected.new_zeros(up.shape[:2]).index_add_(0, pairs.expert_index, grad_projected)
        if needs[0]:
            grad_rows_in = grad_projected.new_empty(grad_projected.shape[0], up.shape[2])
            for pair, expert in enumerate(pairs.experts):
                torch.mm(grad_projected[pair : pair + 1], up[expert], out=grad_rows_in[pair : pair + 1])
            grad_hidden = pairs.sum_per_token(grad_rows_in).to(hidden_states.dtype)
        return grad_hidden, grad_top_k_weights, grad_up, grad_up_bias, grad_down, grad_down_bias, None, None


def _experts_rows(experts, hidden_states, plan: RoutingPlan, routing_weights, weights: ExpertWeights):
    """Forward without autograd records: `(output [T, H], pre-activation rows)`."""
    if _by_segment(plan):
        return _experts_rows_by_segment(experts, hidden_states, plan, routing_weights, weights)
    x_sorted = hidden_states[plan.token_index].to(weights.up.dtype)
    projected = _project_up(x_sorted, weights, plan)
    out_rows = _project_down(_activate(experts, projected), weights, plan, routing_weights.to(projected.dtype))
    output = torch.zeros_like(hidden_states).index_add_(0, plan.token_index, out_rows.to(hidden_states.dtype))
    return output, projected


class GroupedExpertsFunction(torch.autograd.Function):
    """Sorted-token grouped experts with a hand-written backward (see the module docstring for what it saves).

    Inputs: hidden `[T, H]`, routing weights `[T, k]`, the four weight tensors (biases may be None); the routing
    plan and the experts module (for its activation) ride along without gradients.
    """

    @staticmethod
    def forward(ctx, hidden_states, top_k_weights, up, up_bias, down, down_bias, plan, experts):
        weights = ExpertWeights(up, up_bias, down, down_bias)
        routing_weights = top_k_weights.reshape(-1)[plan.order]
        output, projected = _experts_rows(experts, hidden_states, plan, routing_weights, weights)
        ctx.save_for_backward(hidden_states, routing_weights, up, down, down_bias, projected)
        ctx.plan, ctx.experts, ctx.weights_shape = plan, experts, top_k_weights.shape
        return output

    @staticmethod
    def backward(ctx, grad_output):
        if _by_segment(ctx.plan):
            return experts_backward_by_segment(ctx, grad_output)
        return experts_backward(ctx, grad_output, grouped_mm)


def experts_backward_by_segment(ctx, grad_output: torch.Tensor) -> tuple:
    """`experts_backward` one expert at a time (as `_experts_rows_by_segment`): every gradient of a segment is
    computed from cache-resident rows, weight gradients are written straight into their expert's slice."""
    hidden_states, routing_weights, up, down, down_bias, projected = ctx.saved_tensors
    plan, experts, needs = ctx.plan, ctx.experts, ctx.needs_input_grad
    dtype = projected.dtype
    scale = routing_weights[:, None].to(dtype)
    grad_pairs = projected.new_empty(plan.order.shape[0]) if needs[1] else None
    grad_x_rows = projected.new_empty(plan.order.shape[0], up.shape[2]) if needs[0] else None
    grad_up = torch.zeros_like(up) if needs[2] else None
    grad_up_bias = projected.new_zeros(up.shape[:2]) if needs[3] else None
    grad_down = torch.zeros_like(down) if needs[4] else None
    grad_down_bias = torch.zeros_like(down_bias) if needs[5] else None
    for expert, start, end in _segments(plan.offsets):
        tokens = plan.token_index[start:end]
        grad_rows = grad_output.index_select(0, tokens).to(dtype)
        activated, gate_act = _recompute_activation(experts, projected[start:end])
        grad_activated = grad_rows @ down[expert]
        if grad_pairs is not None:
            torch.linalg.vecdot(grad_activated, activated, out=grad_pairs[start:end])
            if down_bias is not None:
                grad_pairs[start:end] += grad_rows @ down_bias[expert]
        if grad_down is not None:
            torch.mm(grad_rows.t(), activated.mul_(scale[start:end]), out=grad_down[expert])
        if grad_down_bias is not None:
            torch.mv(grad_rows.t(), scale[start:end, 0], out=grad_down_bias[expert])
        grad_projected = _gate_backward(experts, projected[start:end], gate_act, grad_activated.mul_(scale[start:end]))
        if grad_up is not None:
            rows = hidden_states.index_select(0, tokens).to(dtype)
            torch.mm(grad_projected.t(), rows, out=grad_up[expert])
        if grad_up_bias is not None:
            torch.sum(grad_projected, dim=0, out=grad_up_bias[expert])
        if grad_x_rows is not None:
            torch.mm(grad_projected, up[expert], out=grad_x_rows[start:end])
    grad_hidden = grad_top_k_weights = None
    if grad_x_rows is not None:
        grad_hidden = torch.zeros_like(hidden_states)
        grad_hidden.index_add_(0, plan.token_index, grad_x_rows.to(hidden_states.dtype))
    if grad_pairs is not None:
        grad_top_k_weights = torch.empty_like(grad_pairs).index_copy_(0, plan.order, grad_pairs)
        grad_top_k_weights = grad_top_k_weights.view(ctx.weights_shape).to(routing_weights.dtype)
    return grad_hidden, grad_top_k_weights, grad_up, grad_up_bias, grad_down, grad_down_bias, None, None


def experts_backward(ctx, grad_output: torch.Tensor, matmul) -> tuple:
    """Gradients of (hidden, top_k_weights, up, up_bias, down, down_bias) from the saved sorted rows.

    `ctx` holds `(hidden, sorted routing weights, up, down, down_bias, pre-activation rows)`, `plan`, `experts`,
    `weights_shape`; `matmul(rows, weight [E, K, N], offsets)` is the grouped GEMM for the two data gradients
    (`grouped_mm` here, the Triton kernel on GPU). Weight gradients are per-expert `rows.T @ rows` products.
    """
    hidden_states, routing_weights, up, down, down_bias, projected = ctx.saved_tensors
    plan, experts, needs = ctx.plan, ctx.experts, ctx.needs_input_grad
    scale = routing_weights[:, None].to(projected.dtype)
    grad_rows = grad_output[plan.token_index].to(projected.dtype)  # d loss / d (down-projected row, unscaled)
    activated, gate_act = _recompute_activation(experts, projected)
    # grad_rows @ down[e], [S, I]: dotted with the activation it is the routing-weight gradient; scaled by the
    # weight it is the activation gradient.
    grad_activated = matmul(grad_rows, down, plan.offsets)
    grad_top_k_weights = None
    if needs[1]:
        grad_pairs = (grad_activated * activated).sum(-1)
        if down_bias is not None:
            grad_pairs += (grad_rows * down_bias[plan.expert_index]).sum(-1)
        grad_top_k_weights = torch.empty_like(grad_pairs).index_copy_(0, plan.order, grad_pairs)
        grad_top_k_weights = grad_top_k_weights.view(ctx.weights_shape).to(routing_weights.dtype)
    grad_down = grouped_weight_grad(grad_rows, activated.mul_(scale), plan.offsets) if needs[4] else None
    grad_down_bias = None
    if needs[5]:
        grad_down_bias = down_bias.new_zeros(down_bias.shape).index_add_(0, plan.expert_index, grad_rows * scale)
    grad_projected = _gate_backward(experts, projected, gate_act, grad_activated.mul_(scale))
    grad_hidden = grad_up = grad_up_bias = None
    if needs[2]:
        x_sorted = hidden_states[plan.token_index].to(up.dtype)
        grad_up = grouped_weight_grad(grad_projected, x_sorted, plan.offsets)
    if needs[3]:
        grad_up_bias = grad_projected.new_zeros(up.shape[:2]).index_add_(0, plan.expert_index, grad_projected)
    if needs[0]:
        grad_x_sorted = matmul(grad_projected, up, plan.offsets)
        grad_hidden = torch.zeros_like(hidden_states)
        grad_hidden.index_add_(0, plan.token_index, grad_x_sorted.to(hidden_states.dtype))
    return grad_hidden, grad_top_k_weights, grad_up, grad_up_bias, grad_down, grad_down_bias, None, None


def _recompute_activation(experts, projected):
    """`(activated, act(gate))` from the saved pre-activation rows; `act(gate)` only for the default gate."""
    if _has_default_gate(experts):
        gate, up = projected.chunk(2, dim=-1)
        gate_act = experts.act_fn(gate)
        return gate_act * up, gate_act
    return _activate(experts, projected), None  # a custom gate is differentiated by autograd in `_gate_backward`


def _gate_backward(experts, projected, gate_act, grad_activated) -> torch.Tensor:
    """d loss / d pre-activation rows from d loss / d activated rows."""
    if _has_default_gate(experts):
        gate, up = projected.chunk(2, dim=-1)
        grad_projected = torch.empty_like(projected)
        grad_gate, grad_up = grad_projected.chunk(2, dim=-1)
        torch.mul(grad_activated, gate_act, out=grad_up)
        torch.mul(grad_activated, up, out=grad_gate)
        _activation_backward(experts.act_fn, gate, grad_gate, out=grad_gate)
        return grad_projected
    if not experts.has_gate:
        _activation_backward(experts.act_fn, projected, grad_activated, out=grad_activated)
        return grad_activated
    with torch.enable_grad():
        leaf = projected.detach().requires_grad_(True)
        (grad_projected,) = torch.autograd.grad(experts._apply_gate(leaf), leaf, grad_activated)
    return grad_projected


# On CPU the per-segment loop (`_experts_rows_by_segment`: each expert's rows stay in cache, one Python step per
# expert) beats the whole-batch phases when segments are long, from about this many rows per expert (measured at
# 32, 64, 128, 256 and 512 rows on the bench/moe_kernels.py shapes, one thread).
SEGMENT_LOOP_MIN_ROWS = 96
# Calls with few (token, expert) pairs (a decode step, a training call on a token or two) take the one-pair-at-a-time
# path (`PairList`): a product per pair instead of one per expert. A pair costs more than an expert's turn in the
# sorted path, so it pays while the pairs are at most half the experts and at most this many (measured on
# bench/moe_kernels.py's three layers at 1 to 16 tokens, one thread).
FEW_PAIRS_MAX = 8


def _by_segment(plan: RoutingPlan) -> bool:
    if plan.offsets.device.type != "cpu":
        return False
    return plan.order.shape[0] >= SEGMENT_LOOP_MIN_ROWS * plan.offsets.shape[0]


def _few_pairs(top_k_index: torch.Tensor, num_experts: int) -> bool:
    return not top_k_index.is_cuda and top_k_index.numel() <= min(FEW_PAIRS_MAX, num_experts // 2)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def agillm_grouped_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """`ExpertsInterface` entry: `hidden_states [T, H]`, `top_k_index`/`top_k_weights [T, k]` -> `[T, H]`."""
    shapes_match = hidden_states.dim() == 2 and top_k_index.dim() == 2 and top_k_index.shape == top_k_weights.shape
    if not shapes_match or top_k_index.shape[0] != hidden_states.shape[0]:
        raise ValueError(
            f"Expected hidden_states [T, H] and top_k_index/top_k_weights [T, k]; got {tuple(hidden_states.shape)}, "
            f"{tuple(top_k_index.shape)}, {tuple(top_k_weights.shape)}."
        )
    weights = ExpertWeights.of(self)
    if top_k_index.numel() == 0:  # no token (an empty shard of a batch): nothing to route
        return torch.zeros_like(hidden_states)
    needs_grad = _needs_grad(hidden_states, top_k_weights, *vars(weights).values())
    if _few_pairs(top_k_index, self.num_experts):
        pairs = PairList.of(top_k_index, self.num_experts)
        if needs_grad:
            return PairExpertsFunction.apply(
                hidden_states, top_k_weights, weights.up, weights.up_bias, weights.down, weights.down_bias, pairs, self
            )
        return _pairs_forward(self, hidden_states, pairs, top_k_weights.reshape(-1), weights)[0]
    plan = RoutingPlan.build(top_k_index, self.num_experts)
    if hidden_states.is_cuda and _triton_available():
        from .triton_moe import triton_experts_supported, triton_grouped_experts

        if triton_experts_supported(self, hidden_states):
            return triton_grouped_experts(self, hidden_states, top_k_weights, weights, plan)
    if needs_grad:
        return GroupedExpertsFunction.apply(
            hidden_states, top_k_weights, weights.up, weights.up_bias, weights.down, weights.down_bias, plan, self
        )
    routing_weights = top_k_weights.reshape(-1)[plan.order]
    return _experts_rows(self, hidden_states, plan, routing_weights, weights)[0]


def register(interface: ExpertsInterface = ALL_EXPERTS_FUNCTIONS) -> None:
    """Make `experts_implementation="agillm_grouped"` available (idempotent)."""
    interface.register(EXPERTS_IMPLEMENTATION, agillm_grouped_experts_forward)


def unregister(interface: ExpertsInterface = ALL_EXPERTS_FUNCTIONS) -> None:
    """Remove the name again (a model still set to it then raises on its next forward)."""
    if interface._global_mapping.get(EXPERTS_IMPLEMENTATION) is agillm_grouped_experts_forward:
        del interface._global_mapping[EXPERTS_IMPLEMENTATION]
