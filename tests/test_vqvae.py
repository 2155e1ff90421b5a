"""The VQ-VAE image tokenizer (vqvae_agillm.py): shapes and code range, encode -> decode, input errors, the
straight-through gradient, EMA codebook updates (train mode only), dead-code restarts, save/load, and a short
training run on real digits that must clearly lower the reconstruction loss.

Models are tiny (8x8 or 16x16 images, a few hundred parameters per level) so the file runs in seconds on CPU.
"""

import numpy as np
import pytest
import torch

from configuration_agillm import AgillmVQVAEConfig
from corpus.images import load_digits
from demo.vqvae import balanced_batch, digits_split, digits_to_pixels, pixels_to_digits, train_vqvae
from image_processing_agillm import AgillmImageProcessor
from vqvae_agillm import AgillmVectorQuantizer, AgillmVQVAE, AgillmVQVAEOutput


# 8x8 images, two levels -> a 4x4 latent grid (16 codes per image) from a 16-code book.
TINY_VQ = {"image_size": 8, "hidden_channels": [8, 16], "embed_dim": 4, "num_embeddings": 16}


def tiny_vqvae(seed: int = 0, **overrides) -> AgillmVQVAE:
    torch.manual_seed(seed)
    return AgillmVQVAE(AgillmVQVAEConfig(**{**TINY_VQ, **overrides}))


def random_pixels(batch: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_forward_shapes_code_range_and_loss():
    model = tiny_vqvae().eval()
    pixels = random_pixels()
    output = model(pixels)
    assert isinstance(output, AgillmVQVAEOutput)
    assert output.reconstruction.shape == pixels.shape
    assert output.reconstruction.min() >= -1 and output.reconstruction.max() <= 1
    assert output.codes.shape == (3, 16) and output.codes.dtype == torch.long
    assert output.codes.min() >= 0 and output.codes.max() < 16
    assert output.loss.ndim == 0 and output.loss > 0
    # EMA codebook: no codebook loss, so the loss is reconstruction + commitment_cost x commitment exactly.
    unclamped = model.decoder(model.quantize.lookup(output.codes.view(3, 4, 4)))
    expected = torch.nn.functional.mse_loss(unclamped, pixels) + 0.25 * output.commitment_loss
    torch.testing.assert_close(output.loss, expected)
    assert 1 <= output.perplexity <= 16
    assert model(pixels, return_dict=False)[1].shape == pixels.shape  # tuple output: (loss, reconstruction, ...)


def test_encode_decode_shapes_and_agreement_with_forward():
    model = tiny_vqvae().eval()
    pixels = random_pixels()
    with torch.no_grad():
        codes = model.encode(pixels)
        assert codes.shape == (3, model.config.num_image_tokens) and codes.dtype == torch.long
        torch.testing.assert_close(codes, model(pixels).codes)
        decoded = model.decode(codes)
        assert decoded.shape == pixels.shape
        torch.testing.assert_close(decoded, model(pixels).reconstruction)
        torch.testing.assert_close(model.decode(codes.view(3, 4, 4)), decoded)  # [B, h, w] means the same grid


def test_default_config_gives_64_tokens_for_32x32_images():
    model = AgillmVQVAE(AgillmVQVAEConfig()).eval()
    with torch.no_grad():
        codes = model.encode(random_pixels(batch=2, size=32))
    assert codes.shape == (2, 64) and codes.max() < 512


@pytest.mark.parametrize(
    "pixels, message",
    [
        (torch.zeros(2, 3, 16, 16), r"shape \[batch, 3, 8, 8\]"),
        (torch.zeros(2, 1, 8, 8), r"shape \[batch, 3, 8, 8\]"),
        (torch.zeros(3, 8, 8), r"shape \[batch, 3, 8, 8\]"),
        (torch.zeros(0, 3, 8, 8), r"shape \[batch, 3, 8, 8\]"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.long), "float tensor"),
        (np.zeros((2, 3, 8, 8), dtype=np.float32), "float tensor"),
    ],
)
def test_bad_pixel_values_raise(pixels, message):
    model = tiny_vqvae().eval()
    with pytest.raises(ValueError, match=message):
        model(pixels)
    with pytest.raises(ValueError, match=message):
        model.encode(pixels)


