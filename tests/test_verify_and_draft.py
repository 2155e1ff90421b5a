"""Single-forward staged decoding (`generate(generation_mode="verify_and_draft")`) and its training layout
(`nat_objective="draft"`), the TiDAR design: one forward verifies the previous drafts with the AR head and drafts the
next ones with the NAT head for every number of drafts that can be accepted.

What is proven here:
    - greedy output equals `generate(do_sample=False)` token for token (RoPE, both ALiBi kinds, LayerNorm, GQA;
      eager and sdpa; EOS, min length and a repetition penalty), and sampling follows AR's distribution;
    - the forward count is what the accepted drafts imply: an oracle drafter (always right) needs
      1 + ceil((N - 1) / (k + 1)) forwards for N tokens, a wrong one N;
    - each draft equals its from-scratch recomputation (so cropping the cache to the accepted tokens is exact);
    - decoding and training see the same thing: a mask block's hidden states at decode time equal the training
      pass's, and the training pass's clean half equals a plain AR pass (its AR loss is the plain AR loss);
    - the `draft` objective trains through `Trainer`.
Random models are tiny and float64 (no near-tie can flip between the compared paths).
"""

import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import Trainer, TrainingArguments

import generation_agillm
from conftest import TinyRows
from generation_agillm import _DraftLayout
from objectives_agillm import clean_and_noised_pass, nat_noise


