"""`convert/` for DeepSeek-V3 and Llama 4 (text): transformers references into AGILLM, with exact fp32 parity.

Tiny random references:
- DeepSeek-V3 (MLA with `q_lora_rank` set, and None with YaRN RoPE; `rope_interleave=True`, a dense first layer,
  8 experts in 4 groups of which 2 may be used, top-2, one shared expert, a random non-zero `e_score_correction_bias`),
  and a checkpoint folder carrying an MTP module (`model.layers.{L}.*`, written here: transformers does not build
  them), checked against DeepSeek-V3's own modules and through `generate(use_mtp=True)`;
- Llama 4 text (chunked attention with a chunk of 8 on 24+ token inputs, NoPE layers, QK-norm, temperature tuning with
  floor_scale 4 so it acts within the test length, MoE on every second layer, top-1, llama3 RoPE scaling).

Each is converted in memory and through a saved folder loaded back as remote code; fp32 logits must match within
1e-4 under eager and sdpa, and cached greedy generation must be token-identical. Feature checks make sure the
reference configs exercise what the conversion must reproduce. Budget: about 20 s on 2 cores (9 s of CPU).
"""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Llama4ForCausalLM,
    Llama4TextConfig,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

from convert import ConversionError, agillm_config_from, convert_to_agillm
from convert.converter import build_agillm_model, read_source


TOLERANCE = 1e-4  # max abs difference of fp32 logits
SEQ_LEN, CHUNK = 24, 8
COMMON = dict(
    vocab_size=128, hidden_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2
)
DEEPSEEK_V3 = dict(
    COMMON,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=2,
    routed_scaling_factor=2.5,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    rope_interleave=True,
    num_mtp_layers=0,
)
LLAMA4 = dict(
    COMMON,
    intermediate_size=32,
    intermediate_size_mlp=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=1,
    interleave_moe_layer_step=2,  # MoE on layers 1 and 3
    no_rope_layers=[1, 0, 1, 0],  # layers 1 and 3 are NoPE (and full attention), 0 and 2 RoPE + chunked
    attention_chunk_size=CHUNK,
    use_qk_norm=True,
    attn_temperature_tuning=True,
    floor_scale=4,
    attn_scale=0.5,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
)
# DeepSeek-V3's own RoPE: YaRN, whose `mscale_all_dim` also rescales the attention scores.
DEEPSEEK_V3_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
CASES = ("deepseek_v3-q_lora", "deepseek_v3-full_q-yarn", "llama4")


def _randomize(model, seed: int = 0):
    """Every tensor matters: norm weights off 1, weights large enough for O(1) logits, a non-zero balancing bias."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.15)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) * 0.5)
    return model.eval()


def _reference(case: str):
    if case == "llama4":
        return _randomize(Llama4ForCausalLM(Llama4TextConfig(**LLAMA4)))
    if case == "deepseek_v3-q_lora":
        config = DeepseekV3Config(**DEEPSEEK_V3, q_lora_rank=24)
    else:
        config = DeepseekV3Config(**DEEPSEEK_V3, q_lora_rank=None, rope_parameters=DEEPSEEK_V3_YARN)
    return _randomize(DeepseekV3ForCausalLM(config))


@pytest.fixture(scope="module")
def pairs():
    """`{case: (reference, converted in memory)}`."""
    result = {}
    for case in CASES:
        reference = _reference(case)
        result[case] = reference, build_agillm_model(read_source(reference), torch.float32)
    return result


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(3, 128, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def _max_logit_difference(reference, converted, input_ids, attn_implementation: str) -> float:
    reference.set_attn_implementation(attn_implementation)
    converted.set_attn_implementation(attn_implementation)
    with torch.no_grad():
        expected, actual = reference(input_ids).logits, converted(input_ids).logits
    return (expected - actual).abs().max().item()


# --------------------------------------------------------------------------------------------------- config


def _mlp_widths(config) -> tuple[int, int, int]:
    return config.intermediate_size, config.moe_intermediate_size, config.shared_expert_intermediate_size


def test_deepseek_v3_config_mapping():
    config = agillm_config_from(DeepseekV3Config(**DEEPSEEK_V3, q_lora_rank=24))
    assert config.is_mla and (config.kv_lora_rank, config.q_lora_rank, config.head_dim) == (16, 24, 8)
    assert config.mlp_layer_types == ["dense", "sparse", "sparse"]
    assert config.router_type == "sigmoid_group_topk"
    assert (config.num_experts, config.n_group, config.topk_group) == (8, 4, 2)
    assert config.routed_scaling_factor == 2.5 and config.norm_topk_prob
    assert _mlp_widths(config) == (96, 32, 32)
    assert config.num_mtp_layers == 0


def test_llama4_config_mapping():
    config = agillm_config_from(Llama4TextConfig(**LLAMA4))
    assert config.nope_layers == [1, 3]  # Llama 4's no_rope_layers: 1 = RoPE, 0 = NoPE
    assert config.layer_types == ["chunked_attention", "full_attention"] * 2 and config.attention_chunk_size == CHUNK
    assert config.mlp_layer_types == ["dense", "sparse"] * 2
    assert _mlp_widths(config) == (96, 32, 32)  # dense = intermediate_size_mlp; expert and shared = intermediate_size
    assert (config.router_type, config.num_experts_per_tok) == ("sigmoid_top1_scaled_input", 1)
    assert config.use_qk_norm and config.qk_norm_type == "unweighted_post_rope"
    assert (config.attn_temperature_tuning, config.floor_scale, config.attn_scale) == (True, 4, 0.5)
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["factor"] == 8.0


# --------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("case", CASES)
def test_logits_match(pairs, input_ids, case, attn_implementation):
    reference, converted = pairs[case]
    assert _max_logit_difference(reference, converted, input_ids, attn_implementation) <= TOLERANCE


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_matches(pairs, case):
    """Cached decoding: MLA's absorbed path for DeepSeek-V3; chunk boundaries (8, 16) crossed for Llama 4."""
    reference, converted = pairs[case]
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    settings = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, use_cache=True, pad_token_id=0)
    expected = reference.generate(prompt, **settings)
    actual = converted.generate(prompt, **settings)
    assert actual.shape[1] == 22
    assert torch.equal(expected, actual)


