"""`attn_implementation="agillm"` (`kernels/attention.py`, `kernels/triton_attention.py`) against eager attention.

The Triton kernels run in triton's CPU interpreter, which needs `TRITON_INTERPRET=1` in the environment before
triton is first imported (its own `tl.zeros`, `tl.max`, ... are `@triton.jit` functions decorated at that moment,
and torch / transformers import triton early). So the tests named `*triton*` run only in a process started with it:
`test_triton_tests_pass_in_interpreter` starts that process (`pytest -k triton` on this file) and reports its
result; nothing in this process sees the variable. Shapes are tiny (the interpreter runs each tile in numpy) but
span several 16x16 tiles, so empty, partial and full tiles and the GQA head grouping are all exercised.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.masking_utils import (
    and_masks,
    causal_mask_function,
    chunked_causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

import kernels
from conftest import build_tiny_model
from kernels import attention as agillm_attention
from attention_agillm import eager_attention_forward
from layers_agillm import alibi_bias, alibi_slopes


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 process of test_triton_tests_pass_in_interpreter"
)
if INTERPRETED:
    from kernels import triton_attention as triton_attention_module
    from kernels.triton_attention import triton_attention


def test_triton_tests_pass_in_interpreter():
    if INTERPRETED:
        pytest.skip("this is the interpreter process")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-k", "triton", __file__],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert result.stdout.count("PASSED") >= 18, result.stdout[-6000:]  # every Triton test ran, none skipped


BATCH, HEADS, KV_HEADS, SEQ, HEAD_DIM = 2, 4, 2, 24, 16


class _Module(torch.nn.Module):
    """What attention functions read off the attention layer."""

    def __init__(self, heads=HEADS, kv_heads=KV_HEADS):
        super().__init__()
        self.num_key_value_groups = heads // kv_heads
        self.is_causal = True


def _padding(batch=BATCH, seq=SEQ):
    padding = torch.ones(batch, seq, dtype=torch.bool)
    padding[0, :5] = False  # left padding: the first 5 queries of sequence 0 see no key at all
    return padding


def _blocks(block_size, seq=SEQ):
    """SAT / block NAT: a query sees its own block both ways and earlier blocks (transformers' block_sequence_ids)."""
    block_of = torch.arange(seq) // block_size
    return lambda b, h, q, kv: block_of[kv] <= block_of[q]


MASKS = {  # name -> (mask function, 2-D padding mask or None), built with transformers' own sdpa_mask
    "causal_padded": (causal_mask_function, _padding()),
    "sliding": (sliding_window_causal_mask_function(9), None),
    "chunked_padded": (chunked_causal_mask_function(8, torch.zeros(BATCH, dtype=torch.long)), _padding()),
    "sat_blocks": (and_masks(_blocks(2), lambda b, h, q, kv: q >= 0), None),
    "nat_blocks_padded": (_blocks(8), _padding()),
    "bidirectional_padded": (lambda b, h, q, kv: q >= 0, _padding()),
}


def build_mask(name, seq=SEQ):
    mask_function, padding = MASKS[name]
    return sdpa_mask(BATCH, seq, seq, mask_function=mask_function, attention_mask=padding, allow_is_causal_skip=False)


def eager_reference(query, key, value, mask, scale, bias=None):
    """`eager_attention_forward` with a boolean mask (and optional ALiBi bias) made additive, fp32."""
    additive = torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, torch.finfo(torch.float32).min)
    if bias is not None:
        additive = additive + bias
    module = _Module(query.shape[1], key.shape[1]).eval()
    out, _ = eager_attention_forward(module, query, key, value, additive, scaling=scale)
    return out


def qkv(heads=HEADS, kv_heads=KV_HEADS, seq=SEQ, head_dim=HEAD_DIM, value_dim=None, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(BATCH, heads, seq, head_dim), (BATCH, kv_heads, seq, head_dim),
              (BATCH, kv_heads, seq, value_dim or head_dim)]
    return [torch.randn(shape, generator=generator).to(dtype).requires_grad_() for shape in shapes]


