"""Multi-token prediction (DeepSeek-V3 MTP): AGILLM's training loss against transformers' own MTP inference.

AGILLM trains its MTP modules in `objectives_agillm.mtp_loss`; transformers drafts with them through `MtpModel`
(`generate(use_mtp=True)`, `MTPCandidateGenerator`), which loads the same weights from the saved folder under its
own names. The two must compute the same function, or what was trained is not what drafts. Checked here on tiny
random models, for depth 1 and 2:
    - the drafted logits `MtpModel` computes over a sequence equal the logits AGILLM's loss scores, depth by depth,
      and `objective_losses["mtp"]` is the mean over depths of their cross-entropy with tokens t + k + 2;
    - the loss reaches every MTP parameter, and a frozen trunk trains only the MTP modules;
    - `generate(use_mtp=True)` on a folder loaded as remote code equals plain greedy decoding, prompt by prompt;
    - save and reload keep the MTP weights; `use_mtp=True` without MTP modules raises a clear `ValueError`.
Budget: about 11 s of CPU time (19 s wall on a 2-core machine shared with other jobs).
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.modeling_layers import MtpModel

from conftest import build_tiny_model
from modeling_agillm import AgillmForCausalLM


INIT_STD = 0.1  # larger than the default so the MTP layers' outputs vary with their inputs
SEQ_LEN = 12
NEW_TOKENS = 12


def mtp_parameters(model) -> dict[str, torch.Tensor]:
    first = model.config.num_hidden_layers
    prefixes = tuple(f"model.layers.{first + k}." for k in range(model.config.num_mtp_layers))
    return {name: parameter for name, parameter in model.named_parameters() if name.startswith(prefixes)}


@pytest.fixture(scope="module", params=[1, 2], ids=["depth1", "depth2"])
def saved(request, tmp_path_factory):
    """A tiny MTP model, saved, and loaded back as remote code (what `generate(use_mtp=True)` needs)."""
    model = build_tiny_model(seed=0, num_mtp_layers=request.param, initializer_range=INIT_STD)
    folder = tmp_path_factory.mktemp(f"agillm-mtp{request.param}")
    model.save_pretrained(folder)
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    return model, loaded, folder


@pytest.fixture
def sequence():
    return torch.randint(4, 128, (2, SEQ_LEN), generator=torch.Generator().manual_seed(3))


def agillm_mtp_logits(model, sequence) -> tuple[list[torch.Tensor], object]:
    """The training forward's output and the logits its MTP loss scored: `lm_head`'s calls after the main head's."""
    calls = []
    handle = model.lm_head.register_forward_hook(lambda module, args, output: calls.append(output))
    try:
        output = model(sequence, labels=sequence)
    finally:
        handle.remove()
    assert len(calls) == 1 + model.config.num_mtp_layers
    return calls[1:], output


def transformers_mtp_logits(mtp_model: MtpModel, trunk_hidden: torch.Tensor, sequence: torch.Tensor):
    """`MtpModel`'s logits at every position and depth, run layer by layer as its drafting loop does (no cache).

    Depth k sees the previous depth's hidden state at t and token t + k + 1 at its own position.
    """
    hidden, logits = trunk_hidden, []
    for depth in range(mtp_model.num_mtp_layers):
        length = sequence.shape[1] - depth - 1
        positions = torch.arange(depth + 1, depth + 1 + length)[None].expand(sequence.shape[0], -1)
        hidden = mtp_model.forward_layer(
            depth, hidden[:, :length], positions, None, input_ids=sequence[:, depth + 1 : depth + 1 + length]
        )
        logits.append(mtp_model._project_to_logits(hidden))
    return logits


