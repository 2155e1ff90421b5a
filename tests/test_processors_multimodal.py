"""AgillmImageProcessor, AgillmFeatureExtractor and AgillmProcessor: values, input forms, placeholder expansion,
chat template, errors, and remote-code loading."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from corpus.images import load_digits
from feature_extraction_agillm import AgillmFeatureExtractor
from image_processing_agillm import AgillmImageProcessor
from processing_agillm import CHAT_TEMPLATE, TEXT_CHAT_TEMPLATE, AgillmProcessor
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


# ------------------------------------------------------------------------------------------------------ processor

IMAGE, IMAGE_START, IMAGE_END, AUDIO, AUDIO_START, AUDIO_END = range(6, 12)  # the shipped tokenizer's ids


@pytest.fixture(scope="module")
def processor(tokenizer):
    return AgillmProcessor(image_processor=AgillmImageProcessor(), feature_extractor=AgillmFeatureExtractor(),
                           tokenizer=tokenizer)


def token_counts(input_ids, token_id) -> list[int]:
    return [int(count) for count in (torch.as_tensor(input_ids) == token_id).sum(dim=-1)]


def media_blocks(ids: list[int]) -> list[tuple[str, int]]:
    """[("image" | "audio", placeholders between the start and end tokens), ...] in order; checks contiguity."""
    blocks, index = [], 0
    while index < len(ids):
        start = ids[index]
        if start in (IMAGE_START, AUDIO_START):
            placeholder, end = (IMAGE, IMAGE_END) if start == IMAGE_START else (AUDIO, AUDIO_END)
            length = 0
            while ids[index + 1 + length] == placeholder:
                length += 1
            assert ids[index + 1 + length] == end, f"block at {index} is not closed by its end token"
            blocks.append(("image" if start == IMAGE_START else "audio", length))
            index += length + 2
        else:
            assert start not in (IMAGE, AUDIO, IMAGE_END, AUDIO_END), f"stray media token {start} at {index}"
            index += 1
    return blocks


def test_placeholders_expand_to_feature_counts(processor):
    images = [random_image(seed=1), random_image(20, 30, seed=2)]
    long_clip, short_clip = sine(500, 1.0, 16000), sine(700, 0.5, 16000)  # 101 and 51 log-mel frames
    texts = ["A <|image|> then <|audio|> and <|image|>.", "Only speech: <|audio|>"]
    inputs = processor(text=texts, images=images, audio=[long_clip, short_clip], padding=True, return_tensors="pt")

    # Images: 16 tokens each. Audio: ceil(valid frames / 4), from each clip's own frames, not the padded length.
    assert inputs.feature_attention_mask.sum(-1).tolist() == [101, 51]
    unpadded = [ids[mask.bool()].tolist() for ids, mask in zip(inputs.input_ids, inputs.attention_mask)]
    assert media_blocks(unpadded[0]) == [("image", 16), ("audio", 26), ("image", 16)]
    assert media_blocks(unpadded[1]) == [("audio", 13)]
    assert token_counts(inputs.input_ids, IMAGE) == [32, 0] and token_counts(inputs.input_ids, AUDIO) == [26, 13]

    # The media tensors are exactly what the sub-processors make on their own, in order of appearance.
    torch.testing.assert_close(inputs.pixel_values, AgillmImageProcessor()(images, return_tensors="pt").pixel_values)
    alone = AgillmFeatureExtractor()([long_clip, short_clip], sampling_rate=16000, return_tensors="pt")
    torch.testing.assert_close(inputs.input_features, alone.input_features)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "input_features", "feature_attention_mask"}

    # Text around the placeholders is untouched.
    assert processor.decode(unpadded[1], skip_special_tokens=True) == "Only speech: "


def test_audio_resampled_from_other_rates(processor):
    one_second_8k = sine(440, 1.0, 8000)
    inputs = processor(text="<|audio|>", audio=one_second_8k, sampling_rate=8000, return_tensors="pt")
    assert token_counts(inputs.input_ids, AUDIO) == [26]  # one second is 101 frames at any input rate
    expected = AgillmFeatureExtractor()(one_second_8k, sampling_rate=8000, return_tensors="pt").input_features
    torch.testing.assert_close(inputs.input_features, expected)
    # A processor with other lengths expands accordingly.
    custom = AgillmProcessor(image_processor=AgillmImageProcessor(), feature_extractor=AgillmFeatureExtractor(),
                             tokenizer=processor.tokenizer, image_seq_length=4, audio_frames_per_token=10)
    inputs = custom(text="<|image|><|audio|>", images=random_image(), audio=sine(440, 0.3, 16000))
    assert media_blocks(inputs["input_ids"][0]) == [("image", 4), ("audio", 4)]  # 31 frames -> ceil(3.1)


def test_text_alone_tokenizes_like_the_tokenizer(processor, tokenizer):
    text = "To be, or not to be: that is the question."
    assert processor(text=text)["input_ids"] == tokenizer(text)["input_ids"]
    batch = processor(text=[text, "Who is there?"], padding=True, return_tensors="pt")
    expected = tokenizer([text, "Who is there?"], padding=True, return_tensors="pt")
    assert torch.equal(batch.input_ids, expected.input_ids) and torch.equal(batch.attention_mask,
                                                                            expected.attention_mask)
    text_only = AgillmProcessor(tokenizer=tokenizer)
    assert text_only.image_processor is None and text_only.feature_extractor is None
    assert text_only(text=text)["input_ids"] == tokenizer(text)["input_ids"]
    assert text_only.model_input_names == ["input_ids", "attention_mask"]
    assert processor.model_input_names == ["input_ids", "attention_mask", "pixel_values", "input_features",
                                           "feature_attention_mask"]


def test_left_padding_matches_single_prompts(processor, tokenizer):
    texts = ["A long prompt about <|image|> with many more words in it", "<|audio|> short"]
    images, audio = [random_image(seed=3)], [sine(300, 0.2, 16000)]
    tokenizer.padding_side = "right"  # the session's shared tokenizer: other tests may have set it either way
    batch = processor(text=texts, images=images, audio=audio, padding=True, padding_side="left", return_tensors="pt")
    assert tokenizer.padding_side == "right"  # a call argument, not a change of the shared tokenizer
    first = processor(text=texts[0], images=images, return_tensors="pt")
    second = processor(text=texts[1], audio=audio, return_tensors="pt")
    for row, alone in enumerate((first, second)):
        length = alone.input_ids.shape[1]
        assert torch.equal(batch.input_ids[row, -length:], alone.input_ids[0])
        assert batch.attention_mask[row, -length:].all() and not batch.attention_mask[row, :-length].any()
        assert (batch.input_ids[row, :-length] == tokenizer.pad_token_id).all()
    assert batch.attention_mask[1, 0] == 0  # the short prompt is the padded one


def test_nested_and_flat_media_agree(processor):
    images = [random_image(seed=seed) for seed in range(3)]
    clips = [sine(200, 0.1, 16000), sine(400, 0.25, 16000)]
    texts = ["<|image|> <|audio|>", "<|image|> and <|image|> <|audio|>"]
    flat = processor(text=texts, images=images, audio=clips, padding=True, return_tensors="pt")
    nested = processor(text=texts, images=[images[:1], images[1:]], audio=[clips[:1], clips[1:]], padding=True,
                       return_tensors="pt")
    assert flat.keys() == nested.keys()
    for key in flat:
        torch.testing.assert_close(nested[key], flat[key], msg=key)
    assert flat.pixel_values.shape[0] == 3 and flat.input_features.shape[0] == 2


@pytest.mark.parametrize(
    "call, message",
    [
        (dict(text="<|image|> <|image|>", images=[random_image()]), "2 <|image|> tokens and 1 images"),
        (dict(text="no placeholder", images=[random_image()]), "0 <|image|> tokens and 1 images"),
        (dict(text="<|image|> but nothing"), "tokens in the text but no images"),
        (dict(text="<|audio|> <|audio|>", audio=[np.zeros(1600)]), "2 <|audio|> tokens and 1 audio"),
        (dict(text="<|audio|> but nothing"), "tokens in the text but no audio"),
        # Already expanded text is not recognised: every placeholder stands for one item.
        (dict(text="<|image_start|>" + "<|image|>" * 16 + "<|image_end|>", images=[random_image()]),
         "16 <|image|> tokens and 1 images"),
        (dict(text=["<|image|>", "<|image|>"], images=[[random_image(), random_image()], []]),
         r"hold \[1, 1\] <\|image\|> placeholders but got \[2, 0\] images per prompt"),
        (dict(text=["<|audio|>"], audio=[[np.zeros(1600)], [np.zeros(1600)]]), "nested in 2 lists for 1 prompts"),
        (dict(text="<|image|>", images=[random_image()], truncation=True, max_length=8), "Mismatch in `image`"),
        (dict(text="a video", videos=[np.zeros((2, 8, 8, 3))]), "not videos"),
        (dict(), "needs text, images or audio"),
    ],
    ids=["too-few-images", "image-without-placeholder", "placeholder-without-image", "too-few-clips",
         "placeholder-without-audio", "already-expanded", "nested-per-prompt", "nested-length", "truncated",
         "videos", "nothing"],
)
def test_placeholder_mismatches_raise(processor, call, message):
    with pytest.raises(ValueError, match=message):
        processor(**call)


def test_missing_sub_processors_and_bad_arguments(tokenizer):
    text_only = AgillmProcessor(tokenizer=tokenizer)
    with pytest.raises(ValueError, match="no image processor"):
        text_only(text="<|image|>", images=[random_image()])
    with pytest.raises(ValueError, match="no feature extractor"):
        text_only(text="<|audio|>", audio=[np.zeros(1600)])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        AgillmProcessor(image_processor=AgillmImageProcessor())
    with pytest.raises(ValueError, match="image_seq_length must be a positive integer"):
        AgillmProcessor(tokenizer=tokenizer, image_seq_length=0)
    with pytest.raises(TypeError, match="AgillmImageProcessor for argument feature_extractor"):
        AgillmProcessor(feature_extractor=AgillmImageProcessor(), tokenizer=tokenizer)


def foreign_tokenizer():
    """A word-level tokenizer with its own chat template and none of AGILLM's media tokens (a converted model's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                   chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")