def outputs_and_grads(fn, tensors, visible_rows):
    """Output on rows that see a key, and the input gradients of a fixed random projection of those rows."""
    out = fn(*tensors)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    loss = (out.float() * weight * visible_rows[:, :, None, None]).sum()
    return out, torch.autograd.grad(loss, tensors)


def assert_matches_eager(fn, tensors, mask, scale, bias=None, atol=2e-5):
    visible_rows = mask.any(-1)[:, 0]  # [B, Q]: queries that see at least one key
    out, grads = outputs_and_grads(fn, tensors, visible_rows)
    ref_out, ref_grads = outputs_and_grads(lambda q, k, v: eager_reference(q, k, v, mask, scale, bias), tensors,
                                           visible_rows)
    torch.testing.assert_close(out[visible_rows], ref_out[visible_rows], rtol=1e-5, atol=atol)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=atol)
    # rows without a visible key: zeros, as sdpa gives with a boolean mask (eager would average all values)
    assert torch.equal(out[~visible_rows], torch.zeros_like(out[~visible_rows]))
    return out


# ------------------------------------------------------------------------------------------------ Triton kernel


@needs_interpreter
@pytest.mark.parametrize("pattern", sorted(MASKS))
def test_triton_kernel_matches_eager_on_masks(pattern):
    mask = build_mask(pattern)
    tensors = qkv()
    assert_matches_eager(lambda q, k, v: triton_attention(q, k, v, mask, 0.3), tensors, mask, 0.3)


@needs_interpreter
@pytest.mark.parametrize("kind", ["alibi", "agillm_alibi"])
def test_triton_kernel_computes_both_alibi_variants(kind):
    """Left padding shifts key positions as the model's `_key_positions` does; the kernel reads them per batch."""
    mask = build_mask("bidirectional_padded")
    key_positions = (_padding().long().cumsum(-1) - 1).clamp(min=0)
    slopes = alibi_slopes(HEADS)
    bias = alibi_bias(slopes, key_positions, key_positions, kind)
    tensors = qkv()
    fn = lambda q, k, v: triton_attention(q, k, v, mask, 0.25, slopes, key_positions, key_positions, kind)  # noqa
    assert_matches_eager(fn, tensors, mask, 0.25, bias)


@needs_interpreter
def test_triton_kernel_in_kernel_causal_mqa_and_value_width():
    """mask "causal" (no mask tensor: sdpa's is_causal), one shared K/V head, a value head narrower than q/k (MLA)."""
    tensors = qkv(kv_heads=1, head_dim=24, value_dim=12)
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()[None, None].expand(BATCH, 1, -1, -1)
    assert_matches_eager(lambda q, k, v: triton_attention(q, k, v, "causal", 0.2), tensors, causal, 0.2)


@needs_interpreter
def test_triton_kernel_additive_float_mask_and_full_attention():
    """A float mask (ALiBi folded in by a caller) is added as is; no mask at all attends everywhere."""
    tensors = qkv(seq=20)
    slopes = alibi_slopes(HEADS)
    positions = torch.arange(20)[None].expand(BATCH, -1)
    bias = alibi_bias(slopes, positions, positions, "alibi")
    everything = torch.ones(BATCH, 1, 20, 20, dtype=torch.bool)
    assert_matches_eager(lambda q, k, v: triton_attention(q, k, v, bias, 0.3), tensors, everything, 0.3, bias)
    assert_matches_eager(lambda q, k, v: triton_attention(q, k, v, None, 0.3), tensors, everything, 0.3)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernel_half_precision(dtype):
    mask = build_mask("sliding")
    query, key, value = qkv(dtype=dtype)
    out = triton_attention(query, key, value, mask, 0.25)
    assert out.dtype == dtype
    expected = eager_reference(query.float(), key.float(), value.float(), mask, 0.25)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


