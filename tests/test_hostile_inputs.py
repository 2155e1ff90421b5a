"""Hostile input: configs, tensors and media that make no sense get a clear, early error, never a silent answer.

Each case is one thing a user (or a bug upstream of AGILLM) can hand the model: a NaN where a float belongs, a mask
that does not fit the ids, an empty image, an absurd sampling rate. The test checks the error type, that the message
names what is wrong, and, where it matters, that nothing expensive ran first. Bad files and the `convert` CLI are in
`tests/test_hostile_files.py`; the older checks (bad ids, over-long input, invalid layer setups) in
`tests/test_errors.py`.
"""

import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from PIL import Image

from configuration_agillm import AgillmConfig
from feature_extraction_agillm import AgillmFeatureExtractor
from image_processing_agillm import AgillmImageProcessor
from modeling_agillm import AgillmForCausalLM, AgillmForConditionalGeneration, parameter_count_lower_bound
from test_multimodal_model import NUM_MEL_BINS, TINY_MULTIMODAL_CONFIG, audio_run


REPO_ROOT = Path(__file__).resolve().parent.parent
NAN, INF = math.nan, math.inf

# --------------------------------------------------------------------------------------------- configs
# (config overrides on top of the tiny defaults, regex the error must match)
INVALID_NUMBERS = {
    "norm_eps_nan": ({"rms_norm_eps": NAN}, r"rms_norm_eps must be a finite number in \(0, inf\), got nan"),
    "norm_eps_inf": ({"rms_norm_eps": INF}, r"rms_norm_eps .* got inf"),
    "norm_eps_zero": ({"rms_norm_eps": 0.0}, r"rms_norm_eps .* got 0.0"),
    "norm_eps_negative": ({"rms_norm_eps": -1e-6}, r"rms_norm_eps"),
    "rope_theta_nan": ({"rope_parameters": {"rope_type": "default", "rope_theta": NAN}}, r"finite rope_theta"),
    "rope_theta_inf": ({"rope_parameters": {"rope_type": "default", "rope_theta": INF}}, r"finite rope_theta"),
    "rope_theta_zero": ({"rope_parameters": {"rope_type": "default", "rope_theta": 0.0}}, r"rope_theta"),
    "rope_factor_nan": (
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": NAN}}, r"rope|factor"
    ),
    "attention_dropout_above_one": ({"attention_dropout": 1.5}, r"attention_dropout must be a finite number in \[0, 1\)"),
    "attention_dropout_nan": ({"attention_dropout": NAN}, r"attention_dropout .* got nan"),
    "hidden_dropout_negative": ({"hidden_dropout": -0.1}, r"hidden_dropout"),
    "hidden_dropout_one": ({"hidden_dropout": 1.0}, r"hidden_dropout"),
    "objective_weight_nan": ({"objective_weights": {"ar": NAN}}, r"objective_weights must be finite numbers >= 0"),
    "objective_weight_inf": ({"objective_weights": {"ar": INF}}, r"objective_weights must be finite"),
    "objective_weights_all_zero": (
        {"heads": ["ar", "sat"], "objective_weights": {"ar": 0.0, "sat": 0.0}}, r"at least one head"
    ),
    "label_smoothing_nan": ({"label_smoothing": NAN}, r"label_smoothing must lie in \[0, 1\)"),
    "label_smoothing_per_head_inf": ({"heads": ["ar", "sat"], "label_smoothing": {"sat": INF}}, r"label_smoothing"),
    "initializer_range_inf": ({"initializer_range": INF}, r"initializer_range"),
    "mtp_loss_weight_nan": ({"num_mtp_layers": 1, "mtp_loss_weight": NAN}, r"mtp_loss_weight"),
    "router_aux_loss_nan": (
        {"num_experts": 4, "num_experts_per_tok": 2, "router_aux_loss_coef": NAN}, r"router_aux_loss_coef"
    ),
    "router_z_loss_inf": ({"num_experts": 4, "num_experts_per_tok": 2, "router_z_loss_coef": INF}, r"router_z_loss"),
    "routed_scaling_inf": ({"num_experts": 4, "num_experts_per_tok": 2, "routed_scaling_factor": INF}, r"routed_scal"),
    "router_bias_rate_nan": (
        {"num_experts": 4, "num_experts_per_tok": 2, "router_bias_update_rate": NAN}, r"router_bias_update_rate"
    ),
    "nope_temperature_scale_inf": (
        {"attn_temperature_tuning": True, "nope_layers": [0], "attn_scale": INF}, r"attn_temperature_tuning"
    ),
    "unknown_activation": ({"hidden_act": "swishy"}, r"hidden_act='swishy' is not an activation.*'silu'"),
    "vision_norm_eps_nan": (
        {"vision_config": {**TINY_MULTIMODAL_CONFIG["vision_config"], "layer_norm_eps": NAN}}, r"layer_norm_eps"
    ),
    "vision_unknown_activation": (
        {"vision_config": {**TINY_MULTIMODAL_CONFIG["vision_config"], "hidden_act": "gelu_fancy"}}, r"gelu_fancy"
    ),
    "audio_dropout_above_one": (
        {"audio_config": {**TINY_MULTIMODAL_CONFIG["audio_config"], "attention_dropout": 2.0}}, r"attention_dropout"
    ),
    "vq_ema_decay_nan": ({"vocab_size": 1024, "vq_config": {"codebook_ema_decay": NAN}}, r"codebook_ema_decay"),
    "vq_commitment_inf": ({"vocab_size": 1024, "vq_config": {"commitment_cost": INF}}, r"commitment_cost"),
}


