"""`convert/`: Llama / Mistral / Qwen2 / Qwen3 checkpoints into AGILLM folders.

Parity: tiny random reference models of every family (GQA/MQA, tied and untied embeddings, every RoPE type,
biases, QK-norm, sliding-window layers) go through the full path (saved folder -> convert -> load as remote code)
and must give the reference's fp32 logits within 1e-4, under eager and sdpa, on a left-padded batch long enough
for the sliding windows to matter. The rest checks the folder's contents, atomic writing, and the clear errors.
"""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub.repocard import metadata_load
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import convert.converter
from convert import ConversionError, agillm_config_from, convert_to_agillm
from convert.__main__ import main as cli_main
from convert.converter import MODEL_CODE_FILES, PROCESSOR_CODE_FILES
from tokenizer import TOKENIZER_DIR  # the shipped tokenizer (8192 ids)


TOLERANCE = 1e-4  # max abs difference of fp32 logits
SEQ_LEN, LEFT_PAD, WINDOW = 40, 6, 8
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# name: (reference class, config class, overrides of TINY)
CASES = {
    "llama-gqa-untied-default": (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=False)),
    "llama-tied-bias-linear": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        ),
    ),
    "llama-dynamic": (  # positions run past max_position_embeddings, where dynamic NTK rescales
        LlamaForCausalLM,
        LlamaConfig,
        dict(
            max_position_embeddings=24,
            rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        ),
    ),
    "llama-yarn": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(
            rope_parameters={
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
            }
        ),
    ),
    "llama-llama3": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
            }
        ),
    ),
    "mistral-mqa-sliding-headdim": (  # every layer slides; head_dim decoupled from hidden_size
        MistralForCausalLM,
        MistralConfig,
        dict(num_key_value_heads=1, head_dim=32, sliding_window=WINDOW),
    ),
    "qwen2-tied-sliding": (  # q/k/v bias, no o_proj bias; layers 1 and 2 slide (max_window_layers=1)
        Qwen2ForCausalLM,
        Qwen2Config,
        dict(num_hidden_layers=3, tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW,
             max_window_layers=1),
    ),
    "qwen3-qknorm-bias-sliding-yarn": (  # only layer 2 slides
        Qwen3ForCausalLM,
        Qwen3Config,
        dict(num_hidden_layers=3, head_dim=32, attention_bias=True, use_sliding_window=True, sliding_window=WINDOW,
             max_window_layers=2,
             rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0,
                              "original_max_position_embeddings": 32}),
    ),
    "qwen3-tied-default": (Qwen3ForCausalLM, Qwen3Config, dict(head_dim=16, tie_word_embeddings=True)),
}


def reference_model(case: str, seed: int = 0):
    """A random reference model whose every parameter matters (norm weights off 1, biases off 0)."""
    model_class, config_class, overrides = CASES[case]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn_like(parameter)
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                parameter.copy_(0.2 * noise)
            else:  # large enough that logits are O(1) and a 1e-4 tolerance means something
                parameter.copy_(0.15 * noise)
    return model.eval()


def left_padded_batch(vocab_size: int = TINY["vocab_size"]):
    """Two rows of SEQ_LEN tokens, the second left-padded; position ids as `generate` computes them."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, vocab_size, (2, SEQ_LEN), generator=generator)
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


def assert_nothing_written(parent: Path, keep: set[str]) -> None:
    """No output folder and no staging (`.NAME.tmp-*`) or backup folder left beside it."""
    assert {path.name for path in parent.iterdir()} == keep


# --------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_reference(case, tmp_path):
    reference = reference_model(case)
    reference.save_pretrained(tmp_path / "source")
    agillm = load_converted(convert_to_agillm(tmp_path / "source", tmp_path / "agillm"))
    assert type(agillm).__name__ == "AgillmForCausalLM"
    batch = left_padded_batch()

    for implementation in ("eager", "sdpa"):
        reference.set_attn_implementation(implementation)
        agillm.set_attn_implementation(implementation)
        expected, actual = real_token_logits(reference, batch), real_token_logits(agillm, batch)
        max_abs = (expected - actual).abs().max().item()
        print(f"{case} [{implementation}]: max abs logit difference {max_abs:.3e} (logit std {expected.std():.2f})")
        assert expected.std() > 0.5, "reference logits too flat for the tolerance to mean anything"
        assert max_abs <= TOLERANCE


@pytest.mark.parametrize("case", [case for case in CASES if "sliding" in case])
def test_inputs_are_longer_than_the_window(case):
    """The parity batch must exercise the window: widening it changes the reference's logits."""
    reference = reference_model(case)
    batch = left_padded_batch()
    windowed = real_token_logits(reference, batch)
    reference.config.sliding_window = 10 * SEQ_LEN  # the mask builders read the window at forward time
    assert (real_token_logits(reference, batch) - windowed).abs().max() > 1e-2