@needs_interpreter
def test_triton_tile_kinds_summarise_the_mask():
    """0 = no query of the tile sees a key of it (skipped), 2 = all see all (mask not read), 1 = mixed."""
    mask = sdpa_mask(1, 48, 48, mask_function=sliding_window_causal_mask_function(16), allow_is_causal_skip=False)
    kinds = triton_attention_module.tile_kinds(mask, 16, 16)[0, 0]
    expected = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.int8)
    torch.testing.assert_close(kinds, expected)
    assert triton_attention_module.tile_kinds(torch.ones(1, 1, 20, 20, dtype=torch.bool), 16, 16)[0, 0].tolist() == [
        [2, 1], [1, 1]  # edge tiles count padding past the end as hidden: partial, bounds-checked in the kernel
    ]


@needs_interpreter
def test_triton_kernel_refuses_mismatched_input():
    query, key, value = qkv(heads=3, kv_heads=2)
    with pytest.raises(ValueError, match="query heads"):
        triton_attention(query, key, value)
    query, key, value = qkv()
    with pytest.raises(ValueError, match="does not match"):
        triton_attention(query, key, value, torch.ones(1, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="alibi_slopes"):
        triton_attention(query, key, value, None, alibi_kind="alibi")


# ------------------------------------------------------------------------------------------------ CPU path


@pytest.mark.parametrize("pattern", ["causal_padded", "sliding", "nat_blocks_padded"])
def test_cpu_path_matches_eager(pattern):
    mask = build_mask(pattern)
    tensors = qkv()
    assert_matches_eager(lambda q, k, v: agillm_attention.torch_attention(q, k, v, mask, 0.3), tensors, mask, 0.3)


def test_cpu_path_alibi_and_causal():
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()[None, None].expand(BATCH, 1, -1, -1)
    positions = torch.arange(SEQ)[None].expand(BATCH, -1)
    slopes = alibi_slopes(HEADS)
    for kind in ("alibi", "agillm_alibi"):
        bias = alibi_bias(slopes, positions, positions, kind)
        alibi = (slopes, positions, positions, kind)
        fn = lambda q, k, v: agillm_attention.torch_attention(q, k, v, "causal", 0.3, alibi=alibi)  # noqa: E731
        assert_matches_eager(fn, qkv(), causal, 0.3, bias)


def test_cpu_flex_route_matches_sdpa_route():
    """Inference prefill >= FLEX_MIN_LENGTH goes to compiled flex: two 128-blocks per side, so its block mask has
    hidden, partial and full blocks; left padding, a window and ALiBi (as `score_mod`) on top. The registered mask
    function's masks carry their index rule, which flex evaluates; other masks stay on sdpa."""
    seq = agillm_attention.FLEX_MIN_LENGTH
    padding = torch.ones(BATCH, seq, dtype=torch.bool)
    padding[0, :37] = False
    arguments = dict(mask_function=sliding_window_causal_mask_function(100), attention_mask=padding,
                     allow_is_causal_skip=False)
    positions = (padding.long().cumsum(-1) - 1).clamp(min=0)
    alibi = (alibi_slopes(HEADS), positions, positions, "agillm_alibi")
    query, key, value = (t.detach() for t in qkv(seq=seq))
    index_rule_mask = agillm_attention.agillm_mask(BATCH, seq, seq, **arguments)
    plain_mask = sdpa_mask(BATCH, seq, seq, **arguments)
    assert torch.equal(index_rule_mask, plain_mask)
    assert not agillm_attention._flex_fits(query, key, value, plain_mask)  # no index rule: sdpa
    mask = index_rule_mask
    assert agillm_attention._flex_fits(query, key, value, mask)
    with torch.no_grad():
        flex = agillm_attention.flex_attention(query, key, value, mask, 0.25, alibi)
        expected = agillm_attention.sdpa_attention(query, key, value, mask, 0.25, alibi=alibi)
        routed = agillm_attention.torch_attention(query, key, value, mask, 0.25, alibi=alibi)
    visible_rows = mask.any(-1)[:, 0]
    torch.testing.assert_close(flex[visible_rows], expected[visible_rows], rtol=1e-5, atol=1e-5)
    assert torch.equal(flex[~visible_rows], torch.zeros_like(flex[~visible_rows]))
    assert torch.equal(routed, flex)
    assert not agillm_attention._flex_fits(*qkv(seq=seq), mask)  # gradients wanted: sdpa (no flex backward on CPU)


# ------------------------------------------------------------------------------------------------ whole model


def _hidden_and_grads(model, implementation, input_ids, attention_mask, objective="ar"):
    """Trunk output on real tokens and every parameter gradient of a fixed projection of it."""
    model.set_attn_implementation(implementation)
    model.zero_grad()
    hidden = model.model(input_ids, attention_mask=attention_mask, objective=objective).last_hidden_state
    weight = torch.linspace(-1, 1, hidden.shape[-1])
    (hidden * weight * attention_mask[..., None]).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return hidden.detach()[attention_mask.bool()], grads


MODEL_CASES = {  # name -> (config overrides, objective)
    "sliding_and_full": ({"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4}, "ar"),
    "chunked_and_full": ({"layer_types": ["chunked_attention", "full_attention"], "attention_chunk_size": 4}, "ar"),
    "mqa": ({"num_key_value_heads": 1}, "ar"),
    "alibi": ({"position_embedding_type": "alibi"}, "ar"),
    "agillm_alibi_sat": ({"position_embedding_type": "agillm_alibi"}, "sat"),
    "alibi_nat_bidirectional": ({"position_embedding_type": "alibi", "nat_block_size": None}, "nat"),
    "nat_blocks": ({"nat_block_size": 4}, "nat"),
    # DeepSeek MLA: value heads narrower than query/key heads
    "mla": ({"kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 12, "head_dim": 8,
             "num_key_value_heads": 4}, "ar"),
}


@pytest.fixture(scope="module", autouse=True)
def registered():
    kernels.enable()
    yield
    kernels.disable()


def _check_model_case(case):
    overrides, objective = MODEL_CASES[case]
    model = build_tiny_model(**overrides).train()
    input_ids = torch.randint(4, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones(2, 11, dtype=torch.long)
    attention_mask[0, :3] = 0  # left padding
    expected, expected_grads = _hidden_and_grads(model, "eager", input_ids, attention_mask, objective)
    hidden, grads = _hidden_and_grads(model, "agillm", input_ids, attention_mask, objective)
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=5e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_model_on_cpu_path_matches_eager(case):
    assert not agillm_attention.uses_triton(torch.zeros(1))
    _check_model_case(case)


@needs_interpreter
@pytest.mark.parametrize("case", ["sliding_and_full", "agillm_alibi_sat", "alibi", "mla"])
def test_model_on_triton_kernel_matches_eager(case):
    assert agillm_attention.uses_triton(torch.zeros(1))
    _check_model_case(case)


@pytest.mark.parametrize("path", ["cpu", pytest.param("triton", marks=needs_interpreter)])
def test_cached_generate_matches_uncached_and_sdpa(path):
    """In the interpreter process ("triton" is in the test id) the registered function dispatches to the kernel."""
    assert agillm_attention.uses_triton(torch.zeros(1)) == (path == "triton")
    model = build_tiny_model(layer_types=["sliding_attention", "full_attention"], sliding_window=4)
    input_ids = torch.randint(4, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0  # left padding; the 4-token window is passed during decoding
    settings = dict(attention_mask=attention_mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    sdpa_tokens = model.generate(input_ids, **settings)
    model.set_attn_implementation("agillm")
    cached = model.generate(input_ids, **settings)
    uncached = model.generate(input_ids, use_cache=False, **settings)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, sdpa_tokens)


def test_model_reads_what_the_registered_function_declares(make_config):
    """ALiBi goes to the kernel as kwargs only for a function that `computes_alibi`; stock backends keep the mask."""
    from attention_agillm import attention_function_declares

    config = make_config(position_embedding_type="alibi")
    for implementation, declared in (("agillm", True), ("sdpa", False), ("flex_attention", False)):
        config._attn_implementation = implementation
        assert attention_function_declares(config, "computes_alibi") is declared
        assert attention_function_declares(config, "supports_block_masks") is declared