@pytest.mark.parametrize("overrides, message", INVALID_NUMBERS.values(), ids=INVALID_NUMBERS.keys())
def test_invalid_numbers_and_names_raise_at_construction(make_config, overrides, message):
    with pytest.raises(StrictDataclassError, match=message):
        make_config(**overrides)


def test_boundary_numbers_stay_accepted(make_config):
    """The interval checks must not reject what is valid: zero dropout and weights, eps just above zero."""
    config = make_config(rms_norm_eps=1e-12, attention_dropout=0.0, hidden_dropout=0.999, heads=["ar", "sat"],
                         objective_weights={"ar": 1.0, "sat": 0.0}, label_smoothing={"ar": 0.0, "sat": 0.5},
                         initializer_range=0.0, rope_parameters={"rope_type": "default", "rope_theta": 1.0})
    assert config.objective_weights == {"ar": 1.0, "sat": 0.0}


def test_model_too_large_for_memory_fails_before_allocating(make_config):
    """A config whose weights cannot fit is refused at once, naming the size, not after minutes of swapping."""
    config = make_config(vocab_size=4_000_000, hidden_size=65_536, intermediate_size=65_536, num_hidden_layers=64,
                         num_attention_heads=64, num_key_value_heads=64)
    needed_gib = parameter_count_lower_bound(config) * 4 / 2**30
    assert needed_gib > 4_000  # terabytes: more than any machine this runs on
    started = time.perf_counter()
    with pytest.raises(MemoryError, match=r"needs at least [\d,]+\.\d GiB for its parameters .* available"):
        AgillmForCausalLM(config)
    assert time.perf_counter() - started < 5.0  # nothing was allocated: failing took no time


def test_memory_check_does_not_block_meta_construction(make_config):
    """`from_pretrained` and `init_empty_weights` build on the meta device, where no memory is needed."""
    config = make_config(vocab_size=4_000_000, hidden_size=65_536, intermediate_size=65_536, num_hidden_layers=2,
                         num_attention_heads=64, num_key_value_heads=64)
    with torch.device("meta"):
        model = AgillmForCausalLM(config)
    assert model.model.embed_tokens.weight.device.type == "meta"


def test_parameter_count_lower_bound_is_a_lower_bound(make_config):
    for overrides in ({}, {"tie_word_embeddings": False}, {"num_experts": 4, "num_experts_per_tok": 2},
                      {"mlp_type": "plain", "mlp_bias": True}):
        model = AgillmForCausalLM(make_config(**overrides))
        actual = sum(parameter.numel() for parameter in model.parameters())
        assert 0.8 * actual <= parameter_count_lower_bound(model.config) <= actual, overrides


