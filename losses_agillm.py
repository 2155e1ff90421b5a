"""Chunked ("fused") linear cross-entropy: `cross_entropy(hidden @ W^T + b, targets)` without the full logits.

A head's logits are `tokens x vocab` numbers; the stock loss holds them, their fp32 copy, the log-softmax and the
gradients of each, which for large vocabularies is most of a training step's memory. This module computes the same
loss and the same gradients one chunk of `chunk_size` rows (tokens) at a time, so what it adds is a few
`chunk_size x vocab` buffers whatever the number of tokens (the idea of Liger-Kernel's fused linear cross-entropy,
and of AGILLM 4.x's chunked loss, in plain PyTorch).

Forward keeps one number per row, the logsumexp; backward recomputes each chunk's logits and turns them into that
chunk's gradient (`softmax - target distribution`). Liger instead computes the gradients during the forward pass
and keeps them until backward: one matmul per chunk fewer, but the weight-sized gradient and the hidden states'
gradient stay alive from the loss's forward to its backward. AGILLM trains several losses, each after its own
trunk pass (AR, SAT, NAT, every MTP depth): gradients computed in the forward would all be alive together, on top
of every pass's activations, exactly when memory peaks. Recomputing allocates a loss's gradients only when
autograd reaches it, one loss at a time, so the peak is lower whenever there is more than one loss, and the same
with one.

Matmuls run in the dtype the head's `nn.Linear` would use (the autocast dtype under autocast, otherwise the inputs'
dtype), so the logits are the stock path's; everything after them (logsumexp, loss, softmax, the gradient sums over
chunks) is fp32, as the stock `logits.float()` cross-entropy.
"""

import torch
import torch.nn.functional as F
from torch import nn


IGNORE_INDEX = -100


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear(hidden, weight)` computes in: the autocast dtype if autocast is on, else the inputs'."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight^T + bias`, chunk by chunk; use `linear_cross_entropy`, which checks inputs.

    `hidden` is `[rows, hidden_size]`, `targets` `[rows]`. Returns the fp32 sum of the valid rows' losses divided by
    `divisor`, and each row's argmax over the vocabulary with `return_argmax` (else an empty tensor). Without
    `return_argmax` the ignored rows are dropped before any matmul, so they cost nothing.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, label_smoothing, divisor, return_argmax):
        num_input_rows, dtype = hidden.shape[0], _compute_dtype(hidden, weight)
        ctx.weight_dtype, ctx.bias_dtype = weight.dtype, (bias.dtype if bias is not None else None)
        valid = targets != IGNORE_INDEX
        rows = None
        if not return_argmax:
            rows = valid.nonzero().squeeze(1)
            hidden, targets, valid = hidden.index_select(0, rows), targets.index_select(0, rows), None
        weight, bias = weight.to(dtype), (bias.to(dtype) if bias is not None else None)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        argmax = torch.empty(hidden.shape[0] if return_argmax else 0, dtype=torch.long, device=hidden.device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for chunk in _chunks(hidden.shape[0], chunk_size):
                logits = F.linear(hidden[chunk].to(dtype), weight, bias)
                if return_argmax:
                    argmax[chunk] = logits.argmax(-1)
                logits = logits.float()
                target = targets[chunk].clamp(min=0)  # an ignored row reads class 0, then is masked out
                target_logit = logits.gather(1, target[:, None]).squeeze(1)
                mean_logit = logits.mean(-1) if label_smoothing else None
                row_max = logits.amax(-1)
                chunk_lse = logits.sub_(row_max[:, None]).exp_().sum(-1).log_().add_(row_max)  # in place: no copy
                lse[chunk] = chunk_lse
                # F.cross_entropy's label smoothing: (1 - e) * (-log p_target) + e * mean over classes of (-log p).
                row_loss = (1 - label_smoothing) * (chunk_lse - target_logit)
                if label_smoothing:
                    row_loss += label_smoothing * (chunk_lse - mean_logit)
                if valid is not None:
                    row_loss *= valid[chunk]
                loss_sum += row_loss.sum()
        ctx.save_for_backward(hidden, weight, bias, targets, valid, rows, lse)
        ctx.dtype, ctx.num_input_rows = dtype, num_input_rows
        ctx.chunk_size, ctx.label_smoothing, ctx.divisor = chunk_size, label_smoothing, divisor
        ctx.mark_non_differentiable(argmax)
        return loss_sum / divisor, argmax

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_argmax):
        hidden, weight, bias, targets, valid, rows, lse = ctx.saved_tensors
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        smoothing, vocab_size = ctx.label_smoothing, weight.shape[0]
        scale = grad_loss.float() / ctx.divisor
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(vocab_size, dtype=torch.float32, device=weight.device) if want_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            for chunk in _chunks(hidden.shape[0], ctx.chunk_size):
                chunk_hidden = hidden[chunk].to(ctx.dtype)
                # d loss / d logits = (softmax - (1 - e) * onehot(target) - e / vocab) * grad_loss / divisor
                grad_logits = F.linear(chunk_hidden, weight, bias).float().sub_(lse[chunk, None]).exp_()
                if smoothing:
                    grad_logits.sub_(smoothing / vocab_size)
                target = targets[chunk].clamp(min=0)[:, None]
                grad_logits.scatter_add_(1, target, grad_logits.new_full(target.shape, smoothing - 1.0))
                grad_logits.mul_(scale if valid is None else scale * valid[chunk, None])
                if want_bias:
                    grad_bias += grad_logits.sum(0)
                grad_logits = grad_logits.to(ctx.dtype)
                if want_hidden:
                    grad_hidden[chunk] = grad_logits @ weight
                if want_weight and grad_logits.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.T, chunk_hidden)
                elif want_weight:  # one low-precision partial per chunk, summed in fp32
                    grad_weight += grad_logits.T @ chunk_hidden
        if want_hidden and rows is not None:  # back to every input row: the dropped (ignored) ones get zero
            grad_hidden = grad_hidden.new_zeros(ctx.num_input_rows, hidden.shape[1]).index_copy_(0, rows, grad_hidden)
        return (
            grad_hidden,
            grad_weight.to(ctx.weight_dtype) if want_weight else None,
            grad_bias.to(ctx.bias_dtype) if want_bias else None,
            None, None, None, None, None,
        )  # fmt: skip