@pytest.mark.parametrize(
    "codes, message",
    [
        (torch.full((2, 16), 16), r"must lie in \[0, 16\)"),
        (torch.full((2, 16), -1), r"must lie in \[0, 16\)"),
        (torch.zeros(2, 15, dtype=torch.long), r"shape \[batch, 16\] or \[batch, 4, 4\]"),
        (torch.zeros(2, 4, 5, dtype=torch.long), r"shape \[batch, 16\] or \[batch, 4, 4\]"),
        (torch.zeros(16, dtype=torch.long), r"shape \[batch, 16\] or \[batch, 4, 4\]"),
        (torch.zeros(2, 16), "integer codes"),
        (torch.zeros(2, 16, dtype=torch.bool), "integer codes"),
    ],
)
def test_bad_codes_raise(codes, message):
    with pytest.raises(ValueError, match=message):
        tiny_vqvae().eval().decode(codes)


def test_straight_through_gradient_reaches_the_encoder():
    model = tiny_vqvae().eval()  # eval: the codebook stays put, only gradients are under test
    model.decoder.requires_grad_(False)
    pixels = random_pixels()
    # Reconstruction only: the commitment term alone would also reach the encoder, without any straight-through.
    torch.nn.functional.mse_loss(model.decoder(model.quantize(model.encoder(pixels)).quantized), pixels).backward()
    encoder_gradient = model.encoder.conv_in.weight.grad
    assert encoder_gradient is not None and encoder_gradient.abs().sum() > 0
    # The nearest-code lookup itself has no gradient: the codebook gets none from the reconstruction.
    assert model.quantize.embedding.weight.grad is None


def test_codebook_loss_trains_the_codebook_when_ema_is_off():
    model = tiny_vqvae(codebook_ema_decay=0.0, dead_code_threshold=0.0).train()
    model(random_pixels()).loss.backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    ema_model = tiny_vqvae(dead_code_threshold=0.0).train()
    ema_model(random_pixels()).loss.backward()
    assert ema_model.quantize.embedding.weight.grad is None  # EMA codebooks learn by averaging, not by gradient


