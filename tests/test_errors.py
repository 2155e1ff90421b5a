"""Bad input fails early and says what is wrong: invalid configs, bad ids, over-long input, mismatched checkpoints."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError

from modeling_agillm import AgillmForCausalLM


# (config overrides on top of the tiny defaults, regex the error message must match)
INVALID_CONFIGS = {
    "heads_do_not_divide_hidden": ({"hidden_size": 30}, r"hidden_size \(30\) must be divisible by num_attention"),
    "kv_heads_do_not_divide_heads": ({"num_key_value_heads": 3}, r"num_key_value_heads \(3\) must divide"),
    "non_positive_size": ({"vocab_size": 0}, r"vocab_size must be a positive integer"),
    "unknown_layer_type": ({"layer_types": ["sparse_attention", "full_attention"]}, r"layer_types.*sparse_attention"),
    "sliding_layer_without_window": (
        {"layer_types": ["sliding_attention", "full_attention"]}, r"sliding_attention layers need a positive sliding"
    ),
    "sliding_layer_zero_window": (
        {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 0}, r"positive sliding_window"
    ),
    "chunked_layer_without_chunk": (
        {"layer_types": ["chunked_attention", "full_attention"]}, r"chunked_attention layers need a positive"
    ),
    "layer_types_length": ({"layer_types": ["full_attention"]}, r"layer_types has 1 entries, expected 2"),
    "nope_index_too_large": ({"nope_layers": [2]}, r"nope_layers \[2\] are not layer indices"),
    "nope_index_negative": ({"nope_layers": [-1]}, r"nope_layers \[-1\] are not layer indices"),
    "unknown_norm_type": ({"norm_type": "batch_norm"}, r"norm_type.*expected one of .*batch_norm"),
    "unknown_rope_type": ({"rope_parameters": {"rope_type": "spiral", "rope_theta": 1.0e4}}, r"Unknown rope_type"),
}


@pytest.mark.parametrize("overrides, message", INVALID_CONFIGS.values(), ids=INVALID_CONFIGS.keys())
def test_invalid_config_raises_at_construction(make_config, overrides, message):
    """As transformers' own configs: huggingface_hub's strict-dataclass errors, naming the field."""
    with pytest.raises(StrictDataclassError, match=message):
        make_config(**overrides)


def test_rope_parameters_missing_required_key_are_rejected(make_config):
    """transformers' own RoPE validation runs at construction too; AGILLM's error names the missing key."""
    with pytest.raises(StrictDataclassError, match="factor"):
        make_config(rope_parameters={"rope_type": "linear", "rope_theta": 1e4})


def test_edited_configs_are_checked_on_assignment_validate_and_save(make_config, tmp_path):
    """A closed choice is checked when assigned; a combination by `validate()` and before `save_pretrained` writes."""
    config = make_config()
    with pytest.raises(StrictDataclassError, match="norm_type.*batch_norm"):
        config.norm_type = "batch_norm"
    config.num_key_value_heads = 3  # a valid int, an invalid combination
    with pytest.raises(StrictDataclassError, match=r"validate_architecture.*\n.*num_key_value_heads \(3\) must divide"):
        config.validate()
    with pytest.raises(StrictDataclassError, match=r"num_key_value_heads \(3\) must divide"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_valid_edge_configs_are_accepted(make_config):
    """The checks must not reject what the model supports: MQA, explicit head_dim, every layer kind, NoPE."""
    config = make_config(
        hidden_size=30, head_dim=8, num_key_value_heads=1, num_hidden_layers=3, nope_layers=[0, 2],
        layer_types=["sliding_attention", "chunked_attention", "full_attention"], sliding_window=2,
        attention_chunk_size=3,
    )
    assert (config.head_dim, config.num_key_value_heads, config.nope_layers) == (8, 1, [0, 2])


# --------------------------------------------------------------------------------------------- bad input ids


@pytest.mark.parametrize("bad_id", [128, 10_000, -1], ids=["vocab_size", "far_above", "negative"])
def test_out_of_vocab_ids_raise_value_error(make_model, bad_id):
    model = make_model()  # vocab_size 128
    input_ids = torch.tensor([[5, 6, bad_id, 7]])
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 128\) \(vocab_size\).*tokenizer"):
        model(input_ids)


def test_out_of_vocab_ids_raise_in_generate(make_model):
    model = make_model()
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 128\)"):
        model.generate(torch.tensor([[5, 300]]), attention_mask=torch.ones(1, 2, dtype=torch.long), max_new_tokens=2)


def test_over_long_input_raises_value_error(make_model):
    model = make_model()  # max_position_embeddings 64
    model(torch.full((1, 64), 5))  # exactly the limit is fine
    with pytest.raises(ValueError, match=r"position 64, beyond max_position_embeddings=64"):
        model(torch.full((1, 65), 5))


def test_generation_past_max_positions_raises_value_error(make_model):
    model = make_model()
    prompt = torch.full((1, 60), 5)
    with pytest.raises(ValueError, match=r"beyond max_position_embeddings=64"):
        model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                       max_new_tokens=10, min_new_tokens=10)


def test_dynamic_rope_may_run_past_max_positions(make_model):
    """`rope_type="dynamic"` is built to extrapolate, so the length check must let it through."""
    model = make_model(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with torch.no_grad():
        logits = model(torch.full((1, 80), 5)).logits
    assert logits.shape == (1, 80, model.config.vocab_size) and torch.isfinite(logits).all()


def test_input_ids_and_inputs_embeds_are_exclusive(make_model):
    model = make_model()
    input_ids = torch.tensor([[5, 6]])
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(input_ids=input_ids, inputs_embeds=model.get_input_embeddings()(input_ids))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()


# --------------------------------------------------------------------------------------------- bad checkpoints

MISMATCHED_CONFIGS = {
    "mlp_width": {"intermediate_size": 96},
    "vocab": {"vocab_size": 256},
    "kv_heads": {"num_key_value_heads": 4},
}


@pytest.mark.parametrize("overrides", MISMATCHED_CONFIGS.values(), ids=MISMATCHED_CONFIGS.keys())
def test_loading_into_mismatched_shapes_raises(make_model, make_config, tmp_path, overrides):
    make_model().save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AgillmForCausalLM.from_pretrained(tmp_path, config=make_config(**overrides))


def test_mismatched_shapes_load_only_when_explicitly_ignored(make_model, make_config, tmp_path):
    """With `ignore_mismatched_sizes=True` the mismatched weights are re-initialised and all others kept."""
    original = make_model()
    original.save_pretrained(tmp_path)
    loaded = AgillmForCausalLM.from_pretrained(
        tmp_path, config=make_config(intermediate_size=96), ignore_mismatched_sizes=True
    )
    assert loaded.model.layers[0].mlp.up_proj.weight.shape == (96, 32)
    original_weights = original.state_dict()
    for name, weight in loaded.state_dict().items():
        if ".mlp." not in name:
            assert torch.equal(weight, original_weights[name]), f"{name} was not loaded"


def test_transformers_older_than_5_gets_a_clear_error(tmp_path):
    """The config file (the first file a remote-code load runs) names the version it needs instead of failing on
    some import with a bare ImportError. A stand-in `transformers` 4.57.1 package shadows the real one."""
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "transformers").mkdir()
    (tmp_path / "transformers" / "__init__.py").write_text('__version__ = "4.57.1"\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(repo)])}
    result = subprocess.run([sys.executable, "-c", "import configuration_agillm"], env=env, capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode != 0
    assert "ImportError: AGILLM needs transformers 5.x (tested with 5.23.0)" in result.stderr
    assert "this environment has transformers 4.57.1" in result.stderr
