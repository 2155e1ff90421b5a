"""`convert/` for the MoE families: transformers Mixtral and Qwen3-MoE into AGILLM, with exact parity.

Tiny random references (hidden 64, 3 layers, 4-8 experts, top-2) are converted both in memory (the live model's
3-D expert parameters) and through a saved folder (per-expert matrices, `block_sparse_moe.*.w1/w2/w3` for Mixtral,
stacked by the converter), loaded back as remote code, and must give the reference's fp32 logits within 1e-4 under
eager and sdpa attention and under every experts implementation. Also: greedy generation, dense layers
(`mlp_only_layers`, `decoder_sparse_step`), clear errors, LoRA on the 3-D experts (PEFT `target_parameters`) and
4-bit bitsandbytes loading on CPU. Budget: under 60 s on 2 cores.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

import convert.config_mapping
from convert import ConversionError, agillm_config_from, convert_to_agillm
from convert.__main__ import main as cli_main
from convert.converter import build_agillm_model, read_source
from layers_agillm import AgillmMLP
from modeling_agillm import AgillmForCausalLM


TOLERANCE = 1e-4  # max abs difference of fp32 logits
SEQ_LEN, LEFT_PAD, WINDOW = 40, 6, 8
EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts_per_tok=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# name: (reference class, config class, overrides of TINY)
CASES = {
    "mixtral-sliding": (
        MixtralForCausalLM,
        MixtralConfig,
        dict(intermediate_size=32, num_local_experts=4, sliding_window=WINDOW, tie_word_embeddings=False),
    ),
    "qwen3_moe-unnormalised-bias": (  # norm_topk_prob=False: the weights are the raw top-k softmax probabilities
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig,
        dict(intermediate_size=48, moe_intermediate_size=32, num_experts=8, norm_topk_prob=False, head_dim=16,
             attention_bias=True),
    ),
    "qwen3_moe-sliding-tied": (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig,
        dict(intermediate_size=48, moe_intermediate_size=32, num_experts=4, norm_topk_prob=True,
             use_sliding_window=True, sliding_window=WINDOW, tie_word_embeddings=True),
    ),
}
# Qwen3-MoE with dense MLP layers: layer 0 by `mlp_only_layers`, layer 2 by `decoder_sparse_step=2` (only layers
# 1 and 3 are sparse), on 4 layers.
DENSE_LAYERS_OVERRIDES = dict(
    num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=32, num_experts=4, mlp_only_layers=[0],
    decoder_sparse_step=2,
)


def _randomize(model):
    """Every parameter matters: norm weights off 1, and weights large enough that logits are O(1)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn_like(parameter)
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                parameter.copy_(0.2 * noise)
            else:
                parameter.copy_(0.15 * noise)
    return model.eval()


def reference_model(model_class, config_class, overrides, seed: int = 0):
    torch.manual_seed(seed)
    return _randomize(model_class(config_class(**{**TINY, **overrides})))


def case_reference(case: str):
    return reference_model(*CASES[case])


def left_padded_batch():
    """Two rows of SEQ_LEN tokens (five sliding windows), the second left-padded; position ids as `generate`'s."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, TINY["vocab_size"], (2, SEQ_LEN), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :LEFT_PAD] = 0
    input_ids[1, :LEFT_PAD] = TINY["pad_token_id"]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


@torch.no_grad()
def real_token_logits(model, batch) -> torch.Tensor:
    return model(**batch).logits[batch["attention_mask"].bool()]


def load_converted(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def convert_in_memory(reference) -> AgillmForCausalLM:
    return build_agillm_model(read_source(reference), torch.float32)


def assert_parity(reference, agillm, label: str) -> None:
    batch = left_padded_batch()
    expected, actual = real_token_logits(reference, batch), real_token_logits(agillm, batch)
    max_abs = (expected - actual).abs().max().item()
    print(f"{label}: max abs logit difference {max_abs:.3e} (logit std {expected.std():.2f})")
    assert expected.std() > 0.5, "reference logits too flat for the tolerance to mean anything"
    assert max_abs <= TOLERANCE


def mlp_layer_types_supported() -> bool:
    """Whether AGILLM's decoder layers honour `config.mlp_layer_types` (a dense MLP on a `dense` layer)."""
    config = agillm_config_from(MixtralConfig(**{**TINY, "num_hidden_layers": 2}, intermediate_size=8))
    config.mlp_layer_types = ["dense", "sparse"]
    with torch.device("meta"):
        model = AgillmForCausalLM(config)
    return isinstance(model.model.layers[0].mlp, AgillmMLP)


# --------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_reference(case, tmp_path):
    """Folder path (per-expert matrices stacked) and in-memory path (3-D parameters), eager and sdpa attention."""
    reference = case_reference(case)
    reference.save_pretrained(tmp_path / "source")
    saved_names = load_file(tmp_path / "source" / "model.safetensors").keys()
    assert any(".experts.0." in name for name in saved_names), "the saved folder should hold per-expert matrices"
    converted = {
        "folder": load_converted(convert_to_agillm(tmp_path / "source", tmp_path / "agillm")),
        "in-memory": convert_in_memory(reference),
    }
    for path, agillm in converted.items():
        assert agillm.config.num_experts == reference.config.num_experts
        for implementation in ("eager", "sdpa"):
            reference.set_attn_implementation(implementation)
            agillm.set_attn_implementation(implementation)
            assert_parity(reference, agillm, f"{case} [{path}, {implementation}]")