def test_foreign_tokenizer_keeps_its_template_and_stays_text_only():
    tokenizer = foreign_tokenizer()
    processor = AgillmProcessor(tokenizer=tokenizer)
    assert processor.chat_template == tokenizer.chat_template
    assert processor(text="hello world")["input_ids"] == [1, 2]
    with pytest.raises(ValueError, match="lacks the multimodal placeholder tokens"):
        AgillmProcessor(image_processor=AgillmImageProcessor(), tokenizer=tokenizer)


# -------------------------------------------------------------------------------------------------- chat template

CONVERSATIONS_WITH_STRINGS = [
    [{"role": "user", "content": "Who is there?"}],
    [{"role": "system", "content": "Answer in verse."}, {"role": "user", "content": "Nay, answer me."},
     {"role": "assistant", "content": "Long live the king!"}, {"role": "user", "content": "Bernardo?"}],
]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_string_contents_render_like_the_tokenizer(processor, tokenizer, add_generation_prompt):
    assert tokenizer.chat_template == TEXT_CHAT_TEMPLATE  # the template the processor upgrades
    assert processor.chat_template == CHAT_TEMPLATE
    for conversation in CONVERSATIONS_WITH_STRINGS:
        expected = tokenizer.apply_chat_template(conversation, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        rendered = processor.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
        assert rendered == expected


def test_list_contents_place_image_and_audio(processor, tmp_path):
    image, clip = PIL.Image.fromarray(random_image(seed=5)), sine(440, 0.4, 16000)  # 41 frames -> 11 tokens
    image_path = tmp_path / "image.png"
    PIL.Image.fromarray(random_image(seed=6)).save(image_path)
    conversation = [
        {"role": "system", "content": "You see and hear."},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is this? "},
                                     {"type": "audio", "audio": clip}, {"type": "image", "path": str(image_path)}]},
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou see and hear.<|im_end|>\n"
                      "<|im_start|>user\n<|image|>What is this? <|audio|><|image|><|im_end|>\n<|im_start|>assistant\n")

    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    assert media_blocks(inputs.input_ids[0].tolist()) == [("image", 16), ("audio", 11), ("image", 16)]
    direct = processor(text=prompt, images=[image, PIL.Image.open(image_path)], audio=[clip], sampling_rate=16000,
                       return_tensors="pt")
    for key in direct:
        torch.testing.assert_close(inputs[key], direct[key], msg=key)

    with pytest.raises(Exception, match="hold text, image and audio items, got video"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}])


