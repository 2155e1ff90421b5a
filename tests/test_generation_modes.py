"""AGILLM's parallel decoders (`generate(generation_mode=...)`, generation_agillm.py).

Strong checks first: the original AGILLM 4.x recorded greedy runs (FORMAT.md section 7) are reproduced on the
converted `dense` fixture; `staged` equals AR greedy token for token on random models (it is lossless by
construction); the cached decoders equal from-scratch references (SAT against a no-cache SAT loop, block NAT against
its no-cache path); a left-padded batch equals its rows decoded one by one; every forward is counted.

Random models are tiny, float64 (so that cache / no-cache / batch comparisons cannot flip a near-tie) and initialised
with a large std so that their distributions are peaked enough for confidence thresholds to matter.
"""

import json
import math

import pytest
import torch
from transformers import GenerationConfig, pipeline

import generation_agillm
from bench.agillm4_parity import FIXTURE_DIR
from convert import agillm4_to_agillm, load_agillm4_checkpoint


VOCAB = 96  # ids 0 pad, 1 bos, 2 eos, 3 NAT mask (the config defaults), the rest ordinary tokens
PEAKED_INIT = 0.5  # initializer_range: a std of 0.02 gives near-uniform heads on a tiny random model

# Model variants: AGILLM 4.x-like (bidirectional NAT, clamped ALiBi, LayerNorm, plain ReLU MLP) and block NAT with
# RoPE; a third with blocks of 3 so that SAT strides 1 and 2 both leave a block unfinished.
VARIANTS = {
    "bidirectional": dict(
        nat_block_size=None, position_embedding_type="agillm_alibi", norm_type="layer_norm", mlp_type="plain",
        hidden_act="relu", mlp_bias=True,
    ),
    "block4": dict(nat_block_size=4),
    "block3_sat3": dict(nat_block_size=3, sat_block_size=3, num_key_value_heads=4),
}


def parallel_model(make_model, variant: str = "block4", seed: int = 0, **overrides):
    config = {"vocab_size": VOCAB, "heads": ["ar", "sat", "nat"], "initializer_range": PEAKED_INIT}
    return make_model(seed=seed, **{**config, **VARIANTS[variant], **overrides}).double()


