"""Chunked ("fused") linear cross-entropy (losses_agillm.py) and `config.cross_entropy_chunk_size`.

The function is checked against `F.cross_entropy(F.linear(...).float())` on values and on the gradients of the
hidden states, the weight and the bias; the model with the field set against the same model without it (every head,
tied and untied projections, label smoothing, MTP, MoE router losses, `num_items_in_batch`), plus `Trainer` and a
saved folder loaded as remote code.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from conftest import TinyRows, build_tiny_model
from configuration_agillm import AgillmConfig
from losses_agillm import head_cross_entropy, linear_cross_entropy
from modeling_agillm import AgillmForCausalLM


def random_problem(rows, hidden_size, vocab, bias=True, ignored=0.3, seed=0, dtype=torch.float32, leading=None):
    generator = torch.Generator().manual_seed(seed)
    shape = leading or (rows,)
    hidden = torch.randn(*shape, hidden_size, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=generator) * 0.5).to(dtype).requires_grad_()
    bias = torch.randn(vocab, generator=generator).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, shape, generator=generator)
    targets[torch.rand(shape, generator=generator) < ignored] = -100
    return hidden, weight, bias, targets


def stock_loss(hidden, weight, bias, targets, label_smoothing=0.0, num_items_in_batch=None):
    """The model's stock path: fp32 cross-entropy of the full logits (zero with grad when nothing is a target)."""
    logits = F.linear(hidden, weight, bias).float().reshape(-1, weight.shape[0])
    targets = targets.reshape(-1)
    if not (targets != -100).any():
        return logits.sum() * 0.0
    if num_items_in_batch is not None:
        return F.cross_entropy(logits, targets, reduction="sum", label_smoothing=label_smoothing) / num_items_in_batch
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def gradients(loss, hidden, weight, bias):
    inputs = [hidden, weight] + ([bias] if bias is not None else [])
    return torch.autograd.grad(loss, inputs)


def assert_matches_stock(hidden, weight, bias, targets, chunk_size, atol=1e-6, rtol=1e-5, **options):
    for return_argmax in (False, True):  # dropping the ignored rows, and keeping every row for the argmax
        expected = stock_loss(hidden, weight, bias, targets, **options)
        result = linear_cross_entropy(
            hidden, weight, targets, bias, chunk_size=chunk_size, return_argmax=return_argmax, **options
        )
        loss = result[0] if return_argmax else result
        torch.testing.assert_close(loss, expected, atol=atol, rtol=rtol)
        for got, want in zip(gradients(loss, hidden, weight, bias), gradients(expected, hidden, weight, bias)):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
        if return_argmax:
            assert torch.equal(result[1], F.linear(hidden, weight, bias).argmax(-1))


# --------------------------------------------------------------------------------------------------- the function


@pytest.mark.parametrize(
    "rows,hidden_size,vocab,chunk_size,bias,label_smoothing",
    [
        (37, 16, 50, 8, True, 0.0),  # the chunk does not divide the rows
        (37, 16, 50, 8, False, 0.1),
        (12, 8, 33, 64, True, 0.2),  # one chunk larger than every row
        (9, 8, 20, 1, True, 0.0),  # one row per chunk
        (64, 24, 130, 16, False, 0.0),  # the chunk divides the rows
    ],
)
def test_loss_and_gradients_match_stock_cross_entropy(rows, hidden_size, vocab, chunk_size, bias, label_smoothing):
    hidden, weight, bias, targets = random_problem(rows, hidden_size, vocab, bias=bias)
    assert_matches_stock(hidden, weight, bias, targets, chunk_size, label_smoothing=label_smoothing)


def test_batched_rows_without_ignored_targets():
    hidden, weight, bias, targets = random_problem(0, 12, 40, ignored=0.0, leading=(3, 7))
    assert_matches_stock(hidden, weight, bias, targets, chunk_size=5, label_smoothing=0.05)