def test_decoding_passes_through(processor, tokenizer):
    ids = processor(text=["Good night, sweet prince.", "Hi"], padding=True, return_tensors="pt").input_ids
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["Good night, sweet prince.", "Hi"]
    assert processor.decode(ids[0]) == tokenizer.decode(ids[0])
    # What pipeline("image-text-to-text") calls on generated ids: media tokens are special, so they drop out.
    generated = processor(text="<|image|>A cat", images=random_image(), return_tensors="pt").input_ids
    assert processor.post_process_image_text_to_text(generated) == ["A cat"]


# ------------------------------------------------------------------------------------------------ converter files


def test_converter_ships_the_processor_code_files(tmp_path):
    from convert.converter import PROCESSOR_CODE_FILES, REQUIRED_FILES, ship_code_files

    assert set(PROCESSOR_CODE_FILES) <= set(REQUIRED_FILES)
    (tmp_path / "processing_agillm.py").write_text("# written by save_pretrained\n")
    ship_code_files(tmp_path)
    assert (tmp_path / "processing_agillm.py").read_text() == "# written by save_pretrained\n"  # kept
    for name in ("image_processing_agillm.py", "feature_extraction_agillm.py"):
        assert (tmp_path / name).read_text() == (Path(__file__).parents[1] / name).read_text()