VOCAB = 96
PEAKED_INIT = 0.5  # a std of 0.02 gives near-uniform distributions on a tiny random model
VARIANTS = {
    "rope_block4": dict(nat_block_size=4),
    "draft_objective_block3": dict(nat_block_size=3, nat_objective="draft"),
    "agillm_alibi_layer_norm": dict(
        nat_block_size=4, position_embedding_type="agillm_alibi", norm_type="layer_norm", mlp_type="plain",
        hidden_act="relu", mlp_bias=True,
    ),
    "alibi_mha_block5": dict(nat_block_size=5, position_embedding_type="alibi", num_key_value_heads=4),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")  # tiny models: one thread (conftest)


def draft_model(make_model, variant="rope_block4", seed=0, attn="sdpa", **overrides):
    config = {"vocab_size": VOCAB, "heads": ["ar", "nat"], "initializer_range": PEAKED_INIT}
    model = make_model(seed=seed, **{**config, **VARIANTS[variant], **overrides}).double()
    model.set_attn_implementation(attn)
    return model


def prompt(length: int, seed: int = 0) -> torch.LongTensor:
    return torch.randint(4, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def decode(model, input_ids, **kwargs):
    defaults = {"max_new_tokens": 16, "do_sample": False, "return_dict_in_generate": True}
    return model.generate(input_ids, generation_mode="verify_and_draft", **{**defaults, **kwargs})


# --------------------------------------------------------------------------------------------------- lossless


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_equals_ar_greedy(make_model, variant, attn):
    for seed, (length, max_new) in enumerate([(1, 12), (5, 17), (9, 20)]):
        model = draft_model(make_model, variant, seed=seed, attn=attn)
        input_ids = prompt(length, seed=seed)
        expected = model.generate(input_ids, max_new_tokens=max_new, do_sample=False)
        calls = []
        hook = model.model.register_forward_hook(lambda *args: calls.append(1))
        output = decode(model, input_ids, max_new_tokens=max_new)
        hook.remove()
        assert output.sequences.equal(expected), (variant, attn, seed)
        assert output.num_forward_passes == len(calls) <= max_new


def test_greedy_equals_ar_with_eos_and_logits_processors(make_model):
    model = draft_model(make_model, seed=5)
    input_ids = prompt(6, seed=5)
    eos = int(model.generate(input_ids, max_new_tokens=4, do_sample=False, eos_token_id=None)[0, -1])
    for kwargs in [{"eos_token_id": eos}, {"eos_token_id": eos, "min_new_tokens": 6, "repetition_penalty": 1.3}]:
        expected = model.generate(input_ids, max_new_tokens=15, do_sample=False, **kwargs)
        for draft_length in (None, 1):
            output = decode(model, input_ids, max_new_tokens=15, draft_length=draft_length, **kwargs)
            assert output.sequences.equal(expected), (kwargs, draft_length)
        if "min_new_tokens" not in kwargs:
            assert expected.shape[1] < input_ids.shape[1] + 15  # EOS did stop it early


def test_sampling_follows_the_ar_distribution(make_model):
    """Speculative sampling with deterministic drafts: the first two tokens' marginals match AR's softmax."""
    model = draft_model(make_model, seed=2, vocab_size=12, hidden_size=16, num_hidden_layers=1, eos_token_id=None)
    input_ids = prompt(4, seed=2) % 8 + 4
    first = (model(input_ids).logits[0, -1] / 2.0).softmax(-1)
    continued = torch.cat([input_ids.expand(12, -1), torch.arange(12)[:, None]], dim=-1)
    second = first @ (model(continued).logits[:, -1] / 2.0).softmax(-1)
    torch.manual_seed(0)
    draws = 400
    samples = torch.stack([
        decode(model, input_ids, max_new_tokens=2, do_sample=True, temperature=2.0, top_k=0).sequences[0, 4:]
        for _ in range(draws)
    ])
    for position, exact in enumerate((first, second)):
        empirical = torch.bincount(samples[:, position], minlength=12).double() / draws
        assert 0.5 * (empirical - exact).abs().sum() < 0.12, position


# --------------------------------------------------------------------------------------------------- forwards


class DraftRecorder:
    """Wraps `_verify` and `_argmax_draft`: records (text so far, drafts) and can replace the drafts."""

    def __init__(self, monkeypatch, replace=None):
        self.text_so_far, self.records, self.replace = None, [], replace
        original_verify, original_draft = generation_agillm._verify, generation_agillm._argmax_draft

        def verify(run, generated, proposal, logits):
            accepted = original_verify(run, generated, proposal, logits)
            self.text_so_far = run.input_ids[0].tolist() + generated + accepted
            return accepted

        def draft(run, logits):
            drafts = original_draft(run, logits)
            if self.replace is not None:
                drafts = self.replace(self.text_so_far, len(drafts))
            self.records.append((list(self.text_so_far), drafts))
            return drafts

        monkeypatch.setattr(generation_agillm, "_verify", verify)
        monkeypatch.setattr(generation_agillm, "_argmax_draft", draft)


@pytest.mark.parametrize("draft_length", [1, 3])
def test_forward_count_follows_the_accepted_drafts(make_model, monkeypatch, draft_length):
    """Always-right drafts: k + 1 tokens per forward after the prefill; always-wrong drafts: one token per forward."""
    model = draft_model(make_model, seed=3, eos_token_id=None)
    input_ids, new = prompt(7, seed=3), 19
    expected = model.generate(input_ids, max_new_tokens=new, do_sample=False)
    reference = expected[0].tolist()

    def oracle(text, count):
        return reference[len(text) : len(text) + count]

    def wrong(text, count):
        return [(token + 1 - 4) % (VOCAB - 4) + 4 for token in oracle(text, count)]

    for drafter, forwards in [(oracle, 1 + math.ceil((new - 1) / (draft_length + 1))), (wrong, new)]:
        DraftRecorder(monkeypatch, replace=drafter)
        output = decode(model, input_ids, max_new_tokens=new, draft_length=draft_length)
        assert output.sequences.equal(expected), drafter.__name__
        assert output.num_forward_passes == forwards, drafter.__name__


def reference_drafts(model, text: list[int], count: int) -> list[int]:
    """Drafts recomputed without a cache: the text before AR's last token, one mask block whose slot 0 stands where
    that token is (the forward that drafted did not know it yet); drafts are slots 1 .. count."""
    context = text[:-1]
    layout = _DraftLayout(context, [], 0, model.config.nat_block_size, model.config.nat_mask_token_id)
    hidden = model.model(
        input_ids=torch.tensor([layout.tokens]), position_ids=layout.position_ids("cpu"), objective="nat",
        attention_mask={"full_attention": layout.mask(model.config, torch.float64, "cpu")},
    ).last_hidden_state[0]
    logits = model.nat_head(hidden[len(context) + 1 : len(context) + 1 + count])
    logits[:, model.config.nat_mask_token_id] = -math.inf
    return logits.argmax(-1).tolist()


@pytest.mark.parametrize("variant", ["rope_block4", "agillm_alibi_layer_norm"])
def test_every_draft_equals_its_recomputation_without_cache(make_model, monkeypatch, variant):
    recorder = DraftRecorder(monkeypatch)
    model = draft_model(make_model, variant, seed=6, eos_token_id=None)
    decode(model, prompt(8, seed=6), max_new_tokens=20)
    assert len(recorder.records) > 3
    for text, drafts in recorder.records:
        assert drafts == reference_drafts(model, text, len(drafts)), text


# --------------------------------------------------------------------------------------------------- training


def test_decode_layout_equals_the_training_layout(make_model):
    """A mask block at decode time (cache-free, prefix = k whole blocks) has exactly the hidden states of block k
    in the training pass; the training pass's clean half is a plain AR pass, so its AR loss is the plain one."""
    model = draft_model(make_model, "draft_objective_block3", objective_weights={"ar": 1.0, "nat": 0.5})
    block = model.config.nat_block_size
    input_ids = torch.randint(4, VOCAB, (2, 4 * block), generator=torch.Generator().manual_seed(1))
    noised, targets = nat_noise(model, input_ids, input_ids)
    assert (noised == model.config.nat_mask_token_id).all() and targets.equal(input_ids)
    inputs = {"input_ids": input_ids, "attention_mask": None, "position_ids": None}
    trained = clean_and_noised_pass(model, inputs, noised).last_hidden_state
    length = input_ids.shape[1]
    assert trained[:, :length].equal(model.model(input_ids).last_hidden_state)
    for row in range(2):
        for k in range(1, 4):
            text = input_ids[row, : k * block].tolist()
            layout = _DraftLayout(text, [], 0, block, model.config.nat_mask_token_id)
            hidden = model.model(
                input_ids=torch.tensor([layout.tokens]), position_ids=layout.position_ids("cpu"), objective="nat",
                attention_mask={"full_attention": layout.mask(model.config, torch.float64, "cpu")},
            ).last_hidden_state[0, len(text) :]
            torch.testing.assert_close(hidden, trained[row, length + k * block : length + (k + 1) * block],
                                       rtol=0, atol=1e-12)
    model.train()
    output = model(input_ids, labels=input_ids)
    plain_ar = model(input_ids, labels=input_ids, objective="ar").loss
    assert set(output.objective_losses) == {"ar", "nat"}
    assert output.objective_losses["ar"].item() == pytest.approx(plain_ar.item(), rel=1e-12)
    assert output.loss.item() == pytest.approx(plain_ar.item() + 0.5 * output.objective_losses["nat"].item())
    output.loss.backward()
    assert model.nat_head.weight.grad.abs().sum() > 0 and model.lm_head.weight.grad is not None


def test_draft_objective_trains_with_trainer(make_model, tmp_path):
    model = make_model(seed=0, vocab_size=VOCAB, heads=["ar", "nat"], nat_block_size=4, nat_objective="draft")
    dataset = TinyRows()
    rows = [dataset[index] for index in range(len(dataset))]  # (a map-style Dataset has no end to iterate to)
    with torch.no_grad():
        before = [model(row["input_ids"][None], labels=row["labels"][None]).objective_losses for row in rows]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=25, learning_rate=3e-3,
        report_to=[], save_strategy="no", logging_steps=5, use_cpu=True, disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=dataset).train()
    model.eval()
    with torch.no_grad():
        after = [model(row["input_ids"][None], labels=row["labels"][None]).objective_losses for row in rows]
    for head in ("ar", "nat"):
        mean = lambda losses: sum(float(entry[head]) for entry in losses) / len(losses)  # noqa: E731
        assert mean(after) < mean(before) - 0.5, head


# --------------------------------------------------------------------------------------------------- errors


def test_what_verify_and_draft_cannot_do_is_rejected(make_model):
    block = draft_model(make_model)
    ids = prompt(5)
    cases = [
        (make_model(vocab_size=VOCAB, heads=["ar"]), {}, "needs the 'nat' head"),
        (draft_model(make_model, nat_block_size=None), {}, "nat_block_size >= 2"),
        (block, {"input_ids": ids.repeat(2, 1)}, "one sequence at a time"),
        (block, {"draft_length": 4}, r"draft_length must be an integer in \[1, nat_block_size - 1 = 3\]"),
        (block, {"draft_length": 0}, "draft_length"),
        (block, {"num_beams": 2}, "greedily or by sampling"),
        (block, {"draft": "sat"}, "option of generation_mode='staged'"),
    ]
    for model, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model.generate(**{"input_ids": ids, **kwargs}, generation_mode="verify_and_draft", max_new_tokens=4)
    for overrides in ({"heads": ["ar"]}, {"nat_block_size": 1}, {"nat_block_size": None}):
        with pytest.raises(StrictDataclassError, match="nat_objective='draft' trains a block NAT head"):
            make_model(vocab_size=VOCAB, **{"heads": ["ar", "nat"], **overrides}, nat_objective="draft")
    with pytest.raises(StrictDataclassError, match="nat_objective.*expected one of.*diffuse"):
        make_model(vocab_size=VOCAB, heads=["ar", "nat"], nat_objective="diffuse")


def test_head_logits_equal_the_head():
    """`_head_logits` (a CPU route for 2-3 rows) gives the head's logits, and leaves other heads to their forward."""
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    torch.nn.init.normal_(head.weight, generator=generator)
    rows = torch.randn(5, 16, generator=generator)
    for count in range(1, 6):
        torch.testing.assert_close(generation_agillm._head_logits(head, rows[:count]), head(rows[:count]))
    head.register_forward_hook(lambda module, inputs, output: output * 2)  # a hook must still run
    torch.testing.assert_close(generation_agillm._head_logits(head, rows[:2]), 2 * (rows[:2] @ head.weight.T))
    biased = torch.nn.Linear(16, 50)
    torch.testing.assert_close(generation_agillm._head_logits(biased, rows[:2]), biased(rows[:2]))
