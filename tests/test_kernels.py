"""Every kernel in `kernels/` against its plain-PyTorch reference, alone and plugged into a remote-code model."""

import pytest
import torch

import kernels
from configuration_agillm import AgillmConfig
from kernels import FusedRMSNorm, rms_norm_reference
from layers_agillm import AgillmRMSNorm
from modeling_agillm import AgillmForCausalLM


@pytest.mark.parametrize("shape", [(3, 7, 64), (1, 1, 576), (2, 5, 4, 16)])
def test_fused_rms_norm_matches_reference_and_module(shape):
    torch.manual_seed(0)
    fused = FusedRMSNorm(shape[-1], eps=1e-5)
    eager = AgillmRMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        fused.weight.normal_()
        eager.weight.copy_(fused.weight)
    x = torch.randn(shape) * 3
    expected = rms_norm_reference(x, fused.weight, 1e-5)
    torch.testing.assert_close(eager(x), expected, rtol=0, atol=0)  # the reference is the module's own math
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)


def test_fused_rms_norm_backward_matches_reference():
    torch.manual_seed(0)
    fused = FusedRMSNorm(32)
    x = torch.randn(4, 6, 32, requires_grad=True)
    fused(x).square().sum().backward()
    grad_fused, grad_weight_fused = x.grad.clone(), fused.weight.grad.clone()
    x.grad, fused.weight.grad = None, None
    rms_norm_reference(x, fused.weight, fused.variance_epsilon).square().sum().backward()
    torch.testing.assert_close(grad_fused, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_weight_fused, fused.weight.grad, rtol=1e-5, atol=1e-5)


def test_enable_patches_remote_code_model(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = AgillmConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, use_qk_norm=True)
    model = AgillmForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, 64, (2, 9))
    expected = model(ids).logits
    kernels.enable()
    try:
        patched = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    finally:
        kernels.disable()
    norms = [m for m in patched.modules() if "RMSNorm" in type(m).__name__]
    assert norms and all(isinstance(m, FusedRMSNorm) for m in norms)
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, expected, rtol=1e-4, atol=1e-4)
    unpatched = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert not any(isinstance(m, FusedRMSNorm) for m in unpatched.modules())