@pytest.mark.parametrize("num_items_in_batch", [torch.tensor(50), 50])
def test_num_items_in_batch_divides_the_summed_loss(num_items_in_batch):
    hidden, weight, bias, targets = random_problem(30, 8, 24)
    assert_matches_stock(hidden, weight, bias, targets, chunk_size=7, num_items_in_batch=num_items_in_batch)


@pytest.mark.parametrize("num_items_in_batch", [None, torch.tensor(4)])
@pytest.mark.parametrize("return_argmax", [False, True])
def test_all_ignored_targets_give_zero_loss_and_zero_gradients(return_argmax, num_items_in_batch):
    hidden, weight, bias, targets = random_problem(10, 8, 16, ignored=1.0)
    result = linear_cross_entropy(
        hidden, weight, targets, bias, chunk_size=3, return_argmax=return_argmax, num_items_in_batch=num_items_in_batch
    )
    loss = result[0] if return_argmax else result
    assert loss.item() == 0.0
    for grad in gradients(loss, hidden, weight, bias):
        assert torch.isfinite(grad).all() and not grad.any()


def test_empty_rows_give_zero_loss():
    hidden, weight, bias, targets = random_problem(0, 8, 16, leading=(2, 0))
    loss = linear_cross_entropy(hidden, weight, targets, bias, chunk_size=4)
    assert loss.item() == 0.0 and not any(grad.any() for grad in gradients(loss, hidden, weight, bias))