def _chunks(num_rows: int, chunk_size: int):
    return (slice(start, start + chunk_size) for start in range(0, num_rows, chunk_size))


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int,
    label_smoothing: float = 0.0,
    num_items_in_batch: torch.Tensor | int | None = None,
    return_argmax: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=-100, label_smoothing=...)` over
    every row, computed `chunk_size` rows at a time: the full logits never exist.

    Args:
        hidden (`torch.Tensor` of shape `(..., hidden_size)`): the rows to project (fp32, bf16 or fp16).
        weight (`torch.Tensor` of shape `(vocab_size, hidden_size)`): the projection (a tied embedding matrix works
            too: its gradient goes to whichever parameter this is).
        targets (`torch.LongTensor` of shape `(...)`): class ids; `-100` rows are ignored.
        bias (`torch.Tensor` of shape `(vocab_size,)`, *optional*): the projection's bias.
        chunk_size (`int`): rows per chunk; the loss's working memory is a few `chunk_size x vocab_size` buffers.
        label_smoothing (`float`): as `F.cross_entropy`'s (`(1 - e) * nll + e * mean over classes of -log p`).
        num_items_in_batch (`torch.Tensor` or `int`, *optional*): divide the summed loss by this instead of by the
            number of valid targets (transformers' `Trainer` normalisation over gradient-accumulation steps, as in
            `ForCausalLMLoss`).
        return_argmax (`bool`): also return each row's argmax over the vocabulary (in the logits' dtype, as
            `logits.argmax(-1)`), shaped like `targets`. Rows with ignored targets are then projected too.

    Returns:
        The fp32 loss (zero, with zero gradients, when every target is ignored), and the argmax with `return_argmax`.
    """
    _check_inputs(hidden, weight, targets, bias, chunk_size, label_smoothing)
    flat_targets = targets.reshape(-1).to(hidden.device)
    num_valid = int((flat_targets != IGNORE_INDEX).sum())
    if num_valid == 0:
        divisor = 1  # no target: the summed loss and every gradient are zero; dividing by zero would make them NaN
    elif num_items_in_batch is not None:
        divisor = num_items_in_batch.to(hidden.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    else:
        divisor = num_valid
    loss, argmax = ChunkedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_targets, chunk_size, float(label_smoothing), divisor,
        return_argmax,
    )  # fmt: skip
    return (loss, argmax.view(targets.shape)) if return_argmax else loss


def head_cross_entropy(projection: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, **kwargs):
    """`linear_cross_entropy` with the weight and bias of a model's head projection (an `nn.Linear`).

    The head's forward never runs: its parameters are read directly. Heads whose forward does more than
    `F.linear` (a PEFT/LoRA wrapper, a quantized linear, tensor-parallel or offloading hooks) would be computed
    wrongly, so they are refused.
    """
    if type(projection) is not nn.Linear or projection._forward_hooks or projection._forward_pre_hooks:
        raise ValueError(
            f"cross_entropy_chunk_size computes the loss from the head's weight directly, which needs a plain "
            f"nn.Linear without hooks; got {type(projection).__name__}"
            f"{' with forward hooks' if type(projection) is nn.Linear else ''} (LoRA, quantization, tensor "
            "parallelism or offloading change what the head computes). Set cross_entropy_chunk_size=None."
        )
    if projection.weight.device.type == "meta":
        raise ValueError("cross_entropy_chunk_size needs the head's weight in memory, and it is offloaded (meta "
                         "device). Set cross_entropy_chunk_size=None.")
    hidden = hidden.to(projection.weight.device)
    return linear_cross_entropy(hidden, projection.weight, targets, projection.bias, **kwargs)


def _check_inputs(hidden, weight, targets, bias, chunk_size, label_smoothing) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}.")
    if not (hidden.is_floating_point() and weight.is_floating_point()) or weight.dim() != 2:
        raise ValueError(f"hidden and weight must be floating point, weight 2-D; got {hidden.dtype} and a "
                         f"{weight.dim()}-D {weight.dtype} weight.")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1] or hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be targets' shape {tuple(targets.shape)} plus the "
                         f"weight's input size {weight.shape[1]}.")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},).")
    if targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"targets must be integer class ids, got {targets.dtype}.")
    out_of_range = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= weight.shape[0]))
    if out_of_range.any():
        raise ValueError(f"targets must be class ids in [0, {weight.shape[0]}) or {IGNORE_INDEX} (ignored), got "
                         f"{targets[out_of_range][0].item()}.")