def test_dynamic_rope_rescales_on_the_parity_batch():
    """The batch runs past max_position_embeddings, so dynamic NTK really rescales (and the parity test covers it)."""
    reference = reference_model("llama-dynamic")
    rotary = reference.model.rotary_emb
    real_token_logits(reference, left_padded_batch())
    assert not torch.equal(rotary.inv_freq, rotary.original_inv_freq)


@pytest.mark.parametrize("case", ["mistral-mqa-sliding-headdim", "qwen2-tied-sliding"])
def test_greedy_generation_matches_reference_through_sliding_cache(case, tmp_path):
    reference = reference_model(case)
    agillm = load_converted(convert_to_agillm(reference, tmp_path / "agillm"))
    batch = left_padded_batch()
    del batch["position_ids"]  # generate derives them from the mask
    settings = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = reference.generate(**batch, **settings)
    assert torch.equal(agillm.generate(**batch, **settings), expected)


# --------------------------------------------------------------------------------------------------- config mapping


def test_config_mapping_per_family():
    qwen2 = agillm_config_from(
        Qwen2Config(**{**TINY, "num_hidden_layers": 3}, use_sliding_window=True, sliding_window=WINDOW,
                    max_window_layers=1)
    )
    assert (qwen2.attention_bias, qwen2.attention_output_bias, qwen2.use_qk_norm) == (True, False, False)
    assert qwen2.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert qwen2.sliding_window == WINDOW

    qwen3 = agillm_config_from(Qwen3Config(**TINY, head_dim=48))
    assert (qwen3.use_qk_norm, qwen3.head_dim, qwen3.sliding_window) == (True, 48, None)
    assert qwen3.layer_types == ["full_attention"] * 2

    mistral = agillm_config_from(MistralConfig(**TINY, sliding_window=WINDOW))
    assert mistral.layer_types == ["sliding_attention"] * 2 and not mistral.attention_bias
    assert agillm_config_from(MistralConfig(**TINY, sliding_window=None)).layer_types == ["full_attention"] * 2

    llama = agillm_config_from(LlamaConfig(**TINY, attention_bias=True, tie_word_embeddings=True))
    assert (llama.attention_bias, llama.attention_output_bias, llama.tie_word_embeddings) == (True, True, True)
    assert (llama.pad_token_id, llama.bos_token_id, llama.eos_token_id) == (0, 1, 2)


# --------------------------------------------------------------------------------------------------- output folder


