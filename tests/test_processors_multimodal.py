"""AgillmImageProcessor and AgillmFeatureExtractor: values, input forms, errors, and remote-code loading."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from corpus.images import load_digits
from feature_extraction_agillm import AgillmFeatureExtractor
from image_processing_agillm import AgillmImageProcessor
from test_integration import run_isolated


# --------------------------------------------------------------------------------------------------- image processor


def random_image(height=40, width=50, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_pixel_values_shape_dtype_and_normalisation_math():
    image = random_image()
    pixel_values = AgillmImageProcessor()(image, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 32, 32) and pixel_values.dtype == torch.float32

    # Without resizing every pixel is (x / 255 - mean) / std, checked against a hand computation.
    mean, std = np.array([0.2, 0.4, 0.6]), np.array([0.5, 0.25, 0.125])
    processor = AgillmImageProcessor(do_resize=False, image_mean=mean.tolist(), image_std=std.tolist())
    pixel_values = processor(image, return_tensors="np").pixel_values
    expected = ((image / 255.0 - mean) / std).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(pixel_values, expected, rtol=1e-5, atol=1e-5)
    assert pixel_values.dtype == np.float32


def test_pil_numpy_torch_inputs_agree():
    image = random_image()
    processor = AgillmImageProcessor()
    reference = processor(image, return_tensors="pt").pixel_values
    variants = {
        "PIL": PIL.Image.fromarray(image),
        "numpy CHW": image.transpose(2, 0, 1),
        "torch CHW": torch.from_numpy(image).permute(2, 0, 1),
        "float [0, 1]": image.astype(np.float32) / 255,
    }
    for name, variant in variants.items():
        torch.testing.assert_close(processor(variant, return_tensors="pt").pixel_values, reference,
                                   atol=1e-5, rtol=0, msg=name)
    batch = processor([image, random_image(seed=1)], return_tensors="pt").pixel_values
    assert batch.shape == (2, 3, 32, 32)
    torch.testing.assert_close(batch[:1], reference)
    assert not torch.equal(batch[0], batch[1])


def test_digits_greyscale_become_rgb():
    images, _ = load_digits()
    # Digits hold grey levels 0-16, so rescale by 1/16 to reach [0, 1].
    processor = AgillmImageProcessor(rescale_factor=1 / 16, do_resize=False)
    pixel_values = processor(list(images[:4]), return_tensors="pt").pixel_values
    assert pixel_values.shape == (4, 3, 8, 8)
    expected = torch.from_numpy(images[:4] / 16 * 2 - 1).float()
    for channel in range(3):  # grey copied into R, G and B
        torch.testing.assert_close(pixel_values[:, channel], expected)
    # One [B, H, W, 1] array and one 8x8 PIL "L" image go the same way.
    torch.testing.assert_close(processor(images[:4, ..., None], return_tensors="pt").pixel_values, pixel_values)
    resized = AgillmImageProcessor()(PIL.Image.fromarray(images[0] * 15), return_tensors="pt").pixel_values
    assert resized.shape == (1, 3, 32, 32)


def test_rgba_is_composited_on_white():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # pure red ...
    rgba[:4, :, 3] = 255  # ... opaque in the top half, fully transparent below
    processor = AgillmImageProcessor(do_resize=False)
    for image in (rgba, PIL.Image.fromarray(rgba, mode="RGBA")):
        pixel_values = processor(image, return_tensors="pt").pixel_values
        assert pixel_values.shape == (1, 3, 8, 8)
        torch.testing.assert_close(pixel_values[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))  # red
        torch.testing.assert_close(pixel_values[0, :, 7, 0], torch.tensor([1.0, 1.0, 1.0]))  # white
    palette = PIL.Image.fromarray(random_image()).convert("P")
    assert processor(palette, return_tensors="pt").pixel_values.shape == (1, 3, 40, 50)


@pytest.mark.parametrize(
    "images, message",
    [
        ([], "empty batch"),
        (np.zeros((0, 8, 8, 3), dtype=np.uint8), "empty batch"),
        (np.zeros(5), "dimensions"),
        (np.zeros((2, 3, 8, 8, 3)), "dimensions"),
        (np.zeros((10, 10, 2)), "channels"),
        (torch.zeros(7, 7, 5), "channels"),
    ],
)
def test_image_errors(images, message):
    with pytest.raises(ValueError, match=message):
        AgillmImageProcessor()(images)


# ------------------------------------------------------------------------------------------------ feature extractor


def sine(frequency, seconds, sampling_rate) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * frequency * np.arange(int(seconds * sampling_rate)) / sampling_rate)


def strongest_mel_bin(features: torch.Tensor) -> int:
    return int(features.mean(dim=-1).argmax())


def test_sine_peaks_in_its_mel_bin():
    extractor = AgillmFeatureExtractor()
    output = extractor(sine(1000, 1.0, 16000), sampling_rate=16000, return_tensors="pt")
    assert output.input_features.shape == (1, 80, 1 + 16000 // 160)
    assert output.input_features.dtype == torch.float32
    # The mel filter with most weight on the 1 kHz FFT bin must hold the most energy (+-1 for filter overlap).
    fft_bin = round(1000 * extractor.n_fft / extractor.sampling_rate)
    expected_mel_bin = int(extractor.mel_filters[fft_bin].argmax())
    assert abs(strongest_mel_bin(output.input_features[0]) - expected_mel_bin) <= 1
    higher = extractor(sine(4000, 1.0, 16000), sampling_rate=16000, return_tensors="pt")
    assert strongest_mel_bin(higher.input_features[0]) > strongest_mel_bin(output.input_features[0]) + 10


def test_resampling_8k_keeps_duration_and_pitch(caplog):
    extractor = AgillmFeatureExtractor()
    native = extractor(sine(1000, 1.0, 16000), sampling_rate=16000, return_tensors="pt").input_features
    resampled = extractor(sine(1000, 1.0, 8000), sampling_rate=8000, return_tensors="pt").input_features
    assert resampled.shape == native.shape  # one second either way
    assert strongest_mel_bin(resampled[0]) == strongest_mel_bin(native[0])
    assert (resampled[0, :, 5:-5] - native[0, :, 5:-5]).abs().mean() < 0.05
    # Without `sampling_rate` the rate is assumed, with a warning like Whisper's.
    from transformers.utils import logging
    logging.get_logger("transformers").propagate = True
    with caplog.at_level("WARNING"):
        extractor(sine(1000, 0.1, 16000))
    assert "sampling_rate" in caplog.text


def test_batch_padding_and_attention_mask():
    extractor = AgillmFeatureExtractor(padding_value=-7.0)
    long_clip, short_clip = sine(500, 1.0, 16000), sine(500, 0.5, 16000)
    batch = extractor([long_clip, short_clip], sampling_rate=16000, return_tensors="pt")
    assert batch.input_features.shape == (2, 80, 101)
    assert batch.attention_mask.tolist() == [[1] * 101, [1] * 51 + [0] * 50]
    assert (batch.input_features[1, :, 51:] == -7.0).all()
    alone = extractor(short_clip, sampling_rate=16000, return_tensors="pt").input_features
    torch.testing.assert_close(batch.input_features[1:, :, :51], alone)
    as_array = extractor(np.stack([long_clip, long_clip]), sampling_rate=16000, return_tensors="pt")
    torch.testing.assert_close(as_array.input_features[0], batch.input_features[0])


def test_silence_is_finite_and_bad_audio_errors():
    extractor = AgillmFeatureExtractor()
    silent = extractor(np.zeros(1600), sampling_rate=16000, return_tensors="pt").input_features
    assert torch.isfinite(silent).all()
    for audio, message in [
        (np.zeros(0), "empty clip"),
        ([np.zeros(100), np.zeros(0)], "empty clip"),
        (np.zeros((2, 3, 100)), "mono"),
        ([np.zeros((100, 2))], "mono"),
        (np.array([0.0, np.nan]), "NaN"),
    ]:
        with pytest.raises(ValueError, match=message):
            extractor(audio, sampling_rate=16000)


# ------------------------------------------------------------------------------------------------------ remote code

REMOTE_PROCESSORS_SCRIPT = r"""
import importlib.util, json, sys
import numpy as np
import transformers