# --------------------------------------------------------------------------------------------- tensors
def input_case(name: str):
    """Inputs for a tiny causal LM (vocab 128, batch 2 x 6 tokens) broken in one way, and the error to expect."""
    ids = torch.randint(32, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    ones = torch.ones_like(ids)
    embeds = torch.randn(2, 6, 32)
    cases = {
        "empty_sequence": ({"input_ids": ids[:, :0]}, r"Empty input: input_ids has shape \(2, 0\)"),
        "empty_batch": ({"input_ids": ids[:0]}, r"Empty input: input_ids has shape \(0, 6\)"),
        "empty_inputs_embeds": ({"inputs_embeds": embeds[:, :0]}, r"Empty input: inputs_embeds"),
        "mask_too_short": ({"input_ids": ids, "attention_mask": ones[:, :5]}, r"attention_mask has shape \(2, 5\), "
                           r"expected \(2, 6\)"),
        "mask_too_long": ({"input_ids": ids, "attention_mask": torch.ones(2, 9, dtype=torch.long)},
                          r"attention_mask has shape \(2, 9\)"),
        "mask_wrong_batch": ({"input_ids": ids, "attention_mask": ones[:1]}, r"attention_mask has shape \(1, 6\)"),
        "labels_too_short": ({"input_ids": ids, "labels": ids[:, :5]}, r"labels has shape \(2, 5\), expected \(2, 6\)"),
        "labels_wrong_batch": ({"input_ids": ids, "labels": ids[:1]}, r"labels has shape \(1, 6\)"),
        "position_ids_too_short": ({"input_ids": ids, "position_ids": torch.arange(5)[None]},
                                   r"position_ids has shape \(1, 5\), expected \(2, 6\) or \(1, 6\)"),
        "position_ids_1d": ({"input_ids": ids, "position_ids": torch.arange(6)}, r"position_ids has shape \(6,\)"),
        "position_ids_wrong_batch": ({"input_ids": ids, "position_ids": torch.arange(6).repeat(3, 1)},
                                     r"position_ids has shape \(3, 6\)"),
        "inputs_embeds_nan": ({"inputs_embeds": embeds.index_put((torch.tensor([1]), torch.tensor([3])),
                                                                 torch.tensor(NAN))}, r"NaN or infinite"),
        "inputs_embeds_inf": ({"inputs_embeds": embeds.index_put((torch.tensor([0]), torch.tensor([0])),
                                                                 torch.tensor(INF))}, r"NaN or infinite"),
    }
    return cases[name]


BAD_INPUTS = ["empty_sequence", "empty_batch", "empty_inputs_embeds", "mask_too_short", "mask_too_long",
              "mask_wrong_batch", "labels_too_short", "labels_wrong_batch", "position_ids_too_short",
              "position_ids_1d", "position_ids_wrong_batch", "inputs_embeds_nan", "inputs_embeds_inf"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_tensor_inputs_raise(make_model, case):
    model = make_model()
    inputs, message = input_case(case)
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_mask_must_cover_cached_tokens(make_model):
    """With a cache, a 2-D mask spans cached + new tokens; a mask of the new tokens only is refused."""
    model = make_model()
    ids = torch.randint(32, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    cache = model(ids, use_cache=True).past_key_values
    model(ids[:, :1], attention_mask=torch.ones(1, 7, dtype=torch.long), past_key_values=cache)  # right: accepted
    cache.crop(-1)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 1\), expected \(1, 7\).*6 cached \+ 1 new"):
        model(ids[:, :1], attention_mask=torch.ones(1, 1, dtype=torch.long), past_key_values=cache)


ALL_IGNORED_SETUPS = {
    "ar": ({}, "ar"),
    "sat": ({"heads": ["ar", "sat"]}, "sat"),
    "nat": ({"heads": ["ar", "nat"]}, "nat"),
    "multi_objective": ({"heads": ["ar", "sat", "nat"]}, None),
    "ar_with_mtp": ({"num_mtp_layers": 1}, None),
    "ar_label_smoothing": ({"label_smoothing": 0.1}, "ar"),
}


@pytest.mark.parametrize("overrides, objective", ALL_IGNORED_SETUPS.values(), ids=ALL_IGNORED_SETUPS.keys())
def test_all_ignored_labels_give_zero_loss_for_every_head(make_model, overrides, objective):
    """A batch with nothing to predict gives loss 0 whatever the head (not NaN for one and 0 for another), and a
    backward pass that leaves every gradient finite (a NaN here would poison the whole optimizer state)."""
    model = make_model(**overrides).train()
    ids = torch.randint(32, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    loss = model(ids, labels=torch.full_like(ids, -100), objective=objective).loss
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --------------------------------------------------------------------------------------------- media
ZERO_SIZE_IMAGES = {
    "pil_0x0": lambda: Image.new("RGB", (0, 0)),
    "pil_zero_width": lambda: Image.new("L", (0, 8)),
    "numpy_hwc_zero_height": lambda: np.zeros((0, 8, 3), np.uint8),
    "numpy_chw_zero_width": lambda: np.zeros((3, 8, 0), np.uint8),
    "numpy_grey_zero_height": lambda: np.zeros((0, 8), np.uint8),
    "torch_chw_empty": lambda: torch.zeros(3, 0, 0),
}


@pytest.mark.parametrize("make_image", ZERO_SIZE_IMAGES.values(), ids=ZERO_SIZE_IMAGES.keys())
def test_zero_size_images_are_refused(make_image):
    """Resizing would otherwise invent a whole 32 x 32 image out of no pixels."""
    with pytest.raises(ValueError, match=r"empty image"):
        AgillmImageProcessor()(make_image(), return_tensors="pt")


BAD_SAMPLING_RATES = {
    "string": ("16000", TypeError, r"whole number of samples per second.*'16000' of type str"),
    "fraction": (16000.5, TypeError, r"whole number"),
    "bool": (True, TypeError, r"whole number"),
    "none_like_list": ([16000], TypeError, r"whole number"),
    "one_hertz": (1, ValueError, r"1 Hz is not an audio rate"),
    "zero": (0, ValueError, r"not an audio rate"),
    "negative": (-16000, ValueError, r"not an audio rate"),
    "gigahertz": (10**9, ValueError, r"not an audio rate"),
}


@pytest.mark.parametrize("rate, error, message", BAD_SAMPLING_RATES.values(), ids=BAD_SAMPLING_RATES.keys())
def test_bad_sampling_rates_are_refused_before_resampling(rate, error, message):
    extractor = AgillmFeatureExtractor(feature_size=NUM_MEL_BINS)
    started = time.perf_counter()
    with pytest.raises(error, match=message):
        extractor(np.zeros(16000, np.float32), sampling_rate=rate)
    assert time.perf_counter() - started < 1.0  # refused, not resampled into gigabytes first


def test_plausible_sampling_rates_are_resampled():
    extractor = AgillmFeatureExtractor(feature_size=NUM_MEL_BINS)
    for rate, samples in ((8000, 8000), (44100.0, 44100), (np.int64(48000), 48000)):
        features = extractor(np.zeros(samples, np.float32), sampling_rate=rate)["input_features"]
        assert features.shape[-1] == 1 + 16000 // 160  # one second, whatever the source rate


def test_audio_longer_than_the_context_is_refused_before_the_audio_tower_runs():
    torch.manual_seed(0)
    model = AgillmForConditionalGeneration(AgillmConfig(**TINY_MULTIMODAL_CONFIG)).eval()
    calls = []
    model.model.audio_tower.register_forward_pre_hook(lambda module, args: calls.append(1))
    frames = 4 * (model.config.max_position_embeddings + 1)  # one audio token more than the context holds
    features = torch.randn(1, NUM_MEL_BINS, frames)
    ids = torch.tensor([[40, *audio_run(model.config, frames), 41]])
    with pytest.raises(ValueError, match=r"516 log-mel frames becomes 129 <\|audio\|> tokens, more than the "
                                         r"model's context \(max_position_embeddings=128\)"):
        model(ids, input_features=features)
    assert calls == []
    short = torch.randn(1, NUM_MEL_BINS, 16)
    model(torch.tensor([[40, *audio_run(model.config, 16), 41]]), input_features=short)
    assert calls == [1]  # the same path runs the tower for a clip that fits


# --------------------------------------------------------------------------------------------- the repository
def test_no_tracked_path_is_a_symlink_leaving_the_repository():
    """A fresh clone has nothing outside the repository: a tracked link there (a committed `.venv` did once) breaks
    `make` at once."""
    listing = subprocess.run(["git", "ls-files", "-s"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    links = [line.split("\t", 1)[1] for line in listing.stdout.splitlines() if line.startswith("120000 ")]
    leaving = []
    for link in links:
        target = (REPO_ROOT / link).parent / Path(REPO_ROOT / link).readlink()
        if not target.resolve().is_relative_to(REPO_ROOT):
            leaving.append(f"{link} -> {target}")
    assert leaving == []
    ignored = subprocess.run(["git", "check-ignore", "-q", ".venv"], cwd=REPO_ROOT)
    assert ignored.returncode == 0, ".venv (a directory or a symlink) must be ignored"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