@pytest.mark.parametrize("case", ["mixtral-sliding", "qwen3_moe-unnormalised-bias"])
def test_every_experts_implementation_matches(case):
    """eager / batched_mm / grouped_mm on both models, set the same way: all agree with the reference."""
    reference = case_reference(case)
    agillm = convert_in_memory(reference)
    for implementation in EXPERTS_IMPLEMENTATIONS:
        reference.set_experts_implementation(implementation)
        agillm.set_experts_implementation(implementation)
        assert agillm.config._experts_implementation == implementation
        assert_parity(reference, agillm, f"{case} [experts {implementation}]")


@pytest.mark.parametrize("case", ["mixtral-sliding", "qwen3_moe-sliding-tied"])
def test_inputs_are_longer_than_the_window(case):
    """The parity batch exercises the window: widening it changes the reference's logits."""
    reference = case_reference(case)
    batch = left_padded_batch()
    windowed = real_token_logits(reference, batch)
    reference.config.sliding_window = 10 * SEQ_LEN  # the mask builders and attention read it at forward time
    assert (real_token_logits(reference, batch) - windowed).abs().max() > 1e-2


@pytest.mark.parametrize("case", ["mixtral-sliding", "qwen3_moe-sliding-tied"])
def test_greedy_generation_matches_reference(case, tmp_path):
    reference = case_reference(case)
    agillm = load_converted(convert_to_agillm(reference, tmp_path / "agillm"))
    batch = left_padded_batch()
    del batch["position_ids"]  # generate derives them from the mask
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = reference.generate(**batch, **settings)
    assert torch.equal(agillm.generate(**batch, **settings), expected)


@pytest.mark.skipif(not mlp_layer_types_supported(), reason="AGILLM's decoder layers do not read mlp_layer_types yet")
def test_dense_layers_match_reference(tmp_path):
    """`mlp_only_layers` and `decoder_sparse_step` become dense entries of `mlp_layer_types`."""
    reference = reference_model(Qwen3MoeForCausalLM, Qwen3MoeConfig, DENSE_LAYERS_OVERRIDES)
    assert [type(layer.mlp).__name__ for layer in reference.model.layers] == [
        "Qwen3MoeMLP", "Qwen3MoeSparseMoeBlock", "Qwen3MoeMLP", "Qwen3MoeSparseMoeBlock"
    ]
    reference.save_pretrained(tmp_path / "source")
    agillm = load_converted(convert_to_agillm(tmp_path / "source", tmp_path / "agillm"))
    assert agillm.config.mlp_layer_types == ["dense", "sparse", "dense", "sparse"]
    assert_parity(reference, agillm, "qwen3_moe-dense-layers [folder, sdpa]")


# --------------------------------------------------------------------------------------------------- config mapping


def test_config_mapping():
    mixtral = agillm_config_from(MixtralConfig(**TINY, intermediate_size=32, num_local_experts=4,
                                               sliding_window=WINDOW))
    assert (mixtral.num_experts, mixtral.moe_intermediate_size, mixtral.num_experts_per_tok) == (4, 32, 2)
    assert mixtral.router_type == "softmax_topk" and mixtral.norm_topk_prob  # Mixtral always renormalises
    assert mixtral.mlp_layer_types == ["sparse"] * 3
    assert mixtral.layer_types == ["sliding_attention"] * 3 and mixtral.sliding_window == WINDOW
    assert not (mixtral.attention_bias or mixtral.attention_output_bias or mixtral.use_qk_norm)

    qwen = agillm_config_from(Qwen3MoeConfig(**{**TINY, **DENSE_LAYERS_OVERRIDES}, norm_topk_prob=False,
                                             attention_bias=True, output_router_logits=True,
                                             router_aux_loss_coef=0.01))
    assert qwen.mlp_layer_types == ["dense", "sparse", "dense", "sparse"]
    assert (qwen.intermediate_size, qwen.moe_intermediate_size, qwen.norm_topk_prob) == (48, 32, False)
    assert qwen.use_qk_norm and qwen.attention_bias and qwen.attention_output_bias
    assert qwen.output_router_logits and qwen.router_aux_loss_coef == 0.01
    # Qwen3-MoE's sliding_window only counts with use_sliding_window (its config clears it otherwise).
    assert qwen.layer_types == ["full_attention"] * 4 and qwen.sliding_window is None

    dense = agillm_config_from(Qwen3MoeConfig(**TINY, intermediate_size=48, num_experts=0))
    assert dense.num_experts == 0 and dense.mlp_layer_types == ["dense"] * 3