def test_reference_configs_exercise_every_feature(pairs, input_ids):
    """Each feature the converter reproduces changes the reference's logits, so the parity tests would notice."""

    def changes(reference, edit) -> bool:
        edited = copy.deepcopy(reference)
        edit(edited)
        return _max_logit_difference(reference, edited, input_ids, "eager") > 100 * TOLERANCE

    deepseek, _ = pairs["deepseek_v3-q_lora"]
    assert changes(deepseek, lambda m: setattr(m.config, "rope_interleave", False))  # the permutation matters
    assert changes(deepseek, lambda m: m.model.layers[1].mlp.gate.e_score_correction_bias.zero_())
    assert changes(deepseek, lambda m: setattr(m.model.layers[1].mlp.gate, "topk_group", 4))  # group-limited routing

    llama4, _ = pairs["llama4"]
    for layer in (1, 3):
        assert changes(llama4, lambda m: setattr(m.model.layers[layer].self_attn, "floor_scale", 10**6))
    assert changes(llama4, lambda m: setattr(m.config, "attention_chunk_size", 64))
    assert changes(llama4, lambda m: delattr(m.model.layers[0].self_attn, "qk_norm"))


# --------------------------------------------------------------------------------------------------- folders + MTP


def _write_mtp_module(reference: DeepseekV3ForCausalLM, folder) -> dict:
    """Add one DeepSeek-V3 MTP module (`model.layers.{L}.*`, per-expert layout, with the shared copies of the embedding
    and head real checkpoints carry) to a saved folder. Returns the reference modules that compute it."""
    config = reference.config
    num_layers = config.num_hidden_layers
    block = DeepseekV3DecoderLayer(config, num_layers)  # index >= first_k_dense_replace: an MoE block
    hidden = config.hidden_size
    norms = {name: DeepseekV3RMSNorm(hidden, eps=config.rms_norm_eps) for name in ("enorm", "hnorm", "head")}
    modules = {"block": block, "eh_proj": torch.nn.Linear(2 * hidden, hidden, bias=False), **norms}
    for seed, module in enumerate(modules.values(), start=3):
        _randomize(module, seed=seed)

    prefix = f"model.layers.{num_layers}."
    tensors = {}
    for name, tensor in block.state_dict().items():
        if name == "mlp.experts.gate_up_proj":
            for expert, matrix in enumerate(tensor):
                gate, up = matrix.chunk(2)
                tensors[f"{prefix}mlp.experts.{expert}.gate_proj.weight"] = gate
                tensors[f"{prefix}mlp.experts.{expert}.up_proj.weight"] = up
        elif name == "mlp.experts.down_proj":
            for expert, matrix in enumerate(tensor):
                tensors[f"{prefix}mlp.experts.{expert}.down_proj.weight"] = matrix
        else:
            tensors[prefix + name] = tensor
    tensors[prefix + "enorm.weight"] = modules["enorm"].weight
    tensors[prefix + "hnorm.weight"] = modules["hnorm"].weight
    tensors[prefix + "eh_proj.weight"] = modules["eh_proj"].weight
    tensors[prefix + "shared_head.norm.weight"] = modules["head"].weight
    tensors[prefix + "embed_tokens.weight"] = reference.model.embed_tokens.weight
    tensors[prefix + "shared_head.head.weight"] = reference.lm_head.weight
    weights = load_file(folder / "model.safetensors")
    weights.update({name: tensor.detach().clone().contiguous() for name, tensor in tensors.items()})
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return modules