def test_mtp_loss_and_logits_match_transformers_mtp_model(saved, sequence):
    model, loaded, _ = saved
    mtp_model = MtpModel.from_pretrained(loaded)  # reads the weights from the folder, as generate(use_mtp=True)
    with torch.no_grad():
        agillm_logits, output = agillm_mtp_logits(loaded, sequence)
        trunk_hidden = loaded.model(sequence).last_hidden_state
        reference_logits = transformers_mtp_logits(mtp_model, trunk_hidden, sequence)

    depth_losses = []
    for depth, (ours, theirs) in enumerate(zip(agillm_logits, reference_logits)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        targets = sequence[:, depth + 2 :]  # position t predicts token t + depth + 2; the last position has none
        depth_losses.append(F.cross_entropy(theirs[:, : targets.shape[1]].flatten(0, 1), targets.flatten()))
    expected_mtp = torch.stack(depth_losses).mean()
    torch.testing.assert_close(output.objective_losses["mtp"], expected_mtp, rtol=1e-6, atol=1e-6)
    expected_total = output.objective_losses["ar"] + model.config.mtp_loss_weight * expected_mtp
    torch.testing.assert_close(output.loss, expected_total, rtol=1e-6, atol=1e-6)


def test_gradients_reach_every_mtp_parameter(saved, sequence):
    model, _, _ = saved
    model.zero_grad()
    model(sequence, labels=sequence).objective_losses["mtp"].backward()
    parameters = mtp_parameters(model)
    assert len(parameters) > 0
    no_grad = [name for name, parameter in parameters.items() if parameter.grad is None or not parameter.grad.any()]
    assert no_grad == []
    model.zero_grad()


def test_frozen_trunk_trains_only_mtp(saved, sequence):
    _, loaded, folder = saved
    model = AgillmForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    trainable = mtp_parameters(model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trainable)
    frozen_before = {name: p.detach().clone() for name, p in model.named_parameters() if name not in trainable}
    mtp_before = {name: p.detach().clone() for name, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    losses = []
    for _ in range(8):  # overfit one batch: the MTP loss must fall
        output = model(sequence, labels=sequence)
        losses.append(output.objective_losses["mtp"].item())
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if n not in trainable)
    assert all(not torch.equal(p, mtp_before[n]) for n, p in trainable.items())


def test_generate_use_mtp_equals_greedy(saved, monkeypatch):
    _, loaded, _ = saved
    drafts = []
    forward = MtpModel.forward

    def recording_forward(self, *args, **kwargs):
        candidate_ids, candidate_logits, loss = forward(self, *args, **kwargs)
        drafts.append(candidate_ids.shape[1])
        return candidate_ids, candidate_logits, loss

    monkeypatch.setattr(MtpModel, "forward", recording_forward)
    generator = torch.Generator().manual_seed(11)
    for length in (3, 7, 10):
        prompt = torch.randint(4, 128, (1, length), generator=generator)
        greedy = loaded.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        drafts.clear()
        speculative = loaded.generate(
            prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, use_mtp=True
        )
        assert torch.equal(speculative, greedy), (speculative.tolist(), greedy.tolist())
        # The speculative path really ran: MtpModel drafted num_mtp_layers tokens per round.
        assert drafts and set(drafts) == {loaded.config.num_mtp_layers}


def test_save_and_reload_keep_mtp_weights(saved):
    model, loaded, _ = saved
    original, reloaded = mtp_parameters(model), mtp_parameters(loaded)
    assert original.keys() == reloaded.keys() and any(".eh_proj." in name for name in original)
    assert all(torch.equal(original[name], reloaded[name]) for name in original)


def test_use_mtp_without_mtp_layers_raises(make_model, tmp_path):
    make_model(seed=0).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    with pytest.raises(ValueError, match="num_mtp_layers=0"):
        loaded.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, use_mtp=True)


def test_use_mtp_on_a_model_not_loaded_from_a_folder_raises(sequence):
    model = build_tiny_model(seed=0, num_mtp_layers=1)
    with pytest.raises(ValueError, match="save_pretrained"):
        model.generate(sequence[:1], max_new_tokens=3, do_sample=False, use_mtp=True)


