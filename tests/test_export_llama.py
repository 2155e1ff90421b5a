"""`convert/llama_export.py` and `convert/gguf_export.py`: AGILLM models out as stock Llama folders and GGUF files.

Parity: tiny random AGILLM models that Llama can express (GQA and MQA, tied and untied embeddings, biases, default /
linear / llama3 / yarn RoPE, a decoupled head_dim) are exported, loaded with `LlamaForCausalLM.from_pretrained` (no
remote code) and must give the AGILLM model's fp32 logits within 1e-5 on a left-padded batch, and the same greedy
tokens; imported back with `convert_to_agillm` they give the identical state dict. GGUF files are read back by
transformers' own GGUF loader (which un-permutes q/k and dequantizes): F32 matches the AGILLM logits within 1e-5,
F16 and Q8_0 match within 1e-5 the AGILLM model whose weights were rounded the same way (so the layout is exact and
the only difference is the stated rounding). Every refusal is checked with its message.
"""

import copy
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import convert.gguf_export
import convert.llama_export
from convert import ConversionError, convert_to_agillm, export_gguf, export_llama
from convert.__main__ import main as cli_main
from convert.gguf_export import _pre_tokenizer_name, permute_for_gguf
from convert.llama_export import llama_config_from
from modeling_agillm import AgillmForCausalLM
from processing_agillm import AgillmProcessor
from tests.conftest import build_tiny_config, build_tiny_model
from tokenizer import TOKENIZER_DIR


TOLERANCE = 1e-5  # max abs difference of fp32 logits
SEQ_LEN, LEFT_PAD = 24, 5
SHIPPED_VOCAB = 8192  # models that carry the shipped tokenizer need its vocabulary

# name: AgillmConfig overrides of the tiny config (vocab 128, hidden 32, 2 layers, 4 query / 2 kv heads)
CASES = {
    "gqa-untied-default": dict(tie_word_embeddings=False),
    "mqa-tied-llama3": dict(
        num_key_value_heads=1,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    ),
    "bias-linear-headdim": dict(
        attention_bias=True, mlp_bias=True, head_dim=16, tie_word_embeddings=False,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ),
    "yarn": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                  "original_max_position_embeddings": 16}),
}