image_folder, audio_folder, output_path = sys.argv[1:4]
for module in ("image_processing_agillm", "feature_extraction_agillm"):
    assert importlib.util.find_spec(module) is None, f"{module} is importable: the repository leaked onto sys.path"
image_processor = transformers.AutoImageProcessor.from_pretrained(image_folder, trust_remote_code=True)
extractor = transformers.AutoFeatureExtractor.from_pretrained(audio_folder, trust_remote_code=True)
image = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
audio = np.sin(np.arange(4000) / 5.0)
results = {
    "classes": [f"{type(p).__module__}.{type(p).__name__}" for p in (image_processor, extractor)],
    "size": dict(image_processor.size), "n_fft": extractor.n_fft,
    "pixel_values": image_processor(image, return_tensors="np").pixel_values.tolist(),
    "input_features": extractor(audio, sampling_rate=16000, return_tensors="np").input_features.tolist(),
}
json.dump(results, open(output_path, "w"))
"""


def test_save_and_load_as_remote_code_in_fresh_process(tmp_path):
    image_processor = AgillmImageProcessor(size={"height": 16, "width": 24})
    extractor = AgillmFeatureExtractor(feature_size=40, n_fft=256, hop_length=128)
    image_folder, audio_folder = tmp_path / "image", tmp_path / "audio"
    image_processor.save_pretrained(image_folder)
    extractor.save_pretrained(audio_folder)
    # register_for_auto_class makes save_pretrained copy each class's own file: the folders are self-contained.
    assert (image_folder / "image_processing_agillm.py").is_file()
    assert (audio_folder / "feature_extraction_agillm.py").is_file()
    auto_map = json.loads((image_folder / "preprocessor_config.json").read_text())["auto_map"]
    assert auto_map["AutoImageProcessor"] == "image_processing_agillm.AgillmImageProcessor"

    workdir = tmp_path / "cwd"
    workdir.mkdir()
    output_path = tmp_path / "remote.json"
    run_isolated(REMOTE_PROCESSORS_SCRIPT, [str(image_folder), str(audio_folder), str(output_path)], cwd=workdir)
    remote = json.loads(output_path.read_text())

    assert remote["classes"][0].startswith("transformers_modules.")
    assert remote["classes"][0].endswith(".image_processing_agillm.AgillmImageProcessor")
    assert remote["classes"][1].endswith(".feature_extraction_agillm.AgillmFeatureExtractor")
    assert remote["size"] == {"height": 16, "width": 24} and remote["n_fft"] == 256
    image = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    np.testing.assert_allclose(remote["pixel_values"], image_processor(image, return_tensors="np").pixel_values,
                               rtol=0, atol=1e-6)
    audio = np.sin(np.arange(4000) / 5.0)
    local_features = extractor(audio, sampling_rate=16000, return_tensors="np").input_features
    np.testing.assert_allclose(remote["input_features"], local_features, rtol=0, atol=1e-6)