def test_round_trip_folder_contents(tmp_path):
    """Object source + tokenizer: sharded weights, code files, processor, generation config, model card."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    reference = reference_model("llama-tied-bias-linear")
    reference.config.pad_token_id = reference.generation_config.pad_token_id = None
    reference.resize_token_embeddings(len(tokenizer))
    out = convert_to_agillm(
        reference, tmp_path / "agillm", tokenizer=tokenizer, max_shard_size="300KB", source_name="org/tiny-llama"
    )

    names = {path.name for path in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "README.md",
            "configuration_agillm.py", "modeling_agillm.py", "processing_agillm.py", "processor_config.json",
            "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= names
    # exactly the code files of the one list: the model's (what save_pretrained ships) and the processor's
    assert {name for name in names if name.endswith(".py")} == {*MODEL_CODE_FILES, *PROCESSOR_CODE_FILES}
    assert len([name for name in names if name.endswith(".safetensors")]) > 1

    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_agillm.AgillmForCausalLM"
    assert config["model_type"] == "agillm"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["pad_token_id"] == generation["eos_token_id"] == 2  # the source had no pad id

    card = metadata_load(out / "README.md")
    assert card["library_name"] == "transformers" and card["base_model"] == "org/tiny-llama"
    assert {"agillm", "llama", "custom_code", "conversational"} <= set(card["tags"])

    agillm = load_converted(out)
    assert type(agillm).__module__.startswith("transformers_modules.")
    assert agillm.lm_head.weight is agillm.model.embed_tokens.weight
    ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (agillm(ids).logits - reference(ids).logits).abs().max() <= TOLERANCE
    reloaded = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert reloaded("To be, or not to be").input_ids == ids[0].tolist()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert type(processor).__name__ == "AgillmProcessor" and processor.chat_template


def test_bf16_output_and_cli(tmp_path, capsys):
    reference_model("qwen3-tied-default").save_pretrained(tmp_path / "source")
    assert cli_main([str(tmp_path / "source"), str(tmp_path / "agillm"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "agillm" / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_converted(tmp_path / "agillm").model.layers[0].self_attn.q_norm.weight.dtype == torch.float32

    assert cli_main([str(tmp_path / "source"), str(tmp_path / "agillm")]) == 1  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["--smollm2", str(tmp_path / "x"), str(tmp_path / "source")])


# --------------------------------------------------------------------------------------------------- atomic writes


def test_failure_while_writing_leaves_no_trace(tmp_path, monkeypatch):
    reference = reference_model("llama-gqa-untied-default")

    def broken_model_card(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert.converter, "write_model_card", broken_model_card)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_to_agillm(reference, tmp_path / "agillm")
    assert_nothing_written(tmp_path, keep=set())

    # With overwrite, the old folder survives a failed conversion untouched.
    (tmp_path / "agillm").mkdir()
    (tmp_path / "agillm" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        convert_to_agillm(reference, tmp_path / "agillm", overwrite=True)
    assert_nothing_written(tmp_path, keep={"agillm"})
    assert [path.name for path in (tmp_path / "agillm").iterdir()] == ["old.txt"]


def test_existing_output_needs_overwrite(tmp_path):
    reference = reference_model("llama-gqa-untied-default")
    (tmp_path / "agillm").mkdir()
    (tmp_path / "agillm" / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_to_agillm(reference, tmp_path / "agillm")
    assert (tmp_path / "agillm" / "old.txt").is_file()

    convert_to_agillm(reference, tmp_path / "agillm", overwrite=True)
    assert not (tmp_path / "agillm" / "old.txt").exists()
    assert (tmp_path / "agillm" / "config.json").is_file()
    assert_nothing_written(tmp_path, keep={"agillm"})


# --------------------------------------------------------------------------------------------------- clear errors


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


INCONSISTENT_SOURCES = {
    # case: (reference, config.json edits, expected message)
    "shape-mismatch": (
        "llama-gqa-untied-default", dict(intermediate_size=80), "Shape mismatch for model.layers.0.mlp"
    ),
    "missing-head": (
        "qwen3-tied-default", dict(tie_word_embeddings=False), "missing from the source: lm_head.weight"
    ),
    "bias-config-lacks": (  # q/k/v/o biases in the checkpoint, a config without attention_bias
        "llama-tied-bias-linear", dict(attention_bias=False), "no AGILLM parameter to hold them: .*k_proj.bias"
    ),
    "extra-layer": ("llama-gqa-untied-default", dict(num_hidden_layers=1), "no AGILLM parameter .*model.layers.1"),
    "tied-head-differs": ("llama-gqa-untied-default", dict(tie_word_embeddings=True), "lm_head.weight differs"),
    "unknown-model-type": ("llama-gqa-untied-default", dict(model_type="falcon"), "model_type 'falcon'"),
    "unknown-rope-type": (
        "llama-gqa-untied-default", dict(rope_parameters={"rope_type": "foo", "rope_theta": 1e4}), "rope_type 'foo'"
    ),
    "partial-rope": (
        "llama-gqa-untied-default",
        dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
        "partial_rotary_factor",
    ),
    "sliding-without-window": (
        "qwen3-tied-default", dict(layer_types=["full_attention", "sliding_attention"]), "positive sliding_window"
    ),
}


@pytest.mark.parametrize("case", list(INCONSISTENT_SOURCES))
def test_inconsistent_source_raises_and_writes_nothing(case, tmp_path):
    reference, edits, message = INCONSISTENT_SOURCES[case]
    reference_model(reference).save_pretrained(tmp_path / "source")
    _edit_config(tmp_path / "source", **edits)
    with pytest.raises(ConversionError, match=message):
        convert_to_agillm(tmp_path / "source", tmp_path / "agillm")
    assert_nothing_written(tmp_path, keep={"source"})


def test_unsupported_model_objects(tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ConversionError, match="model_type 'gpt2'.*llama, mistral, qwen2, qwen3"):
        convert_to_agillm(gpt2, tmp_path / "agillm")

    quantized = reference_model("llama-gqa-untied-default")
    quantized.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(ConversionError, match="quantized"):
        convert_to_agillm(quantized, tmp_path / "agillm")

    with pytest.raises(ConversionError, match="tokenizer has 8192 tokens"):
        convert_to_agillm(reference_model("qwen3-tied-default"), tmp_path / "agillm", tokenizer=TOKENIZER_DIR)
    with pytest.raises(ConversionError, match="not a local folder"):
        convert_to_agillm(tmp_path / "no-such-folder", tmp_path / "agillm")
    with pytest.raises(ConversionError, match="no/such-model is neither a local folder nor a model in the Hugging"):
        convert_to_agillm("no/such-model", tmp_path / "agillm")  # a Hub id that is not in the local cache
    assert_nothing_written(tmp_path, keep=set())


# --------------------------------------------------------------------------------------------------- other sources


def test_bin_checkpoint_folder(tmp_path):
    """An old-style `pytorch_model.bin` folder (read with weights_only=True), rotary buffers included."""
    reference = reference_model("qwen2-tied-sliding")
    reference.save_pretrained(tmp_path / "source")
    state = dict(reference.state_dict())
    del state["lm_head.weight"]  # tied: stored once, as `save_pretrained` does
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # what pre-4.3x checkpoints carried
    torch.save(state, tmp_path / "source" / "pytorch_model.bin")
    (tmp_path / "source" / "model.safetensors").unlink()

    agillm = load_converted(convert_to_agillm(tmp_path / "source", tmp_path / "agillm"))
    batch = left_padded_batch()
    assert (real_token_logits(agillm, batch) - real_token_logits(reference, batch)).abs().max() <= TOLERANCE


def test_hub_id_converts_from_the_local_cache_and_never_downloads(tmp_path, monkeypatch, capsys):
    """`python -m convert owner/name OUT` reads the model from the Hugging Face cache, laid out as `hf download`
    leaves it (refs/main -> snapshots/<commit>/); a model that is not cached is one clear error."""
    cache = tmp_path / "hub-cache"
    snapshot = cache / "models--someone--tiny-qwen3" / "snapshots" / "0123456789abcdef"
    reference = reference_model("qwen3-tied-default")
    reference.save_pretrained(snapshot)
    (cache / "models--someone--tiny-qwen3" / "refs").mkdir()
    (cache / "models--someone--tiny-qwen3" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # "someone/tiny-qwen3" is not a folder here

    assert cli_main(["someone/tiny-qwen3", str(tmp_path / "agillm")]) == 0
    agillm = load_converted(tmp_path / "agillm")
    batch = left_padded_batch()
    assert (real_token_logits(agillm, batch) - real_token_logits(reference, batch)).abs().max() <= TOLERANCE
    assert metadata_load(tmp_path / "agillm" / "README.md")["base_model"] == "someone/tiny-qwen3"

    with pytest.raises(ConversionError, match=r"someone/not-cached is neither a local folder nor a model in the "
                                              r"Hugging Face cache .*hf download someone/not-cached"):
        convert_to_agillm("someone/not-cached", tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_unsupported_gguf_architecture_is_rejected_from_the_header(tmp_path):
    from gguf import GGUFWriter

    (tmp_path / "source").mkdir()
    writer = GGUFWriter(tmp_path / "source" / "model.gguf", arch="falcon")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConversionError, match="model_type 'falcon'"):
        convert_to_agillm(tmp_path / "source" / "model.gguf", tmp_path / "agillm")
    assert_nothing_written(tmp_path, keep={"source"})