def test_tied_weight_receives_both_gradients():
    """A tied head: the same matrix is the embedding and the projection; its gradient is the sum of both uses."""
    generator = torch.Generator().manual_seed(0)
    embedding = nn.Parameter(torch.randn(30, 8, generator=generator))
    ids = torch.randint(0, 30, (2, 9), generator=generator)
    targets = torch.roll(ids, -1, dims=1)
    grads = []
    for fused in (False, True):
        hidden = torch.tanh(F.embedding(ids, embedding))
        loss = (
            linear_cross_entropy(hidden, embedding, targets, chunk_size=4)
            if fused
            else stock_loss(hidden, embedding, None, targets)
        )
        grads.append(torch.autograd.grad(loss, embedding)[0])
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_bf16_inputs_compute_the_logits_in_bf16_and_the_rest_in_fp32():
    hidden, weight, bias, targets = random_problem(40, 16, 64, dtype=torch.bfloat16)
    # The logits are the stock bf16 matmul's; everything after them is fp32, so only the bf16 gradients round.
    expected = stock_loss(hidden, weight, bias, targets, label_smoothing=0.1)
    loss = linear_cross_entropy(hidden, weight, targets, bias, chunk_size=16, label_smoothing=0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(gradients(loss, hidden, weight, bias), gradients(expected, hidden, weight, bias)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_under_autocast_fp32_weights_get_fp32_gradients_of_the_bf16_logits():
    hidden, weight, bias, targets = random_problem(40, 16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = stock_loss(hidden, weight, bias, targets)
        loss = linear_cross_entropy(hidden, weight, targets, bias, chunk_size=16)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(gradients(loss, hidden, weight, bias), gradients(expected, hidden, weight, bias)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-2, rtol=2e-2)


class LargestTensor(TorchDispatchMode):
    """Records the most elements any operator produced while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(output):
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return output


@pytest.mark.parametrize("return_argmax", [False, True])
def test_no_tensor_grows_with_rows_times_vocab(return_argmax):
    rows, hidden_size, vocab, chunk_size = 256, 8, 512, 16  # logits: 131072 numbers; a chunk of them: 8192
    hidden, weight, bias, targets = random_problem(rows, hidden_size, vocab)
    with LargestTensor() as largest:
        result = linear_cross_entropy(
            hidden, weight, targets, bias, chunk_size=chunk_size, label_smoothing=0.1, return_argmax=return_argmax
        )
        loss = result[0] if return_argmax else result
        gradients(loss, hidden, weight, bias)
    assert largest.numel <= chunk_size * vocab < rows * vocab


@pytest.mark.parametrize(
    "arguments,message",
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": True}, "chunk_size"),
        ({"chunk_size": 4, "label_smoothing": 1.5}, "label_smoothing"),
        ({"chunk_size": 4, "targets": torch.full((6,), 16)}, "class ids"),
        ({"chunk_size": 4, "targets": torch.zeros(5, dtype=torch.long)}, "shape"),
        ({"chunk_size": 4, "targets": torch.zeros(6)}, "integer"),
    ],
)
def test_invalid_input_is_refused(arguments, message):
    hidden, weight, bias, targets = random_problem(6, 8, 16)
    arguments = {"targets": targets, **arguments}
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(hidden, weight, bias=bias, **arguments)


def test_a_head_whose_forward_is_not_a_plain_linear_is_refused():
    hidden, _, _, targets = random_problem(6, 8, 16)
    hooked = nn.Linear(8, 16)
    hooked.register_forward_hook(lambda module, args, output: output * 2)
    for head in (hooked, nn.Sequential(nn.Linear(8, 16))):
        with pytest.raises(ValueError, match="plain nn.Linear"):
            head_cross_entropy(head, hidden, targets, chunk_size=4)


# --------------------------------------------------------------------------------------------------- the model


def tiny_model(chunk_size, seed=0, **overrides) -> AgillmForCausalLM:
    fields = {"vocab_size": 64, "intermediate_size": 48, "cross_entropy_chunk_size": chunk_size}
    return build_tiny_model(seed, **{**fields, **overrides}).train()


def batch(rows=2, length=12, seed=1):
    ids = torch.randint(4, 64, (rows, length), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :3] = -100  # a padded prompt
    return ids, labels


def step(model, ids, labels, **kwargs):
    """One training forward + backward; the NAT masks are drawn from the same seed in every call."""
    torch.manual_seed(123)
    output = model(ids, labels=labels, **kwargs)
    output.loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters() if param.grad is not None}
    return output, grads


def assert_same_training_step(overrides, chunk_size=5, labels=None, **kwargs):
    ids, batch_labels = batch()
    labels = batch_labels if labels is None else labels
    stock, stock_grads = step(tiny_model(None, **overrides), ids, labels, **kwargs)
    fused, fused_grads = step(tiny_model(chunk_size, **overrides), ids, labels, **kwargs)
    assert fused.logits is None and stock.logits is not None
    torch.testing.assert_close(fused.loss, stock.loss, atol=2e-6, rtol=1e-6)
    assert (fused.objective_losses or {}).keys() == (stock.objective_losses or {}).keys()
    for name, value in (stock.objective_losses or {}).items():
        torch.testing.assert_close(fused.objective_losses[name], value, atol=2e-6, rtol=1e-6, msg=name)
    assert fused_grads.keys() == stock_grads.keys()
    for name, grad in stock_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    return stock, fused


@pytest.mark.parametrize("tied", [True, False])
def test_ar_loss_and_gradients_equal_the_stock_path(tied):
    assert_same_training_step({"tie_word_embeddings": tied, "head_bias": not tied})


def test_ar_with_label_smoothing_and_shift_labels():
    ids, labels = batch()
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    assert_same_training_step({"label_smoothing": 0.1}, shift_labels=shift_labels)


def test_num_items_in_batch_is_honoured_for_ar():
    stock, fused = assert_same_training_step({}, num_items_in_batch=torch.tensor(40))
    ids, labels = batch()
    mean_loss = tiny_model(None)(ids, labels=labels).loss  # divided by the 20 real targets, not by 40
    torch.testing.assert_close(stock.loss * 40 / 20, mean_loss)


@pytest.mark.parametrize(
    "overrides",
    [
        {"heads": ["ar", "sat", "nat"]},  # tied, block NAT (nat_block_size=8)
        {"heads": ["ar", "sat", "nat"], "nat_block_size": 4, "sat_block_size": 3},
        {  # AGILLM 4.x layout: untied heads with biases, bidirectional NAT, smoothed AR and SAT
            "heads": ["ar", "sat", "nat"],
            "tie_word_embeddings": False,
            "head_bias": True,
            "nat_block_size": None,
            "label_smoothing": {"ar": 0.1, "sat": 0.1},
            "objective_weights": {"ar": 1.0, "sat": 0.5, "nat": 2.0},
        },
        {"heads": ["ar", "sat", "nat"], "sat_gate_loss": False},
    ],
)
def test_multi_objective_losses_and_gradients_equal_the_stock_path(overrides):
    assert_same_training_step(overrides)


@pytest.mark.parametrize("objective", ["sat", "nat"])
def test_single_objectives_equal_the_stock_path(objective):
    overrides = {"heads": ["ar", "sat", "nat"], "nat_block_size": None}
    stock, fused = assert_same_training_step(overrides, objective=objective)
    if objective == "sat":
        torch.testing.assert_close(fused.gate_logits, stock.gate_logits)


def test_sat_gate_targets_come_from_the_chunked_argmax():
    """Labels equal to the SAT head's own predictions make every gate target "emit the whole block" (class 1), except
    in a block with a wrong second token (class 0): a wrong argmax from the chunks would change the gate loss."""
    overrides = {"heads": ["ar", "sat", "nat"]}
    ids, labels = batch()
    with torch.no_grad():
        predicted = tiny_model(None, **overrides).eval()(ids, objective="sat").logits.argmax(-1)
    labels[:, 2:] = predicted[:, :-2]  # sat_block_size = 2: position t predicts token t + 2
    labels[1, 5] = (labels[1, 5] + 1) % 64
    assert_same_training_step(overrides, labels=labels, objective="sat")


def test_mtp_loss_equals_the_stock_path():
    stock, _ = assert_same_training_step({"num_mtp_layers": 2})
    assert set(stock.objective_losses) == {"ar", "mtp"}


def test_router_losses_are_unaffected():
    moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "output_router_logits": True,
           "router_z_loss_coef": 0.01}  # fmt: skip
    stock, fused = assert_same_training_step(moe)
    torch.testing.assert_close(fused.aux_loss, stock.aux_loss)


def test_eval_and_calls_without_labels_are_unchanged():
    ids, labels = batch()
    heads = ["ar", "sat", "nat"]
    fused, stock = tiny_model(4, heads=heads).eval(), tiny_model(None, heads=heads).eval()
    with torch.no_grad():
        for objective in ("ar", "sat", "nat"):
            for kwargs in ({"labels": labels}, {}):
                got, want = fused(ids, objective=objective, **kwargs), stock(ids, objective=objective, **kwargs)
                torch.testing.assert_close(got.logits, want.logits)
                if kwargs:
                    torch.testing.assert_close(got.loss, want.loss)
        assert fused.train()(ids).logits is not None  # training without labels still returns logits


@pytest.mark.parametrize("value", [0, -2, True, 2.5, "64"])
def test_invalid_chunk_sizes_are_refused(value):
    # values by AgillmConfig's validators, types by the config dataclass's field validation
    with pytest.raises(StrictDataclassError, match="cross_entropy_chunk_size"):
        AgillmConfig(cross_entropy_chunk_size=value)


def test_a_hooked_head_is_refused_while_training():
    model = tiny_model(4)
    model.lm_head.register_forward_hook(lambda module, args, output: output)
    with pytest.raises(ValueError, match="plain nn.Linear"):
        model(*batch()[:1], labels=batch()[1])


def test_trainer_runs_with_the_chunked_loss(tmp_path):
    model = tiny_model(8, heads=["ar", "sat", "nat"])

    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[], use_cpu=True)
    result = Trainer(model=model, args=args, train_dataset=TinyRows()).train()
    assert math.isfinite(result.training_loss)


def test_a_saved_folder_with_the_field_reloads_as_remote_code(tmp_path):
    model = tiny_model(6, heads=["ar", "sat", "nat"])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "losses_agillm.py").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32)
    assert type(reloaded).__module__.startswith("transformers_modules")  # the folder's own code
    assert reloaded.config.cross_entropy_chunk_size == 6
    ids, labels = batch()
    original, _ = step(model, ids, labels)
    loaded, _ = step(reloaded.train(), ids, labels)
    assert loaded.logits is None
    torch.testing.assert_close(loaded.loss, original.loss)