# ------------------------------------------------------------------------------------------------------ remote code

# One fresh interpreter (they cost seconds each) loads every saved folder: the sub-processors on their own, the
# multimodal processor and a text-only one.
REMOTE_PROCESSORS_SCRIPT = r"""
import importlib.util, json, sys
import numpy as np
import transformers

image_folder, audio_folder, multimodal_folder, text_folder, output_path = sys.argv[1:6]
for module in ("image_processing_agillm", "feature_extraction_agillm", "processing_agillm"):
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

processor = transformers.AutoProcessor.from_pretrained(multimodal_folder, trust_remote_code=True)
text_only = transformers.AutoProcessor.from_pretrained(text_folder, trust_remote_code=True)
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)]
clips = [np.sin(np.arange(16000) / 5.0), np.sin(np.arange(5000) / 3.0)]
inputs = processor(text=["A <|image|> and <|audio|>", "<|audio|> then <|image|>"], images=images, audio=clips,
                   sampling_rate=16000, padding=True, padding_side="left", return_tensors="np")
chat = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "Say it."}]}]
results["processor"] = {
    "classes": [f"{type(p).__module__}.{type(p).__name__}"
                for p in (processor, processor.image_processor, processor.feature_extractor, text_only)],
    "inputs": {key: value.tolist() for key, value in inputs.items()},
    "chat": processor.apply_chat_template(chat, add_generation_prompt=True),
    "text_only": [text_only.image_processor is None, text_only.feature_extractor is None,
                  text_only(text="To be")["input_ids"]],
}
json.dump(results, open(output_path, "w"))
"""