def test_ema_updates_the_codebook_only_in_training_with_gradients():
    model = tiny_vqvae(dead_code_threshold=0.0)  # restarts off: only the EMA moves codes here
    pixels = random_pixels()
    before = model.quantize.embedding.weight.detach().clone()
    model.eval()
    model(pixels)
    torch.testing.assert_close(model.quantize.embedding.weight, before, rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        model(pixels)
    with torch.inference_mode():
        model.encode(pixels)
    torch.testing.assert_close(model.quantize.embedding.weight, before, rtol=0, atol=0)
    assert model.quantize.usage.sum() == 0

    codes = model(pixels).codes
    after = model.quantize.embedding.weight.detach()
    moved = (after - before).abs().sum(dim=1) > 0
    used = torch.zeros(16, dtype=torch.bool)
    used[codes.unique()] = True
    # Every assigned code moves towards its encoder outputs; unassigned codes only decay their counts (and, by
    # Laplace smoothing, rescale by the same factor) but keep their direction.
    assert moved[used].all()
    assert model.quantize.usage[used].gt(0).all() and model.quantize.usage[~used].eq(0).all()
    # One EMA step from one assignment per code: the new vector is the decayed old one plus 1% of the batch mean.
    quantizer = model.quantize
    flat = model.encoder(pixels).detach().permute(0, 2, 3, 1).reshape(-1, 4)
    code = codes.flatten()[0]
    members = flat[codes.flatten() == code]
    expected_sum = 0.99 * before[code] + 0.01 * members.sum(0)
    torch.testing.assert_close(quantizer.ema_embed_sum[code], expected_sum)


def test_dead_code_restart_moves_a_dead_code_onto_an_encoder_output():
    model = tiny_vqvae(dead_code_threshold=1.0)
    quantizer = model.quantize
    pixels = random_pixels()
    with torch.no_grad():
        # Make code 5 unreachable (far from everything) and all other codes well used, so 5 alone is dead.
        quantizer.embedding.weight[5] = 1e3
        quantizer.usage.fill_(10.0)
        quantizer.usage[5] = 0.0
    model.train()
    output = model(pixels)
    assert 5 not in output.codes  # it was dead for this batch too ...
    encoder_outputs = model.encoder(pixels).detach().permute(0, 2, 3, 1).reshape(-1, 4)
    restarted = quantizer.embedding.weight[5].detach()
    # ... and now sits exactly on one of the batch's encoder outputs, with its statistics reset.
    assert (encoder_outputs - restarted).abs().amax(dim=1).min() < 1e-6
    torch.testing.assert_close(quantizer.ema_embed_sum[5], restarted)
    assert quantizer.ema_cluster_size[5] == 1.0 and quantizer.usage[5] == 1.0
    assert quantizer.usage.gt(1.0).sum() == 15  # the other codes kept their usage: not restarted
    # The restarted code now wins the encoder outputs it sits on.
    with torch.no_grad():
        assert 5 in model.eval().encode(pixels)


def test_codebook_usage_counts_codes_above_the_threshold():
    quantizer = AgillmVectorQuantizer(AgillmVQVAEConfig(**TINY_VQ))
    quantizer.usage.copy_(torch.tensor([2.0] * 4 + [1.0] * 4 + [0.0] * 8))  # 1.0 = just restarted: not yet used
    assert quantizer.codebook_usage() == 0.25


def test_save_and_load_round_trip_gives_identical_codes(tmp_path):
    model = tiny_vqvae(seed=3).train()
    for seed in range(3):  # a few training forwards so the EMA buffers differ from their init
        model(random_pixels(seed=seed))
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = AgillmVQVAE.from_pretrained(tmp_path).eval()
    assert loaded.config.num_embeddings == 16 and loaded.config.hidden_channels == [8, 16]
    pixels = random_pixels(batch=4, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(pixels), model.encode(pixels), rtol=0, atol=0)
        torch.testing.assert_close(loaded.decode(model.encode(pixels)), model.decode(model.encode(pixels)))
    for name, buffer in model.quantize.named_buffers():
        torch.testing.assert_close(getattr(loaded.quantize, name), buffer, rtol=0, atol=0)


def test_short_training_on_real_digits_lowers_reconstruction_loss(one_torch_thread):
    digits, _ = load_digits()
    # The digits at their own 8x8 resolution (the processor only rescales and normalises): a 4x4 latent grid.
    processor = AgillmImageProcessor(size={"height": 8, "width": 8})
    pixels = digits_to_pixels(digits[:256], processor)
    held_out = digits_to_pixels(digits[256:320], processor)
    config = AgillmVQVAEConfig(image_size=8, hidden_channels=[16, 32], embed_dim=8, num_embeddings=32)

    def held_out_mse(model):
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model.decode(model.encode(held_out)), held_out).item()

    untrained = held_out_mse(AgillmVQVAE(config).eval())
    model, metrics = train_vqvae(pixels, config=config, steps=60, batch_size=32, learning_rate=3e-3, log_every=60)
    trained = held_out_mse(model)
    assert not model.training
    assert [entry["step"] for entry in metrics["history"]] == [1, 60]
    # Untrained, the output is noise (held-out MSE ~0.76); 60 steps bring it to ~0.13. Halving it is the bar.
    assert trained < 0.5 * untrained, (untrained, trained)
    assert model.codebook_usage() > 0.1  # restarts keep more than a handful of codes alive


# ---------------------------------------------------------------------------------------------------------------------
# demo/vqvae.py helpers the reported numbers rest on


def test_digits_split_is_disjoint_complete_and_seeded():
    train, held_out = digits_split(1797, seed=0)
    assert len(held_out) == 359 and len(train) == 1438
    assert np.intersect1d(train, held_out).size == 0 and np.union1d(train, held_out).size == 1797
    np.testing.assert_array_equal(digits_split(1797, seed=0)[1], held_out)
    assert not np.array_equal(digits_split(1797, seed=1)[1], held_out)


def test_digit_pixels_round_trip_to_the_svc_scale():
    digits = np.zeros((2, 8, 8), dtype=np.uint8)
    digits[0] = 8  # flat mid-grey stays 8 through resize-to-32 and 4x4 block averages ...
    digits[1, 2, 5] = 16  # one bright pixel stays the brightest, where it was
    back = pixels_to_digits(digits_to_pixels(digits, AgillmImageProcessor()))
    assert back.shape == (2, 8, 8)
    # ... up to one 8-bit grey level (16 / 255): the processor resizes through 8-bit PIL images.
    np.testing.assert_allclose(back[0], 8.0, atol=16 / 255)
    assert np.unravel_index(back[1].argmax(), (8, 8)) == (2, 5) and back[1].min() >= 0


def test_balanced_batch_takes_an_equal_share_of_each_source():
    sources = {name: torch.full((5, 3, 8, 8), float(value)) for value, name in enumerate(["a", "b", "c"])}
    batch = balanced_batch(sources, batch_size=8, generator=torch.Generator().manual_seed(0))
    assert batch.shape == (8, 3, 8, 8)
    assert batch[:, 0, 0, 0].tolist() == [0.0] * 3 + [1.0] * 3 + [2.0] * 2
