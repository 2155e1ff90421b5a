"""DiffusionBlocks: config validation, AGILLM 4.x's noise bands, group choice and loss, training through `Trainer`,
and the Euler sampler (group order, caching, determinism, save/reload as remote code).

AGILLM 4.x reference values (band edges, the `_choose_block` rule) are transcribed from its trainer
(see diffusion_blocks_agillm.py); the loss is recomputed here from the EDM formulas, independently of the module.
"""

import math
import random

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForCausalLM

import diffusion_blocks_agillm
from configuration_agillm import AgillmConfig, equal_mass_sigma_bands, uniform_layer_groups
from diffusion_blocks_agillm import DiffusionBlocksState, euler_plan
from modeling_agillm import AgillmForCausalLM

@pytest.fixture
def dblock_model(make_model):
    """Factory: a tiny DiffusionBlocks model (eval mode) with `num_layers` layers and the given settings."""

    def build(seed: int = 0, num_layers: int = 4, diffusion_blocks: dict | None = None, **overrides):
        settings = diffusion_blocks or {"num_groups": 2}
        return make_model(seed, num_hidden_layers=num_layers, diffusion_blocks=settings, **overrides)

    return build


def random_ids(vocab_size: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- config


INVALID_SETTINGS = {
    "gap_between_groups": ({"layer_groups": [[0, 1], [2, 4]]}, r"starts at 2, expected 1 \(gap or overlap\)"),
    "overlapping_groups": ({"layer_groups": [[0, 3], [2, 4]]}, r"starts at 2, expected 3 \(gap or overlap\)"),
    "groups_stop_short": ({"layer_groups": [[0, 2], [2, 3]]}, r"groups end at layer 3, expected 4"),
    "empty_group": ({"layer_groups": [[0, 0], [0, 4]]}, r"group \[0, 0\] is empty"),
    "not_a_pair": ({"layer_groups": [[0, 2, 4]]}, r"is not a \[start, end\) pair"),
    "groups_and_count": ({"layer_groups": [[0, 4]], "num_groups": 1}, r"exactly one of layer_groups"),
    "too_many_groups": ({"num_groups": 5}, r"num_groups must lie in \[1, num_hidden_layers=4\]"),
    "sigma_min_zero": ({"num_groups": 2, "sigma_min": 0.0}, r"0 < sigma_min < sigma_max"),
    "sigma_max_below_min": ({"num_groups": 2, "sigma_min": 1.0, "sigma_max": 0.5}, r"0 < sigma_min < sigma_max"),
    "negative_p_std": ({"num_groups": 2, "p_std": -1.0}, r"p_std must be positive"),
    "nan_sigma_data": ({"num_groups": 2, "sigma_data": math.nan}, r"sigma_data must be a finite number"),
    "edited_sigma_bands": ({"num_groups": 2, "sigma_bands": [0.002, 0.5, 80.0]}, r"sigma_bands .* are derived"),
    "unknown_key": ({"num_groups": 2, "blocks": 4}, r"unknown keys \['blocks'\]"),
    "nat_objective": ({"num_groups": 2, "objectives": {"ar": 1.0, "nat": 1.0}}, r"\['nat'\] are not supported"),
    "objective_without_head": ({"num_groups": 2, "objectives": {"ar": 1.0, "sat": 1.0}}, r"need heads the model"),
    "unknown_embedding_scale": ({"num_groups": 2, "embedding_scale": "unit"}, r"embedding_scale.*'unit'"),
    "no_ar_objective": ({"num_groups": 2, "objectives": {"ar": 0.0}}, r"must train 'ar' with a positive weight"),
    "unknown_group_choice": ({"num_groups": 2, "group_choice": "greedy"}, r"group_choice.*expected one of"),
    "zero_euler_steps": ({"num_groups": 2, "euler_steps_per_group": 0}, r"euler_steps_per_group must be at least 1"),
}


@pytest.mark.parametrize("settings, message", INVALID_SETTINGS.values(), ids=INVALID_SETTINGS.keys())
def test_invalid_diffusion_blocks_raise_at_construction(make_config, settings, message):
    with pytest.raises(StrictDataclassError, match=message):
        make_config(num_hidden_layers=4, diffusion_blocks=settings)


def test_uniform_partition_is_agillm4s(make_config):
    """`sp = max(1, L // B)` layers per group, the last group takes the remainder."""
    assert uniform_layer_groups(10, 4) == [[0, 2], [2, 4], [4, 6], [6, 10]]
    assert uniform_layer_groups(28, 14)[-1] == [26, 28] and uniform_layer_groups(3, 3) == [[0, 1], [1, 2], [2, 3]]
    config = make_config(num_hidden_layers=10, diffusion_blocks={"num_groups": 4})
    assert config.diffusion_blocks.layer_groups == [[0, 2], [2, 4], [4, 6], [6, 10]]
    assert config.diffusion_blocks.num_groups is None  # one source of truth in config.json


# AGILLM 4.x `_block_sigmas(B)` with its defaults (sigma 0.002..80, P_mean -1.2, P_std 1.2), as printed by its trainer.
AGILLM4_BANDS = {
    4: [0.002, 0.1341, 0.3012, 0.6766, 80],
    14: [0.002, 0.0519, 0.0837, 0.1165, 0.1527, 0.1941, 0.2427, 0.3012, 0.3738, 0.4674, 0.594, 0.7788, 1.0845,
         1.7477, 80],
}


@pytest.mark.parametrize("num_groups", AGILLM4_BANDS.keys())
def test_sigma_bands_match_agillm4(make_config, num_groups):
    config = make_config(num_hidden_layers=28, diffusion_blocks={"num_groups": num_groups})
    bands = config.diffusion_blocks.sigma_bands
    assert [round(edge, 4) for edge in bands] == AGILLM4_BANDS[num_groups]
    assert bands == equal_mass_sigma_bands(num_groups, 0.002, 80.0, -1.2, 1.2)


def test_diffusion_blocks_survive_json_round_trip(make_config):
    groups = {"layer_groups": [[0, 1], [1, 4]]}
    config = make_config(num_hidden_layers=4, heads=["ar", "sat"], diffusion_blocks=groups)
    settings = config.diffusion_blocks
    assert settings.objectives == {"ar": 1.0, "sat": 1.0} and settings.reconstruction_weight == 1.0
    reloaded = AgillmConfig.from_dict(config.to_dict())  # stored sigma_bands are re-derived and checked
    assert reloaded.diffusion_blocks == settings


# --------------------------------------------------------------------------------------------- group choice


def agillm4_choose_block(state: dict, warmup=16, max_stale=64, max_skew=1.35, stale_bonus=0.35, undertrain_bonus=0.25):
    """AGILLM 4.x `_choose_block` (schedule loss_balanced, explore 0, no router), transcribed."""
    num_groups, step = state["B"], state["step"]
    counts, emas, last_seen = state["counts"], state["loss_ema"], state["last_seen"]

    def least_trained():
        return min(range(num_groups), key=lambda i: (counts[i], last_seen[i], i))

    if step < warmup or any(c == 0 for c in counts):
        return least_trained()
    stale = [step - last_seen[i] if last_seen[i] >= 0 else step + 1 for i in range(num_groups)]
    if max_stale > 0 and max(stale) >= max_stale:
        return max(range(num_groups), key=lambda i: (stale[i], -counts[i], -i))
    max_count, min_count = max(counts), min(counts)
    if max_skew > 1.0 and min_count > 0 and (max_count / max(1, min_count)) > max_skew:
        return least_trained()
    stale_denom, count_denom = float(max(1, max_stale if max_stale > 0 else max(stale))), float(max(1, max_count))

    def score(i):
        loss_score = -1.0 if emas[i] is None else float(emas[i])
        stale_score = stale_bonus * min(1.0, max(0.0, stale[i] / stale_denom))
        undertrain_score = undertrain_bonus * max(0.0, (max_count - counts[i]) / count_denom)
        return (loss_score + stale_score + undertrain_score, -counts[i], stale[i], -i)

    return max(range(num_groups), key=score)


def agillm4_update_stats(state: dict, group: int, loss: float) -> None:
    """AGILLM 4.x `_update_stats`, transcribed."""
    state["counts"][group] += 1
    state["last_seen"][group] = state["step"]
    previous = state["loss_ema"][group]
    state["loss_ema"][group] = loss if previous is None else 0.96 * previous + 0.04 * loss
    state["step"] += 1


@pytest.fixture
def chooser(make_config):
    """Factory: a group chooser for `num_groups` one-layer groups, without random exploration unless asked."""

    def build(num_groups: int = 4, **settings) -> DiffusionBlocksState:
        diffusion_blocks = {"num_groups": num_groups, "choice_explore": 0.0, **settings}
        return DiffusionBlocksState(make_config(num_hidden_layers=num_groups, diffusion_blocks=diffusion_blocks))

    return build


@pytest.mark.parametrize("max_skew", [1.35, 0.0], ids=["skew_guard", "no_skew_guard"])
def test_group_choice_reproduces_agillm4_rule(chooser, max_skew):
    """Same choices as AGILLM 4.x over 400 steps of scripted losses: groups differ in level, one improves over time,
    one has a loss spike; every branch of the rule (warm-up, stale, skew, score) is taken."""
    state = chooser(choice_max_count_skew=max_skew)
    reference = {"B": 4, "step": 0, "counts": [0] * 4, "loss_ema": [None] * 4, "last_seen": [-1] * 4}
    rng = random.Random(0)
    choices = []
    for step in range(400):
        group = state.choose_group()
        assert group == agillm4_choose_block(reference, max_skew=max_skew), f"step {step}"
        loss = [2.0, 3.0 - step / 200, 2.5, 1.5][group] + 0.2 * rng.random() + (4.0 if 150 <= step < 160 else 0.0)
        state.record(group, loss)
        agillm4_update_stats(reference, group, loss)
        choices.append(group)
    assert state.loss_ema == pytest.approx(reference["loss_ema"]) and state.counts == reference["counts"]
    assert set(choices) == {0, 1, 2, 3}


def test_group_choice_branches(chooser):
    state = chooser(choice_max_count_skew=0.0, choice_warmup_steps=8)
    for step in range(8):  # warm-up: least trained first, ties to the least recently seen, then the lower index
        group = state.choose_group()
        assert group == step % 4
        state.record(group, [1.0, 4.0, 2.0, 3.0][group])
    for _ in range(60):  # the highest EMA (4.0) wins once warm-up is over, despite the other groups' bonuses
        group = state.choose_group()
        assert group == 1
        state.record(group, 4.0)
    assert state.step - state.last_seen[0] == 64  # group 0 (lowest loss) has now waited 64 steps
    assert state.choose_group() == 0  # stale guard

    skewed = chooser(choice_max_stale_steps=1000)
    for step in range(16):
        skewed.record(step % 4, 1.0)
    skewed.counts = [4, 4, 6, 4]  # 6 / 4 > 1.35: the least-trained group wins whatever the losses
    skewed.loss_ema = [0.0, 0.0, 9.0, 0.0]
    assert skewed.choose_group() == 0

    exploring = chooser(choice_explore=1.0)
    for step in range(16):
        exploring.record(step % 4, [1.0, 2.0, 3.0, 4.0][step % 4])
    exploring.counts[0] = 5  # counts [5, 4, 4, 4]: exploring picks group 1 (least trained, least recent), not 3
    assert exploring.choose_group() == 1
    exploring.config.diffusion_blocks.choice_explore = 0.0
    assert exploring.choose_group() == 3


def test_group_statistics_persist_in_state_dict(dblock_model):
    model = dblock_model(num_layers=4, diffusion_blocks={"num_groups": 4})
    state = model.diffusion_blocks_state
    for group, loss in [(0, 2.5), (1, float("inf")), (0, 1.5)]:
        state.record(group, loss)
    assert state.loss_ema == [pytest.approx(0.96 * 2.5 + 0.04 * 1.5), None, None, None]  # a non-finite loss is skipped
    restored = dblock_model(seed=1, num_layers=4, diffusion_blocks={"num_groups": 4})
    restored.load_state_dict(model.state_dict())  # what Trainer's resume_from_checkpoint does
    restored_state = restored.diffusion_blocks_state
    assert (restored_state.step, restored_state.counts, restored_state.last_seen) == (3, [2, 1, 0, 0], [2, 1, -1, -1])
    assert restored_state.loss_ema == state.loss_ema
    model.to(torch.bfloat16)
    assert model.state_dict()["diffusion_blocks_state._extra_state"].dtype == torch.float64  # never rounded by casts


# --------------------------------------------------------------------------------------------- training step


def test_only_the_chosen_group_is_run_and_trained(dblock_model):
    model = dblock_model(num_layers=6, diffusion_blocks={"num_groups": 3}, heads=["ar", "sat"],
                         tie_word_embeddings=False)
    model.train()
    input_ids = random_ids(model.config.vocab_size, (2, 12))
    for expected_group in range(3):  # warm-up visits each group once
        ran = []
        hooks = [layer.register_forward_pre_hook(lambda module, args, i=i: ran.append(i))
                 for i, layer in enumerate(model.model.layers)]
        model.zero_grad(set_to_none=True)
        output = model(input_ids, labels=input_ids)
        output.loss.backward()
        for hook in hooks:
            hook.remove()
        start, end = model.config.diffusion_blocks.layer_groups[expected_group]
        assert model.diffusion_blocks_state.last_group == expected_group
        assert ran == list(range(start, end)) * 2  # AR pass, then SAT pass; no other layer ran
        for name, parameter in model.named_parameters():
            in_group = any(name.startswith(f"model.layers.{i}.") for i in range(start, end))
            if name.startswith("model.layers."):
                assert (parameter.grad is not None) == in_group, name
            else:  # embeddings, final norm and all heads
                assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        assert set(output.objective_losses) == {"ar", "sat", "reconstruction"}
        low, high = model.config.diffusion_blocks.sigma_bands[expected_group : expected_group + 2]
        sigma = model.diffusion_blocks_state.last_sigma
        assert ((sigma >= low) & (sigma <= high)).all()


@pytest.mark.parametrize("reconstruction_weight, embedding_scale", [(0.0, None), (0.7, "sigma_data")],
                         ids=["agillm4", "new_defaults"])
def test_loss_is_the_edm_formula(dblock_model, monkeypatch, reconstruction_weight, embedding_scale):
    """Recomputed from the EDM formulas. AGILLM 4.x (no reconstruction, embeddings as they are) is exactly
    `mean_b(w) * CE(head(LN(c_skip * zt + c_out * group(c_in * zt))), next token)` with zt = embed(ids) + sigma * eps;
    the reconstruction adds `reconstruction_weight * mean_b(w_b * mean_{t,d} (c_skip * zt + c_out * ... - z0)^2)`,
    and `embedding_scale="sigma_data"` makes z0 = embed(ids) * sigma_data / RMS(embedding matrix)."""
    settings = {"num_groups": 2, "group_choice": "round_robin", "reconstruction_weight": reconstruction_weight,
                "embedding_scale": embedding_scale}
    model = dblock_model(num_layers=4, diffusion_blocks=settings)
    model.train()
    sigma = torch.tensor([0.25, 1.7, 0.05])  # EDM weights 5 (clamped), 4.35, 5 (clamped)
    monkeypatch.setattr(diffusion_blocks_agillm, "sample_sigmas", lambda *args, **kwargs: sigma)
    input_ids = random_ids(model.config.vocab_size, (3, 10))
    model.diffusion_blocks_state.record(0, 1.0)  # round-robin: the next step trains group 1 (layers 2, 3)

    torch.manual_seed(7)
    loss = model(input_ids, labels=input_ids).loss
    assert model.diffusion_blocks_state.last_group == 1
    torch.manual_seed(7)  # the AR pass's noise is the step's first draw (round-robin and sigma draw none)
    with torch.no_grad():
        sd, s = 0.5, sigma[:, None, None]
        clean = model.model.embed_tokens(input_ids)
        if embedding_scale is not None:
            clean = clean * sd / model.model.embed_tokens.weight.pow(2).mean().sqrt()
        noisy = clean + sigma[:, None, None] * torch.randn_like(clean)
        c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2) ** 0.5, 1 / (s**2 + sd**2) ** 0.5
        hidden = c_in * noisy
        position_embeddings = model.model.rotary_emb(hidden, torch.arange(10)[None])
        for layer in model.model.layers[2:4]:  # sdpa without a mask is causal
            hidden = layer(hidden, attention_mask=None, position_embeddings=position_embeddings)
        denoised = c_skip * noisy + c_out * hidden
        weight = ((sigma**2 + sd**2) / (sigma * sd) ** 2).clamp(max=5.0)
        logits = model.model.norm(denoised)[:, :-1] @ model.model.embed_tokens.weight.T  # tied head, no bias
        targets = input_ids[:, 1:].reshape(-1)
        cross_entropy = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)
        reconstruction = (weight * (denoised - clean).pow(2).mean(dim=(1, 2))).mean()
        expected = weight.mean() * cross_entropy + reconstruction_weight * reconstruction
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_trainer_lowers_diffusion_blocks_loss(dblock_model, tokenizer, tmp_path):
    """`Trainer`, unchanged, on real text: the DiffusionBlocks loss falls, and every group gets trained."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from corpus.shakespeare import train_and_held_out

    ids = tokenizer(train_and_held_out()[0][0][:20_000])["input_ids"]
    blocks = [ids[i * 32 : (i + 1) * 32] for i in range(32)]  # 32 blocks of 32 tokens, seen repeatedly
    model = dblock_model(seed=0, num_layers=4, diffusion_blocks={"num_groups": 2}, heads=["ar", "sat"],
                         vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128).train()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=48, per_device_train_batch_size=8, learning_rate=3e-3, warmup_steps=0,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": blocks, "labels": blocks}))
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    state = model.diffusion_blocks_state
    print(f"DiffusionBlocks Trainer loss: first 8 steps {first:.2f}, last 8 steps {last:.2f}; {state}")
    assert last < 0.7 * first, f"loss {first:.2f} -> {last:.2f}"
    assert state.step == 48 and min(state.counts) >= 16 and all(ema is not None for ema in state.loss_ema)


# --------------------------------------------------------------------------------------------- Euler sampler


def test_euler_plan_is_band_aligned(make_config):
    config = make_config(num_hidden_layers=6, diffusion_blocks={"num_groups": 3, "euler_steps_per_group": 2})
    settings = config.diffusion_blocks
    plan = euler_plan(settings)
    bands = settings.sigma_bands
    assert [step.group for step in plan] == [2, 2, 1, 1, 0, 0]
    assert [step.sigma for step in plan][::2] == pytest.approx([bands[3], bands[2], bands[1]])
    for step in plan:  # each group is evaluated inside its own band, and the steps chain down to sigma = 0
        assert bands[step.group] <= step.sigma <= bands[step.group + 1]
    assert [step.sigma_next for step in plan[:-1]] == [step.sigma for step in plan[1:]] and plan[-1].sigma_next == 0.0
    assert plan[0].c_in == pytest.approx(1 / math.sqrt(80.0**2 + 0.25))


def generate_euler(model, input_ids, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return model.generate(input_ids, generation_mode="diffusion_euler", do_sample=False, max_new_tokens=4,
                          min_new_tokens=4, return_dict_in_generate=True, output_logits=True, **kwargs)


def test_euler_sampler_runs_the_configured_groups_once_per_pass_from_the_highest_band(dblock_model):
    model = dblock_model(num_layers=5, diffusion_blocks={"layer_groups": [[0, 1], [1, 3], [3, 5]]})
    ran = []
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda module, args, i=i: ran.append(i))
    input_ids = random_ids(model.config.vocab_size, (2, 6))
    output = generate_euler(model, input_ids)

    one_pass = [3, 4, 1, 2, 0]  # group 2 (layers 3-4), group 1 (1-2), group 0 (0)
    assert ran == one_pass * 4 and output.num_forward_passes == 3 * 4
    assert output.group_schedule == [2, 1, 0] and output.sequences.shape == (2, 10)
    again = generate_euler(model, input_ids)
    assert torch.equal(again.sequences, output.sequences)  # greedy with a fixed seed is deterministic
    torch.testing.assert_close(torch.stack(again.logits), torch.stack(output.logits), rtol=0, atol=0)
    other_seed = generate_euler(model, input_ids, seed=1)
    assert not torch.allclose(torch.stack(other_seed.logits), torch.stack(output.logits))  # the noise matters


EULER_VARIANTS = {
    "rope_sdpa": ({}, "sdpa"),
    "alibi_eager": ({"position_embedding_type": "alibi"}, "eager"),
    "sliding_sdpa": ({"layer_types": ["sliding_attention", "full_attention"] * 2, "sliding_window": 3}, "sdpa"),
}


@pytest.mark.parametrize("overrides, attention", EULER_VARIANTS.values(), ids=EULER_VARIANTS.keys())
def test_euler_kv_cache_matches_recomputing_every_token(dblock_model, overrides, attention):
    """Cached earlier positions give the same tokens and logits as recomputing the whole sequence per token."""
    model = dblock_model(num_layers=4, diffusion_blocks={"num_groups": 2, "euler_steps_per_group": 2}, **overrides)
    model.set_attn_implementation(attention)
    input_ids = random_ids(model.config.vocab_size, (2, 7))
    cached = generate_euler(model, input_ids, seed=3)
    recomputed = generate_euler(model, input_ids, seed=3, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(recomputed.logits), rtol=1e-4, atol=1e-5)
    assert cached.num_forward_passes == recomputed.num_forward_passes == 4 * 4


def test_euler_sampler_rejects_padding_and_models_without_diffusion_blocks(make_model, dblock_model):
    model = dblock_model()
    input_ids = random_ids(model.config.vocab_size, (2, 5))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 0] = 0
    with pytest.raises(ValueError, match="does not support padded prompts"):
        model.generate(input_ids, attention_mask=attention_mask, generation_mode="diffusion_euler", max_new_tokens=2)
    with pytest.raises(ValueError, match="needs a model built with config.diffusion_blocks"):
        make_model().generate(input_ids, generation_mode="diffusion_euler", max_new_tokens=2)


def test_save_and_reload_as_remote_code_keeps_groups_statistics_and_sampler(dblock_model, tmp_path):
    model = dblock_model(num_layers=4, diffusion_blocks={"layer_groups": [[0, 1], [1, 4]], "euler_steps_per_group": 2})
    model.train()
    input_ids = random_ids(model.config.vocab_size, (2, 8))
    for _ in range(3):
        model(input_ids, labels=input_ids).loss.backward()
    model.eval().save_pretrained(tmp_path)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(reloaded).__module__.startswith("transformers_modules.")  # the copied files, not this repository
    assert reloaded.config.diffusion_blocks.settings() == model.config.diffusion_blocks.settings()
    state, restored = model.diffusion_blocks_state, reloaded.diffusion_blocks_state
    assert (restored.step, restored.counts, restored.loss_ema) == (3, state.counts, state.loss_ema)
    expected = generate_euler(model, input_ids[:, :4])
    output = generate_euler(reloaded, input_ids[:, :4])
    assert torch.equal(output.sequences, expected.sequences) and output.group_schedule == [1, 1, 0, 0]


def test_from_pretrained_can_switch_an_ar_checkpoint_to_diffusion_blocks(make_model, tmp_path):
    """`from_pretrained(..., diffusion_blocks=...)` sets the field after the config checks; the model completes it."""
    make_model(num_hidden_layers=4).save_pretrained(tmp_path)
    model = AgillmForCausalLM.from_pretrained(tmp_path, diffusion_blocks={"num_groups": 2})
    assert model.config.diffusion_blocks.layer_groups == [[0, 2], [2, 4]]
    assert model.diffusion_blocks_state.counts == [0, 0]