@pytest.fixture(scope="module")
def remote(tmp_path_factory, tokenizer):
    """Saves the folders and loads them all in one fresh process; returns its results and the local objects."""
    root = tmp_path_factory.mktemp("remote-processors")
    local = {
        "image_processor": AgillmImageProcessor(size={"height": 16, "width": 24}),
        "extractor": AgillmFeatureExtractor(feature_size=40, n_fft=256, hop_length=128),
        "processor": AgillmProcessor(image_processor=AgillmImageProcessor(), feature_extractor=AgillmFeatureExtractor(),
                                     tokenizer=tokenizer),
        "text_only": AgillmProcessor(tokenizer=tokenizer),
    }
    folders = {name: root / name for name in local}
    for name, saved in local.items():
        saved.save_pretrained(folders[name])
    workdir = root / "cwd"
    workdir.mkdir()
    output_path = root / "remote.json"
    run_isolated(REMOTE_PROCESSORS_SCRIPT, [*map(str, folders.values()), str(output_path)], cwd=workdir)
    return json.loads(output_path.read_text()), local, folders


def test_save_and_load_as_remote_code_in_fresh_process(remote):
    remote, local, folders = remote
    image_processor, extractor = local["image_processor"], local["extractor"]
    # register_for_auto_class makes save_pretrained copy each class's own file: the folders are self-contained.
    assert (folders["image_processor"] / "image_processing_agillm.py").is_file()
    assert (folders["extractor"] / "feature_extraction_agillm.py").is_file()
    auto_map = json.loads((folders["image_processor"] / "preprocessor_config.json").read_text())["auto_map"]
    assert auto_map["AutoImageProcessor"] == "image_processing_agillm.AgillmImageProcessor"

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


def test_processor_round_trip_as_remote_code(remote, tokenizer):
    remote, local, folders = remote
    remote, processor = remote["processor"], local["processor"]
    saved = {path.name for path in folders["processor"].iterdir()}
    assert {"processing_agillm.py", "image_processing_agillm.py", "feature_extraction_agillm.py",
            "processor_config.json", "chat_template.jinja", "tokenizer.json"} <= saved
    assert not (folders["text_only"] / "image_processing_agillm.py").exists()  # a text-only folder stays text-only

    expected_classes = ("processing_agillm.AgillmProcessor", "image_processing_agillm.AgillmImageProcessor",
                        "feature_extraction_agillm.AgillmFeatureExtractor", "processing_agillm.AgillmProcessor")
    for qualified_name, expected in zip(remote["classes"], expected_classes, strict=True):
        assert qualified_name.startswith("transformers_modules.") and qualified_name.endswith(expected)

    # Same inputs as the in-process processor: text + images + audio, left-padded batch.
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)]
    clips = [np.sin(np.arange(16000) / 5.0), np.sin(np.arange(5000) / 3.0)]
    inputs = processor(text=["A <|image|> and <|audio|>", "<|audio|> then <|image|>"], images=images, audio=clips,
                       sampling_rate=16000, padding=True, padding_side="left", return_tensors="np")
    assert remote["inputs"].keys() == inputs.keys()
    for key, value in inputs.items():
        np.testing.assert_allclose(np.asarray(remote["inputs"][key]), value, rtol=0, atol=1e-6, err_msg=key)
    mask = np.asarray(remote["inputs"]["attention_mask"])
    assert mask[:, 0].tolist() == [1, 0] and mask[:, -1].all()  # the shorter second prompt is padded on the left
    chat = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "Say it."}]}]
    assert remote["chat"] == processor.apply_chat_template(chat, add_generation_prompt=True)
    assert remote["text_only"] == [True, True, tokenizer("To be")["input_ids"]]