@pytest.fixture(scope="module")
def deepseek_v3_with_mtp(tmp_path_factory):
    """A saved DeepSeek-V3 folder with one MTP module, and the reference modules of that module."""
    folder = tmp_path_factory.mktemp("deepseek_v3")
    reference = _reference("deepseek_v3-q_lora")
    reference.config.num_mtp_layers = 1  # saved as num_nextn_predict_layers
    reference.save_pretrained(folder)
    return folder, reference, _write_mtp_module(reference, folder)


@pytest.mark.parametrize("case", ["deepseek_v3-mtp", "llama4"])
def test_saved_folder_loads_as_remote_code(deepseek_v3_with_mtp, tmp_path, input_ids, case):
    if case == "llama4":
        reference = _reference("llama4")
        source = tmp_path / "source"
        reference.save_pretrained(source)
    else:
        source, reference, _ = deepseek_v3_with_mtp
    output = convert_to_agillm(source, tmp_path / "agillm")
    converted = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(converted).__name__ == "AgillmForCausalLM"
    for attn_implementation in ("eager", "sdpa"):
        assert _max_logit_difference(reference, converted, input_ids, attn_implementation) <= TOLERANCE
    if converted.config.num_mtp_layers:  # the carried MTP module drafts for lossless speculative decoding
        prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
        settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
        expected = reference.generate(prompt, **settings)
        assert torch.equal(converted.generate(prompt, use_mtp=True, **settings), expected)


def test_deepseek_v3_mtp_module_matches_reference(deepseek_v3_with_mtp, tmp_path, input_ids):
    """The carried MTP module computes DeepSeek-V3's `shared_head.norm(block(eh_proj([enorm(e) ; hnorm(h)])))`."""
    source, reference, modules = deepseek_v3_with_mtp
    converted = build_agillm_model(read_source(source), torch.float32)
    assert converted.config.num_mtp_layers == 1
    converted.set_attn_implementation("sdpa")  # no mask: sdpa attends causally in both models
    modules["block"].self_attn.config._attn_implementation = "sdpa"
    with torch.no_grad():
        hidden = converted.model(input_ids).last_hidden_state[:, :-1]
        embeds = converted.model.embed_tokens(input_ids[:, 1:])
        positions = torch.arange(1, SEQ_LEN)[None]
        mtp = converted.model.layers[reference.config.num_hidden_layers]
        actual = mtp.predict(
            embeds, hidden, attention_mask=None, position_ids=positions,
            position_embeddings=converted.model.rotary_emb(embeds, positions),
        )
        projected = modules["eh_proj"](torch.cat([modules["enorm"](embeds), modules["hnorm"](hidden)], dim=-1))
        block_output = modules["block"](
            projected, attention_mask=None, position_ids=positions,
            position_embeddings=reference.model.rotary_emb(projected, positions),
        )
        expected = modules["head"](block_output)
    assert (expected - actual).abs().max().item() <= TOLERANCE


# --------------------------------------------------------------------------------------------------- errors


def test_llama4_top2_is_refused():
    with pytest.raises(ConversionError, match="num_experts_per_tok=2"):
        agillm_config_from(Llama4TextConfig(**{**LLAMA4, "num_experts_per_tok": 2}))


def test_unannounced_mtp_layers_are_refused(deepseek_v3_with_mtp, tmp_path):
    source, reference, _ = deepseek_v3_with_mtp
    loaded = read_source(source)
    loaded.config.num_mtp_layers = 0
    with pytest.raises(ConversionError, match="holds 1 MTP layers"):
        build_agillm_model(loaded, torch.float32)


def test_mtp_embedding_copy_must_match(deepseek_v3_with_mtp):
    source, reference, _ = deepseek_v3_with_mtp
    loaded = read_source(source)
    loaded.tensors = dict(loaded.tensors.items())
    name = f"model.layers.{reference.config.num_hidden_layers}.embed_tokens.weight"
    loaded.tensors[name] = loaded.tensors[name] + 1
    with pytest.raises(ConversionError, match="share the main embedding"):
        build_agillm_model(loaded, torch.float32)
