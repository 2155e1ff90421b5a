"""`kernels/exported_decoder.py`: the model exported and compiled by AOTInductor, run as `generate`'s loop.

The compiled decoder must compute the model's function (logits of a prompt and of every cached step to fp32
rounding), and `generate(custom_generate=decoder)` must return exactly what `generate` returns: greedy with logits
processors, sampling under the same seed, stopping at EOS. A package loads back in a new decoder, and
every request it cannot serve, or a model it was not compiled from, is refused with a clear error. Each compile
costs about 12 s on a 2-core CPU, so the module compiles two tiny models once (fp32, and int4 weights).
"""

import pytest
import torch

from kernels.exported_decoder import ExportedDecoder, weights_fingerprint
from kernels.quantized_linear import quantize_weights

from conftest import build_tiny_model, one_torch_thread_per_module  # noqa: F401 (fixture)


pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")

MAX_CACHE_LEN = 40
GREEDY = {"do_sample": False, "pad_token_id": 0}


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=0)


@pytest.fixture(scope="module")
def decoder(model, tmp_path_factory):
    return ExportedDecoder.compile(model, MAX_CACHE_LEN, tmp_path_factory.mktemp("aot") / "tiny.pt2")


def prompt(length: int, seed: int = 0) -> torch.LongTensor:
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def both(model, decoder, ids, **kwargs):
    """(`generate`, `generate(custom_generate=decoder)`) on the same request."""
    return model.generate(ids, **kwargs), model.generate(ids, custom_generate=decoder, **kwargs)


# ------------------------------------------------------------------------------------------ the compiled function


def test_prompt_and_cached_steps_give_the_model_logits(model, decoder):
    ids = prompt(9)
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(decoder.forward(ids[:, :6], start=0), expected[:, :6], rtol=1e-5, atol=1e-5)
    for position in range(6, 9):  # one token at a time over the cache the prompt left
        torch.testing.assert_close(decoder.forward(ids[:, position:position + 1], start=position),
                                   expected[:, position:position + 1], rtol=1e-5, atol=1e-5)


def test_a_new_prompt_overwrites_the_previous_one(model, decoder):
    decoder.forward(prompt(20, seed=1), start=0)  # a longer earlier request leaves stale keys past position 5
    ids = prompt(5, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(decoder.forward(ids, start=0), model(ids).logits, rtol=1e-5, atol=1e-5)


def test_package_loads_back(model, decoder):
    loaded = ExportedDecoder.load(decoder.package_path)
    assert (loaded.max_cache_len, loaded.vocab_size) == (MAX_CACHE_LEN, 128)
    ids = prompt(4)
    torch.testing.assert_close(loaded.forward(ids, start=0), decoder.forward(ids, start=0), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ generate


@pytest.mark.parametrize("length", [1, 2, 7])
def test_greedy_generate_is_generate(model, decoder, length):
    expected, output = both(model, decoder, prompt(length), max_new_tokens=12, min_new_tokens=12, **GREEDY)
    assert torch.equal(output, expected)


def test_logits_processors_apply(model, decoder):
    kwargs = {"max_new_tokens": 15, "repetition_penalty": 1.5, "no_repeat_ngram_size": 2, **GREEDY}
    expected, output = both(model, decoder, prompt(6, seed=3), **kwargs)
    assert torch.equal(output, expected)
    plain = model.generate(prompt(6, seed=3), custom_generate=decoder, max_new_tokens=15, **GREEDY)
    assert not torch.equal(plain, output)  # the processors changed the continuation


def test_sampling_follows_the_same_random_stream(model, decoder):
    kwargs = {"do_sample": True, "temperature": 1.3, "top_k": 20, "max_new_tokens": 16, "pad_token_id": 0}
    torch.manual_seed(7)
    expected = model.generate(prompt(5), **kwargs)
    torch.manual_seed(7)
    output = model.generate(prompt(5), custom_generate=decoder, **kwargs)
    assert torch.equal(output, expected)


def test_stops_at_eos(model, decoder):
    free = model.generate(prompt(4), max_new_tokens=12, **GREEDY)
    eos = free[0, 8].item()  # a token the continuation emits
    expected, output = both(model, decoder, prompt(4), max_new_tokens=12, eos_token_id=eos, **GREEDY)
    assert torch.equal(output, expected) and output[0, -1] == eos and output.shape[1] <= 9


def test_int4_weights_export_as_they_are(tmp_path):
    model = quantize_weights(build_tiny_model(seed=4), bits=4, group_size=32, compute_dtype=torch.float32)
    decoder = ExportedDecoder.compile(model, 24, tmp_path / "int4.pt2")
    expected, output = both(model, decoder, prompt(6, seed=5), max_new_tokens=10, min_new_tokens=10, **GREEDY)
    assert torch.equal(output, expected)


def test_autotuned_int8_package_computes_the_model_logits(tmp_path):
    """`max_autotune=True`: inductor may swap the int8 matmuls for its own C++ template, which must compute the same
    function (to fp32 accumulation rounding) on the prompt and on cached steps."""
    model = quantize_weights(build_tiny_model(seed=6), bits=8, compute_dtype=torch.float32)
    decoder = ExportedDecoder.compile(model, 24, tmp_path / "int8-tuned.pt2", max_autotune=True)
    ids = prompt(9, seed=7)
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(decoder.forward(ids[:, :6], start=0), expected[:, :6], rtol=1e-4, atol=1e-4)
    for position in range(6, 9):
        torch.testing.assert_close(decoder.forward(ids[:, position:position + 1], start=position),
                                   expected[:, position:position + 1], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ what it refuses


@pytest.mark.parametrize(
    "ids, kwargs, message",
    [
        (prompt(4).repeat(2, 1), {}, "one sequence at a time"),
        (prompt(4), {"attention_mask": torch.tensor([[0, 1, 1, 1]])}, "padded prompts"),
        (prompt(30), {"max_new_tokens": 11}, "more than the 40"),
        (prompt(4), {"num_beams": 2}, "no beam search"),
        (prompt(4), {"return_dict_in_generate": True}, "return_dict_in_generate"),
    ],
)
def test_requests_it_cannot_serve_are_refused(model, decoder, ids, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate(ids, custom_generate=decoder, **{"max_new_tokens": 4, **GREEDY, **kwargs})


def test_out_of_range_ids_are_refused(model, decoder):
    with pytest.raises(ValueError, match=r"Token ids must lie in \[0, 128\)"):
        model.generate(torch.tensor([[3, 128]]), custom_generate=decoder, max_new_tokens=4, **GREEDY)


def test_other_weights_are_refused(decoder):
    other = build_tiny_model(seed=9)
    assert weights_fingerprint(other) != decoder.weights_fingerprint
    with pytest.raises(ValueError, match="compiled from other weights"):
        other.generate(prompt(4), custom_generate=decoder, max_new_tokens=4, **GREEDY)


def test_compile_refuses_training_mode_and_load_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match="eval mode"):
        ExportedDecoder.compile(build_tiny_model().train(), 16, tmp_path / "x.pt2")
    with pytest.raises(FileNotFoundError, match="No compiled decoder"):
        ExportedDecoder.load(tmp_path / "missing.pt2")
    assert list(tmp_path.iterdir()) == []
