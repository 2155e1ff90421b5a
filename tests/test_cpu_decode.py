"""Weight-only int8 / int4 linears (`kernels/quantized_linear.py`) against fp32 math on their dequantized weights.

The packed ATen kernels must compute exactly `x @ dequantized(W).T` (fp32 activations: to fp32 rounding; bf16
activations: to bf16 rounding), whole quantized models must generate what a float model holding the dequantized
weights generates, and the transformers integration (quantization config, tied head, static cache, saving) must
behave as documented.
"""

import pytest
import torch
from torch import nn

import kernels
from kernels.quantized_linear import (
    AgillmWeightOnlyConfig,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    dequantize_int4,
    dequantized_reference_linear,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
    quantize_weights,
)

from conftest import build_tiny_model


QUANTIZED_TYPES = (Int8WeightOnlyLinear, Int4WeightOnlyLinear)


def random_linear(in_features: int, out_features: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


# ------------------------------------------------------------------------------------------ single layers


def test_int8_quantization_is_within_half_a_step():
    weight = random_linear(96, 40).weight
    qweight, scales = quantize_int8_per_channel(weight)
    assert qweight.dtype == torch.int8 and scales.shape == (40,)
    error = (qweight.float() * scales[:, None] - weight).abs()
    assert (error <= scales[:, None] / 2 + 1e-7).all()
    assert (qweight.abs().amax(dim=1) == 127).all()  # each row's largest weight uses the full range


def test_int4_quantization_is_within_half_a_step():
    weight = random_linear(128, 24).weight
    codes, scales, zeros = quantize_int4_groupwise(weight, 32)
    assert codes.min() >= 0 and codes.max() <= 15 and scales.shape == zeros.shape == (24, 4)
    error = (dequantize_int4(codes, scales, zeros, 32) - weight).abs().reshape(24, 4, 32)
    assert (error <= scales[..., None] / 2 + 1e-6).all()


@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 64), (1, 1, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_fp32_is_exact_on_dequantized_weights(shape, bias):
    layer = Int8WeightOnlyLinear.from_linear(random_linear(64, 48, bias), compute_dtype=torch.float32)
    x = torch.randn(shape)
    out = layer(x)
    assert out.shape == (*shape[:-1], 48) and out.dtype == torch.float32
    torch.testing.assert_close(out, dequantized_reference_linear(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("out_features", [16, 48, 96])
def test_int4_linear_fp32_is_exact_on_dequantized_weights(group_size, out_features):
    linear = random_linear(128, out_features)
    layer = Int4WeightOnlyLinear.from_linear(linear, group_size, compute_dtype=torch.float32)
    # the packed weight decodes to exactly the quantizer's codes, scales and zeros
    codes, scales, zeros = quantize_int4_groupwise(linear.weight, group_size)
    torch.testing.assert_close(layer.dequantized_weight(), dequantize_int4(codes, scales, zeros, group_size),
                               rtol=0, atol=1e-6)
    x = torch.randn(2, 3, 128)
    torch.testing.assert_close(layer(x), dequantized_reference_linear(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_class", QUANTIZED_TYPES)
def test_bf16_compute_matches_reference_to_bf16_rounding(layer_class):
    layer = layer_class.from_linear(random_linear(128, 64), compute_dtype=torch.bfloat16)
    x = torch.randn(4, 128)
    out = layer(x)
    assert out.dtype == torch.float32  # activations are cast for the kernel only
    reference = dequantized_reference_linear(layer, x)
    torch.testing.assert_close(out, reference, rtol=1e-2, atol=1e-2 * reference.abs().max().item())


def test_int4_rejects_unsupported_groups_and_widths():
    with pytest.raises(ValueError, match="group_size must be one of"):
        Int4WeightOnlyLinear.from_linear(random_linear(96, 8), group_size=48)
    with pytest.raises(ValueError, match="divisible by group_size"):
        Int4WeightOnlyLinear.from_linear(random_linear(96, 8), group_size=64)
    with pytest.raises(ValueError, match="bits must be one of"):
        AgillmWeightOnlyConfig(bits=3)
    layer = Int8WeightOnlyLinear.from_linear(random_linear(16, 8))
    with pytest.raises(ValueError, match="expects 16 input features"):
        layer(torch.randn(2, 17))


# ------------------------------------------------------------------------------------------ whole models


def dequantized_float_twin(quantized: nn.Module, original: nn.Module) -> nn.Module:
    """`original` with every layer that `quantized` quantized replaced by an `nn.Linear` on the dequantized weight.

    The head gets its own (untied) float copy; the embedding keeps the original, exact weights.
    """
    for name, module in quantized.named_modules():
        if isinstance(module, QUANTIZED_TYPES):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.dequantized_weight())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(original.get_submodule(parent), child, linear)
    return original


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_generates_as_its_dequantized_reference(bits):
    model = quantize_weights(build_tiny_model(seed=1), bits=bits, group_size=32, compute_dtype=torch.float32)
    reference = dequantized_float_twin(model, build_tiny_model(seed=1))
    layers = [name for name, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES)]
    assert "lm_head" in layers and len(layers) == 1 + 2 * 7  # head + 2 layers x (q, k, v, o, gate, up, down)
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
        kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_tied_head_is_quantized_and_embedding_stays_exact():
    original = build_tiny_model(seed=2)
    assert original.lm_head.weight is original.model.embed_tokens.weight  # tiny models tie by default
    embedding = original.model.embed_tokens.weight.detach().clone()
    model = quantize_weights(build_tiny_model(seed=2), bits=8, compute_dtype=torch.float32)
    assert isinstance(model.lm_head, Int8WeightOnlyLinear)
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # lookup: exact float rows
    torch.testing.assert_close(model.lm_head.dequantized_weight(), embedding, rtol=0,
                               atol=embedding.abs().max().item() / 254 + 1e-7)
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        before = model(ids).logits
        model.tie_weights()  # must not re-attach the float embedding to the quantized head
        assert not hasattr(model.lm_head, "weight")
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_static_cache_generate_matches_dynamic_cache(bits):
    model = quantize_weights(build_tiny_model(seed=3), bits=bits, group_size=32)
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    kwargs = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        dynamic = model.generate(ids, **kwargs)
        static = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(dynamic, static)


def test_from_pretrained_with_quantization_config_as_remote_code(tmp_path):
    from transformers import AutoModelForCausalLM

    build_tiny_model(seed=4).save_pretrained(tmp_path)
    kernels.enable()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            tmp_path, trust_remote_code=True,
            quantization_config=AgillmWeightOnlyConfig(bits=4, group_size=32, compute_dtype="float32"),
        ).eval()
    finally:
        kernels.disable()
    assert type(loaded).__module__.startswith("transformers_modules.")  # the folder's own code, not the repo's
    assert isinstance(loaded.lm_head, Int4WeightOnlyLinear)
    assert not any(type(m) is nn.Linear for m in loaded.modules())
    assert loaded.config.quantization_config.bits == 4
    # the same layers as quantizing an already loaded float model
    expected = quantize_weights(build_tiny_model(seed=4), bits=4, group_size=32, compute_dtype="float32")
    ids = torch.randint(3, 128, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected(ids).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("how", ["quantize_weights", "from_pretrained"])
def test_saving_a_quantized_model_fails_clearly_and_writes_no_weights(tmp_path, how):
    from transformers import AutoModelForCausalLM

    if how == "quantize_weights":
        model = quantize_weights(build_tiny_model(seed=5), bits=8)
    else:
        build_tiny_model(seed=5).save_pretrained(tmp_path / "float")
        kernels.enable()
        try:
            model = AutoModelForCausalLM.from_pretrained(
                tmp_path / "float", trust_remote_code=True, quantization_config={"quant_method": "agillm_weight_only"}
            )
        finally:
            kernels.disable()
    with pytest.raises(ValueError, match="cannot be saved.*Save the float model"):
        model.save_pretrained(tmp_path / "quantized")
    assert not list((tmp_path / "quantized").glob("*.safetensors"))