def prompt(length: int, seed: int = 0) -> torch.LongTensor:
    """Random ids >= 4 (no pad/bos/eos/mask)."""
    return torch.randint(4, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def left_padded(prompts: list[torch.LongTensor]):
    width = max(p.shape[1] for p in prompts)
    input_ids = torch.zeros((len(prompts), width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, width - ids.shape[1] :] = ids[0]
        attention_mask[row, width - ids.shape[1] :] = 1
    return input_ids, attention_mask


def decode(model, input_ids, mode, **kwargs):
    defaults = {"max_new_tokens": 10, "do_sample": False, "return_dict_in_generate": True}
    return model.generate(input_ids, generation_mode=mode, **{**defaults, **kwargs})


def new_tokens(output, prompt_width: int, pad_token_id: int = 0) -> list[list[int]]:
    return [row[prompt_width:].tolist() for row in output.sequences]


pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")  # tiny models: one thread (conftest)


class TrunkCounter:
    """Counts the trunk forwards a decoder really runs (a forward hook on `model.model`)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.model.register_forward_hook(self._count)

    def _count(self, *args):
        self.calls += 1


MODE_CASES = {
    "sat_fixed": ("sat", "block4", {"sat_stride": "fixed"}),
    "sat_gate": ("sat", "block3_sat3", {"sat_stride": "gate"}),
    "sat_compat": ("sat", "bidirectional", {"sat_compat": True}),
    "nat_mask_predict": ("nat_mask_predict", "bidirectional", {}),
    "nat_block": ("nat_block", "block4", {"nat_threshold": 0.3}),
    "nat_block_no_cache": ("nat_block", "block3_sat3", {"use_block_cache": False}),
    "staged_nat_block": ("staged", "block4", {}),
    "staged_nat_bidirectional": ("staged", "bidirectional", {}),
    "staged_sat": ("staged", "block3_sat3", {"draft": "sat"}),
}


# --------------------------------------------------------------------------------------------------- fixture parity


@pytest.fixture(scope="module")
def dense():
    """The converted `dense` fixture and the original's recorded greedy runs (FORMAT.md section 7)."""
    if not FIXTURE_DIR.is_dir():
        pytest.skip(f"AGILLM 4.1 fixtures not found in {FIXTURE_DIR} (set AGILLM41_FIXTURES)")
    model = agillm4_to_agillm(load_agillm4_checkpoint(FIXTURE_DIR / "dense.pt"))
    runs = json.loads((FIXTURE_DIR / "dense.expected.json").read_text())["greedy_continuation"]["runs"]
    return model, runs


def original_run(runs: dict, name: str):
    run = runs[name]
    return torch.tensor([run["prompt_ids"]]), run["generated_ids"]


def test_sat_reproduces_the_original_fixed_stride_run(dense):
    model, runs = dense
    input_ids, expected = original_run(runs, "sat_greedy_fixed_stride_no_penalties")  # --no-var, even prompt
    for compat in (False, True):  # no unfinished block arises, so the fix and the original's handling agree
        output = decode(model, input_ids, "sat", max_new_tokens=len(expected), sat_stride="fixed", sat_compat=compat)
        assert new_tokens(output, input_ids.shape[1]) == [expected]
        assert output.num_forward_passes == len(expected) // 2  # prefill + one feed per SAT step but the last


def test_nat_mask_predict_reproduces_the_original_with_four_passes(dense):
    """The recorded run passed no --nat_passes; 4 passes reproduce it (FORMAT.md's default), 1 pass does not."""
    model, runs = dense
    input_ids, expected = original_run(runs, "nat_greedy_no_penalties")
    output = decode(model, input_ids, "nat_mask_predict", max_new_tokens=len(expected), nat_passes=4)
    assert new_tokens(output, input_ids.shape[1]) == [expected]
    assert output.num_forward_passes == 4
    assert decode(model, input_ids, "nat_mask_predict", max_new_tokens=len(expected)).sequences.equal(output.sequences)
    one_pass = decode(model, input_ids, "nat_mask_predict", max_new_tokens=len(expected), nat_passes=1)
    assert new_tokens(one_pass, input_ids.shape[1]) != [expected]
    # Options may also ride on a GenerationConfig, merged as `generate` merges everything else.
    config = GenerationConfig(max_new_tokens=len(expected), do_sample=False, nat_passes=1)
    from_config = model.generate(input_ids, generation_config=config, generation_mode="nat_mask_predict")
    assert from_config.equal(one_pass.sequences)


@pytest.mark.parametrize("draft", ["nat", "sat"])
def test_staged_reproduces_the_original_ar_greedy_run(dense, draft):
    model, runs = dense
    input_ids, expected = original_run(runs, "ar_greedy_no_penalties")
    output = decode(model, input_ids, "staged", max_new_tokens=len(expected), draft=draft)
    assert new_tokens(output, input_ids.shape[1]) == [expected]


# --------------------------------------------------------------------------------------------------- every mode


@pytest.mark.parametrize("case", sorted(MODE_CASES))
def test_mode_is_deterministic_and_counts_every_forward(make_model, case):
    mode, variant, options = MODE_CASES[case]
    model = parallel_model(make_model, variant, eos_token_id=None)
    input_ids = prompt(7)
    counter = TrunkCounter(model)
    first = decode(model, input_ids, mode, max_new_tokens=9, **options)
    assert counter.calls == first.num_forward_passes > 0
    second = decode(model, input_ids, mode, max_new_tokens=9, **options)
    assert first.sequences.shape == (1, 7 + 9)  # no EOS: every new position is filled
    assert first.sequences.equal(second.sequences)
    assert first.sequences[:, :7].equal(input_ids)
    plain = model.generate(input_ids, max_new_tokens=9, do_sample=False, generation_mode=mode, **options)
    assert plain.equal(first.sequences)  # without return_dict_in_generate: the bare ids


@pytest.mark.parametrize("case", ["sat_gate", "nat_mask_predict", "nat_block", "staged_nat_block", "staged_sat"])
def test_sampling_is_reproducible_with_a_seed(make_model, case):
    mode, variant, options = MODE_CASES[case]
    model = parallel_model(make_model, variant, eos_token_id=None)
    input_ids = prompt(6, seed=3)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(decode(model, input_ids, mode, do_sample=True, temperature=1.5, top_k=3, **options).sequences)
    assert runs[0].equal(runs[1])
    if mode != "staged":  # (staged emits what AR samples, which may be any id)
        assert (runs[0][:, 6:] != model.config.nat_mask_token_id).all()  # banned from SAT and NAT output


# --------------------------------------------------------------------------------------------------- staged == AR


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("draft", ["nat", "sat"])
def test_staged_equals_ar_greedy(make_model, variant, draft):
    for seed, (length, max_new) in enumerate([(1, 12), (5, 17), (8, 9), (11, 20)]):
        model = parallel_model(make_model, variant, seed=seed)
        input_ids = prompt(length, seed=seed)
        expected = model.generate(input_ids, max_new_tokens=max_new, do_sample=False)
        output = decode(model, input_ids, "staged", max_new_tokens=max_new, draft=draft)
        assert output.sequences.equal(expected), (variant, draft, seed)
        assert output.num_forward_passes >= 1


def test_staged_equals_ar_greedy_with_eos_and_logits_processors(make_model):
    """EOS stops both the same way; processors (min length, repetition penalty) see each position's own history."""
    model = parallel_model(make_model, "block4", seed=5)
    input_ids = prompt(6, seed=5)
    # An EOS the model actually produces: the 4th token of the unconstrained greedy run.
    eos = int(model.generate(input_ids, max_new_tokens=4, do_sample=False, eos_token_id=None)[0, -1])
    settings = [{"eos_token_id": eos}, {"eos_token_id": eos, "min_new_tokens": 6, "repetition_penalty": 1.3}]
    for kwargs in settings:
        expected = model.generate(input_ids, max_new_tokens=15, do_sample=False, **kwargs)
        for draft in ("nat", "sat"):
            output = decode(model, input_ids, "staged", max_new_tokens=15, draft=draft, **kwargs)
            assert output.sequences.equal(expected), (kwargs, draft)
        if "min_new_tokens" not in kwargs:
            assert expected.shape[1] < input_ids.shape[1] + 15  # EOS did stop it early


def reference_draft(model, tokens: list[int], draft: str, count: int) -> list[int]:
    """The draft recomputed without cache: NAT over [clean blocks ; current block with masks], or SAT's last block."""
    mask_id = model.config.nat_mask_token_id
    if draft == "nat":
        block = model.config.nat_block_size
        masks = len(tokens) // block * block + block - len(tokens)
        hidden = model.model(torch.tensor([tokens + [mask_id] * masks]), objective="nat").last_hidden_state
        logits = model.nat_head(hidden[0, len(tokens) : len(tokens) + count])
    else:
        block = model.config.sat_block_size
        aligned = len(tokens) // block * block
        hidden = model.model(torch.tensor([tokens[:aligned]]), objective="sat").last_hidden_state
        known = len(tokens) - aligned
        logits = model.sat_head.proj(hidden[0, aligned - block + known : aligned - block + known + count])
    logits[:, mask_id] = -math.inf
    return logits.argmax(-1).tolist()


@pytest.mark.parametrize(("variant", "draft"), [("block4", "nat"), ("block3_sat3", "nat"), ("block3_sat3", "sat")])
def test_staged_draft_caches_are_exact(make_model, monkeypatch, variant, draft):
    """Drafts cannot change staged output, so check them directly: each equals its from-scratch recomputation."""
    drafter_class = {"nat": generation_agillm._NatBlockDrafter, "sat": generation_agillm._SatDrafter}[draft]
    drafts = []

    def recording_draft(self, tokens, budget):
        proposal = original_draft(self, tokens, budget)
        drafts.append((list(tokens), proposal))
        return proposal

    original_draft = drafter_class.draft
    monkeypatch.setattr(drafter_class, "draft", recording_draft)
    model = parallel_model(make_model, variant, seed=6, eos_token_id=None)
    decode(model, prompt(8, seed=6), "staged", max_new_tokens=20, draft=draft)  # the first draft feeds 2 blocks
    assert len(drafts) > 3 and sum(len(proposal) for _, proposal in drafts) > len(drafts)
    for tokens, proposal in drafts:
        assert proposal == reference_draft(model, tokens, draft, len(proposal)), tokens


def test_staged_sampling_follows_the_ar_distribution(make_model):
    """Speculative sampling is exact: the first two tokens' marginals match AR's softmax (total variation)."""
    model = parallel_model(make_model, "block4", seed=2, vocab_size=12, hidden_size=16, num_hidden_layers=1,
                           eos_token_id=None)
    input_ids = prompt(4, seed=2) % 8 + 4
    logits = model(input_ids).logits[0, -1]
    first = (logits / 2.0).softmax(-1)
    continued = torch.cat([input_ids.expand(12, -1), torch.arange(12)[:, None]], dim=-1)
    second = first @ (model(continued).logits[:, -1] / 2.0).softmax(-1)
    torch.manual_seed(0)
    draws = 400
    samples = torch.stack([
        decode(model, input_ids, "staged", max_new_tokens=2, do_sample=True, temperature=2.0, top_k=0).sequences[0, 4:]
        for _ in range(draws)
    ])
    for position, exact in enumerate((first, second)):
        empirical = torch.bincount(samples[:, position], minlength=12).double() / draws
        assert 0.5 * (empirical - exact).abs().sum() < 0.12, position


# --------------------------------------------------------------------------------------------------- SAT


def reference_sat(model, input_ids, max_new: int, stride_rule: str) -> list[int]:
    """SAT decoding recomputed from scratch at every step: what the cached decoder must equal (no compat)."""
    block, mask_id = model.config.sat_block_size, model.config.nat_mask_token_id
    tokens, new = input_ids[0].tolist(), []
    while len(new) < max_new:
        hidden = model.model(torch.tensor([tokens]), objective="sat").last_hidden_state[0]
        if len(tokens) % block:
            choices = [model.lm_head(hidden[-1])]
        else:
            logits, gate = model.sat_head(hidden[-block:])
            logits[:, mask_id] = -math.inf
            stride = block if stride_rule == "fixed" else int(gate[0].argmax()) + 1
            choices = list(logits[:stride])
        for logits in choices[: max_new - len(new)]:
            tokens.append(int(logits.argmax()))
            new.append(tokens[-1])
    return new


@pytest.mark.parametrize("variant", ["bidirectional", "block3_sat3"])
@pytest.mark.parametrize("stride_rule", ["fixed", "gate"])
def test_sat_equals_a_from_scratch_sat_loop(make_model, variant, stride_rule):
    """Odd and even prompts, every stride: the cache (with its re-encodes) always equals a fresh SAT pass."""
    for length in (4, 5, 6, 7):
        model = parallel_model(make_model, variant, seed=length, eos_token_id=None)
        input_ids = prompt(length, seed=length)
        output = decode(model, input_ids, "sat", max_new_tokens=11, sat_stride=stride_rule)
        assert new_tokens(output, length) == [reference_sat(model, input_ids, 11, stride_rule)], length


def test_sat_gate_strides_below_the_block_are_exercised(make_model):
    """The gate of the random model picks strides < b here, which cost AR completion forwards."""
    model = parallel_model(make_model, "block3_sat3", seed=4, eos_token_id=None)
    input_ids = prompt(6, seed=4)
    gated = decode(model, input_ids, "sat", max_new_tokens=12, sat_stride="gate")
    fixed = decode(model, input_ids, "sat", max_new_tokens=12, sat_stride="fixed")
    assert fixed.num_forward_passes == 12 // 3  # prefill + one feed per SAT step but the last
    assert gated.num_forward_passes > fixed.num_forward_passes


def test_sat_forward_counts_for_odd_and_even_prompts(make_model):
    model = parallel_model(make_model, "bidirectional", eos_token_id=None)
    for length, expected in ((6, 4), (7, 5)):  # 8 new tokens, b = 2
        # even: 4 SAT steps; odd: 1 AR alignment token (its forward re-encodes the block) + 4 SAT steps (7 tokens)
        for compat in (False, True):
            output = decode(model, prompt(length), "sat", max_new_tokens=8, sat_stride="fixed", sat_compat=compat)
            assert output.num_forward_passes == expected, (length, compat)


def test_sat_compat_differs_from_the_fix_only_on_unfinished_blocks(make_model):
    model = parallel_model(make_model, "block3_sat3", seed=1, eos_token_id=None)
    even = prompt(6, seed=1)
    fixed = {c: decode(model, even, "sat", sat_stride="fixed", sat_compat=c).sequences for c in (False, True)}
    assert fixed[False].equal(fixed[True])
    odd = prompt(7, seed=1)  # the original feeds its 2 alignment tokens alone: the earlier block members go stale
    repaired = decode(model, odd, "sat", sat_stride="fixed").sequences
    original = decode(model, odd, "sat", sat_stride="fixed", sat_compat=True).sequences
    assert repaired[0, :8].equal(original[0, :8])  # the first AR token comes from the same prefill
    assert not repaired.equal(original)


# --------------------------------------------------------------------------------------------------- NAT


@pytest.mark.parametrize("variant", ["block4", "block3_sat3"])
def test_nat_block_cache_equals_no_cache(make_model, variant):
    for seed, (length, threshold) in enumerate([(3, 0.9), (8, 0.3), (10, 0.6), (1, 0.0)]):
        model = parallel_model(make_model, variant, seed=seed, eos_token_id=None)
        input_ids = prompt(length, seed=seed)
        outputs = [
            decode(model, input_ids, "nat_block", max_new_tokens=13, nat_threshold=threshold, use_block_cache=c)
            for c in (True, False)
        ]
        assert outputs[0].sequences.equal(outputs[1].sequences), (seed, threshold)
        assert outputs[0].num_forward_passes == outputs[1].num_forward_passes


def test_nat_block_forward_counts(make_model):
    """Threshold above 1: one token per forward (AR-equivalent); threshold 0: one forward per block."""
    model = parallel_model(make_model, "block4", eos_token_id=None)
    input_ids = prompt(6)  # one complete block, then a block with 2 prompt tokens and 2 masks
    one_by_one = decode(model, input_ids, "nat_block", max_new_tokens=10, nat_threshold=1.1)
    assert one_by_one.num_forward_passes == 10
    all_at_once = decode(model, input_ids, "nat_block", max_new_tokens=10, nat_threshold=0.0)
    assert all_at_once.num_forward_passes == math.ceil((2 + 10) / 4)


def test_nat_block_stops_at_eos(make_model):
    """Threshold 0 fills a whole block per forward; an EOS in the second block ends decoding after that block."""
    model = parallel_model(make_model, "block4", seed=3, eos_token_id=None)
    input_ids = prompt(5, seed=3)  # blocks of new tokens: 3 (after 1 prompt token), 4, 4, 1
    free = decode(model, input_ids, "nat_block", max_new_tokens=12, nat_threshold=0.0)
    assert free.num_forward_passes == 4
    generated = free.sequences[0, 5:].tolist()
    eos = generated[4]
    stopped = decode(model, input_ids, "nat_block", max_new_tokens=12, nat_threshold=0.0, eos_token_id=eos)
    assert stopped.sequences[0, 5:].tolist() == generated[: generated.index(eos) + 1]
    assert stopped.num_forward_passes == (1 if generated.index(eos) < 3 else 2)


def test_nat_mask_predict_pass_counts(make_model):
    model = parallel_model(make_model, "bidirectional", eos_token_id=None)
    assert decode(model, prompt(5), "nat_mask_predict", max_new_tokens=9, nat_passes=3).num_forward_passes == 3
    assert decode(model, prompt(5), "nat_mask_predict", max_new_tokens=2, nat_passes=4).num_forward_passes == 2


@pytest.mark.parametrize("case", ["sat_gate", "nat_mask_predict", "nat_block"])
def test_eos_ends_the_output_and_min_new_tokens_holds_it_back(make_model, case):
    mode, variant, options = MODE_CASES[case]
    model = parallel_model(make_model, variant, seed=8, eos_token_id=None)
    input_ids = prompt(6, seed=8)
    eos = decode(model, input_ids, mode, **options).sequences[0, 7].item()  # the model's 2nd token becomes EOS
    stopped = decode(model, input_ids, mode, eos_token_id=eos, **options).sequences[0, 6:].tolist()
    assert len(stopped) <= 2 and stopped[-1] == eos
    held = decode(model, input_ids, mode, eos_token_id=eos, min_new_tokens=5, **options).sequences[0, 6:].tolist()
    assert len(held) >= 5 and eos not in held[:5]


# --------------------------------------------------------------------------------------------------- batches


@pytest.mark.parametrize(
    "case", ["sat_fixed", "sat_gate", "sat_compat", "nat_mask_predict", "nat_block", "nat_block_no_cache"]
)
def test_left_padded_batch_equals_rows_one_by_one(make_model, case):
    mode, variant, options = MODE_CASES[case]
    model = parallel_model(make_model, variant, seed=7, eos_token_id=5)  # EOS 5 stops some rows early
    prompts = [prompt(length, seed=length) for length in (7, 2, 4, 9)]
    input_ids, attention_mask = left_padded(prompts)
    batch = decode(model, input_ids, mode, attention_mask=attention_mask, max_new_tokens=11, **options)
    width = input_ids.shape[1]
    assert batch.sequences[:, :width].equal(input_ids)
    for row, ids in enumerate(prompts):
        alone = decode(model, ids, mode, max_new_tokens=11, **options).sequences[0, ids.shape[1] :].tolist()
        batched = batch.sequences[row, width:].tolist()
        assert batched[: len(alone)] == alone and set(batched[len(alone) :]) <= {0}, row  # then pad


# --------------------------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize(
    ("mode", "nat_block_size"),
    [("sat", 4), ("nat_block", 4), ("staged", 4), ("nat_mask_predict", None), ("staged", None)],
)
def test_text_generation_pipeline(make_model, tokenizer, mode, nat_block_size):
    model = make_model(
        vocab_size=tokenizer.vocab_size if tokenizer.vocab_size == 8192 else 8192, hidden_size=16,
        intermediate_size=32, num_hidden_layers=1, heads=["ar", "sat", "nat"], nat_block_size=nat_block_size,
        max_position_embeddings=128,
    )
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = "To be, or not to be"
    result = generator(text, generation_mode=mode, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    direct = model.generate(input_ids, max_new_tokens=6, do_sample=False, generation_mode=mode)
    assert result == tokenizer.decode(direct[0], skip_special_tokens=True)
    assert result.startswith(text) and len(result) > len(text)


# --------------------------------------------------------------------------------------------------- errors


def test_what_a_mode_cannot_do_is_rejected(make_model):
    ar_only = make_model(vocab_size=VOCAB, heads=["ar"])
    bidirectional = parallel_model(make_model, "bidirectional")
    block = parallel_model(make_model, "block4")
    ids = prompt(5)
    cases = [
        (ar_only, "sat", {}, "needs the 'sat' head"),
        (ar_only, "nat_block", {}, "needs the 'nat' head"),
        (ar_only, "staged", {}, "drafts with the NAT or SAT head"),
        (make_model(vocab_size=VOCAB, heads=["ar", "nat"]), "staged", {"draft": "sat"}, "needs the 'sat' head"),
        (bidirectional, "nat_block", {}, "nat_block_size"),
        (block, "sat", {"num_beams": 2}, "greedily or by sampling"),
        (block, "staged", {"input_ids": ids.repeat(2, 1)}, "one sequence at a time"),
        (block, "sat", {"nat_passes": 2}, "option of generation_mode='nat_mask_predict'"),
        (block, "nat_block", {"repetition_penalty": 1.2}, "out of order"),
        (block, "sat", {"sat_stride": "sometimes"}, "sat_stride"),
        (bidirectional, "nat_mask_predict", {"nat_passes": 0}, "nat_passes"),
        (block, "staged", {"draft": "mtp"}, "draft must be"),
        (block, "sat", {"streamer": object()}, "streamer"),
        (block, "sat", {"attention_mask": torch.tensor([[1, 1, 1, 1, 0]])}, "left-padded"),
        (block, "sat", {"max_length": 5}, "Nothing to generate"),
        (block, "sat", {"no_such_argument": 1}, "unexpected arguments"),
        (block, "speculative", {}, "Unknown generation_mode .speculative."),
    ]
    for model, mode, kwargs, message in cases:
        kwargs = {"input_ids": ids, **kwargs}
        with pytest.raises(ValueError, match=message):
            model.generate(generation_mode=mode, **kwargs)