def randomized(model):
    """Every parameter matters (norm weights off 1, biases off 0) and logits are O(1), so 1e-5 means something."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                parameter.copy_(0.2 * noise)
            else:
                parameter.copy_(0.15 * noise)
    return model.eval()


def agillm_model(**overrides):
    return randomized(build_tiny_model(**overrides))


def left_padded_batch(vocab_size: int = 128):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, vocab_size, (2, SEQ_LEN), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :LEFT_PAD] = 0
    input_ids[1, :LEFT_PAD] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def real_token_logits(model, batch) -> torch.Tensor:
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return model(**batch, position_ids=position_ids).logits[batch["attention_mask"].bool()]


def assert_logits_match(expected_model, actual_model, batch, tolerance=TOLERANCE, label=""):
    expected, actual = real_token_logits(expected_model, batch), real_token_logits(actual_model, batch)
    max_abs = (expected - actual).abs().max().item()
    print(f"{label}: max abs logit difference {max_abs:.3e} (logit std {expected.std():.2f})")
    assert expected.std() > 0.5, "logits too flat for the tolerance to mean anything"
    assert max_abs <= tolerance


# --------------------------------------------------------------------------------------------------- Llama folder


@pytest.mark.parametrize("case", list(CASES))
def test_llama_folder_matches_agillm_and_imports_back_identically(case, tmp_path):
    agillm = agillm_model(**CASES[case])
    folder = export_llama(agillm, tmp_path / "llama")
    llama = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # stock class, no remote code
    batch = left_padded_batch()
    assert_logits_match(agillm, llama, batch, label=case)

    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(llama.generate(**batch, **settings), agillm.generate(**batch, **settings))

    # The existing Llama import gives the same AGILLM model back, tensor for tensor.
    back = AgillmForCausalLM.from_pretrained(convert_to_agillm(folder, tmp_path / "agillm"), dtype=torch.float32)
    expected, actual = agillm.state_dict(), back.state_dict()
    assert set(actual) == set(expected)
    assert all(torch.equal(actual[name], expected[name]) for name in expected)
    for name in ("rope_parameters", "head_dim", "attention_bias", "attention_output_bias", "mlp_bias",
                 "tie_word_embeddings", "num_key_value_heads"):
        assert getattr(back.config, name) == getattr(agillm.config, name), name


def test_folder_from_saved_agillm_folder_with_tokenizer(tmp_path):
    """A saved AGILLM folder (with AGILLM's processor) -> a plain Llama folder: stock tokenizer, bf16 on request."""
    agillm = agillm_model(vocab_size=SHIPPED_VOCAB)
    agillm.save_pretrained(tmp_path / "agillm")
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    AgillmProcessor(tokenizer=tokenizer).save_pretrained(tmp_path / "agillm")

    folder = export_llama(tmp_path / "agillm", tmp_path / "llama", dtype="bfloat16")
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert not [name for name in names if name.endswith(".py")] and "processor_config.json" not in names
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config and config["dtype"] == "bfloat16"
    assert "auto_map" not in json.loads((folder / "tokenizer_config.json").read_text())

    llama = LlamaForCausalLM.from_pretrained(folder)
    assert llama.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(llama.model.embed_tokens.weight, agillm.model.embed_tokens.weight.bfloat16())
    reloaded = AutoTokenizer.from_pretrained(folder)  # no trust_remote_code
    text = "<|im_start|>user\nTo be, or not to be: 123 café<|im_end|>"
    assert reloaded(text).input_ids == tokenizer(text).input_ids
    source_template = AutoTokenizer.from_pretrained(tmp_path / "agillm", trust_remote_code=False).chat_template
    assert reloaded.chat_template == source_template  # the folder's own (AGILLM's processor template)
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2


# --------------------------------------------------------------------------------------------------- refusals


REFUSALS = {
    # case: (AgillmConfig overrides, expected message)
    "layer-norm": (dict(norm_type="layer_norm"), "norm_type='layer_norm': Llama normalises with RMSNorm only"),
    "alibi": (dict(position_embedding_type="alibi"), "position_embedding_type='alibi'"),
    "nope-layer": (dict(nope_layers=[1]), r"nope_layers=\[1\]"),
    "sliding-layer": (dict(layer_types=["full_attention", "sliding_attention"], sliding_window=4),
                      r"layer_types=\['full_attention', 'sliding_attention'\]"),
    "chunked-layer": (dict(layer_types=["chunked_attention"] * 2, attention_chunk_size=4), "chunked_attention"),
    "qk-norm": (dict(use_qk_norm=True), "use_qk_norm=True: Llama has no query/key norm"),
    "mla": (dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4),
            "kv_lora_rank=16: Llama has no multi-head latent attention"),
    "kv-sharing": (dict(kv_source_layers=[0, 0]), r"kv_source_layers=\[0, 0\]"),
    "tie-kv": (dict(tie_kv=True), "tie_kv=True"),
    "output-bias-only": (dict(attention_bias=False, attention_output_bias=True),
                         "attention_bias=False with attention_output_bias=True"),
    "plain-mlp": (dict(mlp_type="plain"), "mlp_type='plain'"),
    "gelu": (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    "experts": (dict(num_experts=4, num_experts_per_tok=2), "num_experts=4: Llama has dense MLPs only"),
    "head-bias": (dict(head_bias=True), "head_bias=True"),
    "vision": (dict(vocab_size=1024, vision_config={}), "vision_config: Llama is a text-only model"),
    "sat-nat-heads": (dict(heads=["ar", "sat", "nat"]), r"heads=\['ar', 'sat', 'nat'\].*drop_heads=True"),
    "diffusion-blocks": (dict(diffusion_blocks={"num_groups": 2}), "diffusion_blocks is set.*drop_heads=True"),
    "mtp": (dict(num_mtp_layers=1), "num_mtp_layers=1: Llama has no MTP modules.*drop_heads=True"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unexpressible_features_are_refused_by_name(case):
    overrides, message = REFUSALS[case]
    with pytest.raises(ConversionError, match=message):
        llama_config_from(build_tiny_config(**overrides))


def test_every_problem_is_named_at_once_and_nothing_is_written(tmp_path):
    agillm = build_tiny_model(norm_type="layer_norm", use_qk_norm=True)
    with pytest.raises(ConversionError, match="norm_type='layer_norm'.*; use_qk_norm=True"):
        export_llama(agillm, tmp_path / "llama")
    with pytest.raises(ConversionError, match="norm_type='layer_norm'"):
        export_gguf(agillm, tmp_path / "model.gguf")
    assert list(tmp_path.iterdir()) == []


def test_round_trip_guard_names_a_field_the_checks_miss(monkeypatch):
    """Behind the explicit checks, the Llama import must give back every field that shapes the AR forward."""
    monkeypatch.setattr(convert.llama_export, "llama_expressibility_problems", lambda config, drop_heads: [])
    with pytest.raises(ConversionError, match=r"nope_layers=\[1\] \(as Llama: \[\]\): no Llama field holds it"):
        llama_config_from(build_tiny_config(nope_layers=[1]))


def test_drop_heads_exports_the_trunk_and_ar_head(tmp_path):
    agillm = agillm_model(heads=["ar", "sat", "nat"], num_mtp_layers=1)
    with pytest.raises(ConversionError, match="heads=.*; num_mtp_layers=1"):
        export_llama(agillm, tmp_path / "llama")
    folder = export_llama(agillm, tmp_path / "llama", drop_heads=True)
    llama = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert llama.config.num_hidden_layers == 2  # the MTP layer (model.layers.2) is not a decoder layer
    batch = left_padded_batch()
    assert_logits_match(agillm, llama, batch, label="drop_heads")  # AgillmForCausalLM.forward runs the AR head
    assert "were left out (`drop_heads`)" in (folder / "README.md").read_text()


# --------------------------------------------------------------------------------------------------- GGUF


def rounded_like_gguf(model, gguf_type: str):
    """A copy of `model` whose weight matrices went through the GGUF type's rounding (1-D tensors stay fp32)."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in rounded.parameters():
            if parameter.ndim != 2 or gguf_type == "f32":
                continue
            if gguf_type == "f16":
                parameter.copy_(parameter.half().float())
            else:
                qtype = gguf.GGMLQuantizationType.Q8_0
                data = parameter.numpy()
                parameter.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)))
    return rounded.eval()


GGUF_CASES = {  # name: (gguf type, AgillmConfig overrides)
    "f32-untied": ("f32", dict(tie_word_embeddings=False)),
    "f16-tied-mqa": ("f16", dict(num_key_value_heads=1)),
    "q8_0-untied": ("q8_0", dict(tie_word_embeddings=False)),
    "f32-bias-headdim": ("f32", dict(attention_bias=True, mlp_bias=True, head_dim=16)),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_read_back_by_transformers(case, tmp_path):
    gguf_type, overrides = GGUF_CASES[case]
    agillm = agillm_model(vocab_size=SHIPPED_VOCAB, **overrides)
    path = export_gguf(agillm, tmp_path / "model.gguf", gguf_type=gguf_type, tokenizer=TOKENIZER_DIR)
    # transformers' GGUF loader reads no bias flags from the metadata: give it the config (llama.cpp reads biases
    # from the tensors themselves).
    config = llama_config_from(agillm.config) if agillm.config.attention_bias else None
    llama = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32,
                                                 **({"config": config} if config else {})).eval()
    assert type(llama) is LlamaForCausalLM and llama.config.tie_word_embeddings == agillm.config.tie_word_embeddings
    batch = left_padded_batch(SHIPPED_VOCAB)
    assert_logits_match(rounded_like_gguf(agillm, gguf_type), llama, batch, label=f"GGUF {case} vs rounded AGILLM")
    if gguf_type != "f32":  # the rounding itself, for the record (not a pass/fail criterion)
        unrounded = (real_token_logits(agillm, batch) - real_token_logits(llama, batch)).abs().max().item()
        print(f"GGUF {case}: max abs logit difference to the unrounded AGILLM model {unrounded:.3e}")


def test_gguf_tokenizer_and_metadata(tmp_path):
    agillm = build_tiny_model(vocab_size=SHIPPED_VOCAB)
    path = export_gguf(agillm, tmp_path / "model.gguf", tokenizer=TOKENIZER_DIR)
    shipped = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = "<|im_start|>user\nHello,  world! 12345 café 😀<|im_end|>\n<|mask|>"
    assert from_gguf(text).input_ids == shipped(text).input_ids
    assert from_gguf.chat_template == shipped.chat_template

    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()
              if name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")}
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"  # llama.cpp's GPT-2 regex, what ByteLevel(use_regex) splits by
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.add_bos_token"] is False  # the shipped tokenizer adds no BOS
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    token_types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert token_types[2] == gguf.TokenType.CONTROL and token_types[300] == gguf.TokenType.NORMAL
    assert {tensor.name for tensor in reader.tensors} >= {"token_embd.weight", "blk.1.attn_q.weight"}
    assert "output.weight" not in {tensor.name for tensor in reader.tensors}  # tied: llama.cpp reuses token_embd


def test_gguf_rope_scaling_as_llama_cpp_reads_it(tmp_path):
    llama3 = CASES["mqa-tied-llama3"]
    path = export_gguf(build_tiny_model(**llama3), tmp_path / "llama3.gguf")
    factors = gguf.GGUFReader(path).get_tensor(0)
    assert factors.name == "rope_freqs.weight"
    # llama.cpp rotates pair i by position * theta^(-2i/d) / rope_freqs[i]: that must be transformers' llama3 table.
    head_dim, theta = 8, llama3["rope_parameters"]["rope_theta"]
    default = theta ** -(torch.arange(0, head_dim, 2).float() / head_dim)
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=32, num_attention_heads=4, head_dim=head_dim,
                                              rope_parameters=llama3["rope_parameters"]))
    torch.testing.assert_close(default / torch.from_numpy(np.array(factors.data)), rotary.inv_freq)

    path = export_gguf(build_tiny_model(**CASES["bias-linear-headdim"]), tmp_path / "linear.gguf")
    fields = gguf.GGUFReader(path).fields
    assert fields["llama.rope.scaling.type"].contents() == "linear"
    assert fields["llama.rope.scaling.factor"].contents() == 2.0
    assert fields["llama.attention.key_length"].contents() == 16

    with pytest.raises(ConversionError, match="rope_type='yarn'.*export the Llama folder"):
        export_gguf(build_tiny_model(**CASES["yarn"]), tmp_path / "yarn.gguf")


def test_gguf_permutation_is_what_transformers_undoes():
    rows = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of head_dim 8, 3 inputs
    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    assert np.array_equal(processor._reverse_permute_weights(permute_for_gguf(rows, 2), 4, 2), rows)
    # each head's rows become (first-half row i, second-half row i) pairs: ggml's interleaved rotation
    assert permute_for_gguf(rows, 2)[:4, 0].tolist() == [0, 12, 3, 15]


def test_pre_tokenizer_names():
    assert _pre_tokenizer_name({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}) == "gpt-2"
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    llama3_split = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]}, "behavior": "Isolated"},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
    ]}
    assert _pre_tokenizer_name(llama3_split) == "llama3"
    with pytest.raises(ConversionError, match="no llama.cpp name known here.*Metaspace"):
        _pre_tokenizer_name({"type": "Metaspace", "replacement": "▁"})


def test_gguf_write_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert.gguf_export, "_add_tensor", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(build_tiny_model(), tmp_path / "model.gguf")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConversionError, match="gguf_type must be one of f32, f16, q8_0"):
        export_gguf(build_tiny_model(), tmp_path / "model.gguf", gguf_type="q4_0")


# --------------------------------------------------------------------------------------------------- CLI


def test_cli(tmp_path, capsys):
    build_tiny_model(heads=["ar", "sat"]).save_pretrained(tmp_path / "agillm")
    capsys.readouterr()
    llama_dir, gguf_path = tmp_path / "llama", tmp_path / "model.gguf"
    arguments = ["--export-llama", str(tmp_path / "agillm"), str(llama_dir), "--gguf", str(gguf_path)]

    assert cli_main(arguments) == 1  # the SAT head needs --drop-heads
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "heads=['ar', 'sat']" in error and "--drop-heads" in error
    assert not llama_dir.exists() and not gguf_path.exists()

    assert cli_main([*arguments, "--drop-heads", "--gguf-type", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert f"Llama model written to {llama_dir}" in out and f"GGUF (q8_0) written to {gguf_path}" in out
    assert LlamaForCausalLM.from_pretrained(llama_dir).config.model_type == "llama"
    assert gguf.GGUFReader(gguf_path).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0

    assert cli_main([*arguments, "--drop-heads"]) == 1  # both exist; nothing is replaced without --overwrite
    assert "already exists" in capsys.readouterr().err
    for bad in (["--gguf", "x.gguf", "a", "b"], ["--export-llama", "a"], ["--export-llama", "a", "b", "--agillm4"]):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(bad)
        assert exit_info.value.code == 2
    assert Path(llama_dir / "config.json").is_file()