# --------------------------------------------------------------------------------------------------- cached features
# bench/mtp.py trains SmolLM2's MTP module with the trunk frozen on trunk features computed once (the trunk is ~30x
# the cost of a step otherwise). The shortcut must be the same training signal as the full forward's MTP loss.


@pytest.fixture(params=[1, 2], ids=["depth1", "depth2"])
def frozen_trunk_model(request):
    from bench.mtp import freeze_all_but_mtp

    model = build_tiny_model(seed=0, num_mtp_layers=request.param, initializer_range=INIT_STD).train()
    freeze_all_but_mtp(model)
    return model


def test_cached_feature_mtp_loss_and_gradients_equal_the_full_forward(frozen_trunk_model):
    from bench.mtp import cache_trunk_features, cached_mtp_loss

    model = frozen_trunk_model
    blocks = torch.randint(4, 128, (5, SEQ_LEN), generator=torch.Generator().manual_seed(5))
    trainable = mtp_parameters(model)
    assert trainable and all(p.requires_grad for p in trainable.values())

    full_loss = model(blocks, labels=blocks).objective_losses["mtp"]
    full_loss.backward()
    full_grads = {name: parameter.grad.clone() for name, parameter in trainable.items()}
    model.zero_grad(set_to_none=True)

    features = cache_trunk_features(model, blocks, batch_size=2)  # batched: 2 + 2 + 1 blocks
    assert model.training and not features.requires_grad and features.shape == (5, SEQ_LEN, model.config.hidden_size)
    cached_loss = cached_mtp_loss(model, blocks, features)
    cached_loss.backward()

    torch.testing.assert_close(cached_loss, full_loss, rtol=1e-6, atol=1e-6)
    for name, parameter in trainable.items():
        assert parameter.grad is not None and parameter.grad.any(), name
        torch.testing.assert_close(parameter.grad, full_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # The trunk, embedding and tied head get no gradient: the cached features are detached and everything else
    # the MTP loss touches is frozen.
    assert [name for name, p in model.named_parameters() if name not in trainable and p.grad is not None] == []


def test_cached_feature_training_changes_only_mtp_and_lowers_the_loss(frozen_trunk_model):
    from bench.mtp import CachedTraining, cache_trunk_features, train_mtp_on_cached_features

    model = frozen_trunk_model
    blocks = torch.randint(4, 128, (4, SEQ_LEN), generator=torch.Generator().manual_seed(6))
    trainable = mtp_parameters(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    features = cache_trunk_features(model, blocks, batch_size=4)
    training = CachedTraining(steps=12, batch_size=2, learning_rate=1e-2, evaluations=1)
    result = train_mtp_on_cached_features(model, blocks, features, training, held_out=(blocks, features))
    first, last = result["held_out_mtp_loss"][0], result["held_out_mtp_loss"][-1]
    assert (first["step"], last["step"]) == (0, 12) and last["loss"] < 0.8 * first["loss"], result
    assert result["tokens_seen"] == 12 * 2 * SEQ_LEN and result["epochs"] == 6
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n not in trainable)
    assert all(not torch.equal(p, before[n]) for n, p in trainable.items())


def test_cached_feature_training_refuses_a_trainable_trunk():
    from bench.mtp import CachedTraining, cache_trunk_features, train_mtp_on_cached_features

    model = build_tiny_model(seed=0, num_mtp_layers=1)  # nothing frozen: the cached features would go stale
    blocks = torch.randint(4, 128, (2, SEQ_LEN), generator=torch.Generator().manual_seed(7))
    features = cache_trunk_features(model, blocks, batch_size=2)
    training = CachedTraining(steps=1, batch_size=1, learning_rate=0.1)
    with pytest.raises(ValueError, match="frozen trunk"):
        train_mtp_on_cached_features(model, blocks, features, training)