def test_router_jitter_is_reported():
    """Jitter is training-only noise: the conversion goes ahead and says so."""
    logger = logging.get_logger(convert.config_mapping.__name__)
    with CaptureLogger(logger) as captured:
        config = agillm_config_from(MixtralConfig(**TINY, intermediate_size=32, num_local_experts=4,
                                                  router_jitter_noise=0.1))
    assert config.num_experts == 4
    assert "router_jitter_noise=0.1" in captured.out


# --------------------------------------------------------------------------------------------------- errors


def _rewrite_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_incomplete_or_inconsistent_experts_are_refused(tmp_path):
    reference = case_reference("mixtral-sliding")
    reference.save_pretrained(tmp_path / "source")

    _rewrite_weights(tmp_path / "source", lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(ConversionError, match=r"layers\.1\.mlp\.experts: the up projection of expert\(s\) 2"):
        convert_to_agillm(tmp_path / "source", tmp_path / "out")

    def shrink_expert(tensors):
        tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"] = torch.zeros(16, 64)

    _rewrite_weights(tmp_path / "source", shrink_expert)
    with pytest.raises(ConversionError, match=r"per-expert matrices of model\.layers\.1\.mlp\.experts\.gate_up_proj"):
        convert_to_agillm(tmp_path / "source", tmp_path / "out")

    def add_3d_copy(tensors):  # per-expert and 3-D layouts of the same layer side by side
        tensors["model.layers.0.mlp.experts.down_proj"] = torch.zeros(4, 64, 32)

    reference.save_pretrained(tmp_path / "source")
    _rewrite_weights(tmp_path / "source", add_3d_copy)
    with pytest.raises(ConversionError, match=r"holds model\.layers\.0\.mlp\.experts\.down_proj twice"):
        convert_to_agillm(tmp_path / "source", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_expert_count_must_match_the_config(tmp_path):
    reference = case_reference("qwen3_moe-unnormalised-bias")
    reference.save_pretrained(tmp_path / "source")
    config = json.loads((tmp_path / "source" / "config.json").read_text())
    # Qwen3MoeConfig stores `num_experts` as `num_local_experts` (its attribute_map).
    (tmp_path / "source" / "config.json").write_text(json.dumps({**config, "num_local_experts": 4}))
    with pytest.raises(ConversionError, match=r"Shape mismatch for model\.layers\.0\.mlp\.experts\.down_proj"):
        convert_to_agillm(tmp_path / "source", tmp_path / "out")


def test_invalid_sparse_step_is_refused():
    config = Qwen3MoeConfig(**TINY, intermediate_size=48, num_experts=4, decoder_sparse_step=0)
    with pytest.raises(ConversionError, match="decoder_sparse_step must be a positive integer"):
        agillm_config_from(config)


def test_cli_converts_a_mixtral_folder(tmp_path, capsys):
    case_reference("mixtral-sliding").save_pretrained(tmp_path / "source")
    assert cli_main([str(tmp_path / "source"), str(tmp_path / "agillm")]) == 0
    assert "AGILLM model written to" in capsys.readouterr().out
    saved = load_file(tmp_path / "agillm" / "model.safetensors")
    assert saved["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 64, 64)  # [E, 2I, H]


# --------------------------------------------------------------------------------------------------- training, 4-bit


def test_lora_on_3d_experts_trains():
    """PEFT `target_parameters` wraps the 3-D expert tensors; their LoRA factors get gradients and the loss falls."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    agillm = convert_in_memory(case_reference("qwen3_moe-unnormalised-bias")).train()
    lora = LoraConfig(r=4, lora_alpha=8, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = get_peft_model(agillm, lora)
    lora_parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    # One A and one B factor per expert tensor: 2 tensors x 3 layers.
    assert len(lora_parameters) == 2 * 2 * 3 and all("lora_" in name for name in lora_parameters)
    optimizer = torch.optim.AdamW(lora_parameters.values(), lr=1e-2)
    batch = left_padded_batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    losses = []
    for step in range(4):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        # B starts at zero, so A's first gradient is zero too; from the second step on every factor learns.
        learning = [name for name, p in lora_parameters.items() if p.grad is not None and p.grad.abs().sum() > 0]
        assert set(learning) == {name for name in lora_parameters if step > 0 or "lora_B" in name}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    print(f"LoRA on 3-D experts: losses {[round(x, 4) for x in losses]}")
    assert losses[-1] < losses[0]


def test_4bit_loading_on_cpu(tmp_path):
    """bitsandbytes 4-bit on CPU quantises the 2-D linears; the 3-D experts and the router stay in full precision."""
    from bitsandbytes.nn import Linear4bit

    reference = case_reference("mixtral-sliding")
    folder = convert_to_agillm(reference, tmp_path / "agillm")
    quantized = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map="cpu"
    ).eval()
    layer = quantized.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Linear4bit)
    assert layer.mlp.experts.gate_up_proj.dtype.is_floating_point and layer.mlp.experts.gate_up_proj.dim() == 3
    batch = left_padded_batch()
    logits = real_token_logits(quantized, batch)
    expected = real_token_logits(reference, batch)
    print(f"4-bit AGILLM MoE vs fp32 reference: max abs logit difference {(logits - expected).abs().max():.3f}")
    assert torch.isfinite(logits).all() and logits.shape == expected.shape
