"""The offline multimodal loaders: corpus/images.py and corpus/speech.py.

The pip-bundled sets (scikit-learn digits, scikit-image photos) are always installed by `make setup` and are tested
directly. The npm emoji and Debian speech data are fetched on demand only (never in CI), so their parsing is tested on
tiny fixtures built here, in the same layout as the real packages; the checks on the real data skip when it was never
fetched (`make data-multimodal`).
"""

import gzip
import json

import numpy as np
import pytest
from PIL import Image

from corpus import images, speech


# ---------------------------------------------------------------------------------------------------------------------
# scikit-learn digits and scikit-image photos (pip data)


def test_digits_shapes_dtypes_and_labels():
    digits, labels = images.load_digits()
    assert digits.shape == (1797, 8, 8) and digits.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert digits.max() == 16 and digits.min() == 0  # grey levels are counts of set pixels in 4x4 blocks
    # All ten classes, roughly balanced (the UCI test split has 174-183 images per digit).
    counts = np.bincount(labels, minlength=10)
    assert len(counts) == 10 and counts.min() >= 170 and counts.max() <= 185


def test_digits_are_deterministic():
    first_images, first_labels = images.load_digits()
    second_images, second_labels = images.load_digits()
    np.testing.assert_array_equal(first_images, second_images)
    np.testing.assert_array_equal(first_labels, second_labels)


def test_skimage_photos_are_rgb_uint8_and_deterministic():
    photos = images.load_skimage_photos()
    assert list(photos) == sorted(images.SKIMAGE_PHOTOS)
    for name, photo in photos.items():
        assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[-1] == 3, name
        assert min(photo.shape[:2]) >= 256, name
        assert photo.std() > 10, f"{name} looks blank"
    assert photos["astronaut"].shape == (512, 512, 3)
    again = images.load_skimage_photos()
    for name in photos:
        np.testing.assert_array_equal(photos[name], again[name])


# ---------------------------------------------------------------------------------------------------------------------
# Emoji: parsing on a fixture laid out like the npm package (emoji.json + img/twitter/64/*.png)


def _write_emoji_package(root, entries, pngs):
    """`entries` go to emoji.json; `pngs` maps file name -> PIL image saved under img/twitter/64/."""
    (root / images.EMOJI_IMAGES_IN_PACKAGE).mkdir(parents=True)
    (root / "emoji.json").write_text(json.dumps(entries), encoding="utf-8")
    for file_name, png in pngs.items():
        png.save(root / images.EMOJI_IMAGES_IN_PACKAGE / file_name)
    return root


def _entry(short_name, image, sort_order, name="SOME EMOJI", category="Smileys & Emotion", twitter=True):
    return {
        "name": name,
        "short_name": short_name,
        "image": image,
        "category": category,
        "sort_order": sort_order,
        "has_img_twitter": twitter,
    }


@pytest.fixture
def emoji_package(tmp_path):
    red = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
    half_transparent = Image.new("RGBA", (64, 64), (0, 0, 255, 255))
    half_transparent.paste((0, 0, 0, 0), (0, 0, 32, 64))  # left half fully transparent
    entries = [
        _entry("blue_half", "blue.png", sort_order=2, name=None, category="Flags"),
        _entry("red", "red.png", sort_order=1, name="RED SQUARE"),
        _entry("no_twitter_image", "absent.png", sort_order=0, twitter=False),
    ]
    return _write_emoji_package(tmp_path, entries, {"red.png": red, "blue.png": half_transparent})


def test_parse_emoji_index_keeps_twitter_images_in_sort_order(emoji_package):
    emoji = images.parse_emoji_index(emoji_package / "emoji.json")
    assert [entry["short_name"] for entry in emoji] == ["red", "blue_half"]
    assert emoji[0] == {"name": "RED SQUARE", "category": "Smileys & Emotion", "short_name": "red", "file": "red.png"}
    assert emoji[1]["name"] == "BLUE HALF"  # a null name falls back to the short name


def test_load_emoji_rgba_and_rgb(emoji_package):
    rgba = images.load_emoji(emoji_package)
    assert [entry["short_name"] for entry in rgba] == ["red", "blue_half"]
    assert set(rgba[0]) == {"name", "category", "short_name", "image"}
    for entry in rgba:
        assert entry["image"].shape == (64, 64, 4) and entry["image"].dtype == np.uint8
    np.testing.assert_array_equal(rgba[0]["image"][0, 0], [255, 0, 0, 255])
    np.testing.assert_array_equal(rgba[1]["image"][0, 0], [0, 0, 0, 0])

    rgb = images.load_emoji(emoji_package, mode="RGB")
    assert rgb[1]["image"].shape == (64, 64, 3)
    np.testing.assert_array_equal(rgb[1]["image"][0, 0], [255, 255, 255])  # transparent -> white
    np.testing.assert_array_equal(rgb[1]["image"][0, 63], [0, 0, 255])


def test_load_emoji_errors(emoji_package, tmp_path):
    with pytest.raises(ValueError, match="mode must be"):
        images.load_emoji(emoji_package, mode="L")
    (emoji_package / images.EMOJI_IMAGES_IN_PACKAGE / "red.png").unlink()
    with pytest.raises(RuntimeError, match="red.png is listed in emoji.json but missing"):
        images.load_emoji(emoji_package)

    wrong_size = _write_emoji_package(
        tmp_path / "wrong_size", [_entry("big", "big.png", 0)], {"big.png": Image.new("RGB", (72, 72))}
    )
    with pytest.raises(RuntimeError, match="is 72x72, expected 64x64"):
        images.load_emoji(wrong_size)

    no_category = _write_emoji_package(tmp_path / "no_category", [_entry("x", "x.png", 0, category=None)], {})
    with pytest.raises(ValueError, match=r"lacks \['category'\]"):
        images.parse_emoji_index(no_category / "emoji.json")


def test_emoji_dir_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "EMOJI_CACHE_DIR", tmp_path / "never-fetched")
    with pytest.raises(RuntimeError, match=r"run `python -m corpus.images`"):
        images.load_emoji()


@pytest.mark.skipif(not (images.EMOJI_CACHE_DIR / "emoji.json").is_file(), reason="emoji not fetched")
def test_fetched_emoji():
    emoji = images.load_emoji()
    assert len(emoji) > 1800
    assert len({entry["category"] for entry in emoji}) >= 8
    assert all(entry["image"].shape == (64, 64, 4) for entry in emoji)


# ---------------------------------------------------------------------------------------------------------------------
# Speech: parsing on a fixture laid out like the Debian packages (sounds/<prompt>.wav + core-sounds-en.txt.gz)

SAMPLING_RATE = 8000
TRANSCRIPT = """; Core Asterisk Sounds in English

beep: [this is a simple beep tone]
digits/0: zero
digits/1: one
digits/2: two
digits/3: three
digits/4: four
digits/5: five
digits/6: six
digits/7: seven
digits/8: eight
digits/9: nine
hello-world: Hello world.
only-in-extra-sounds: This one has no recording here.
"""


def _tone(frequency, seconds=0.1, amplitude=0.5):
    time = np.arange(int(SAMPLING_RATE * seconds)) / SAMPLING_RATE
    return (amplitude * np.sin(2 * np.pi * frequency * time)).astype(np.float32)


@pytest.fixture
def speech_tree(tmp_path):
    soundfile = pytest.importorskip("soundfile")
    sounds = tmp_path / "sounds"
    (sounds / "digits").mkdir(parents=True)
    for digit in range(10):
        soundfile.write(sounds / "digits" / f"{digit}.wav", _tone(200 + 50 * digit), SAMPLING_RATE, subtype="PCM_16")
    soundfile.write(sounds / "beep.wav", _tone(1000), SAMPLING_RATE, subtype="PCM_16")
    # A stereo file: left a tone, right silence, so the mono mix is half the tone.
    stereo = np.stack([_tone(440), np.zeros_like(_tone(440))], axis=1)
    soundfile.write(sounds / "hello-world.wav", stereo, SAMPLING_RATE, subtype="PCM_16")
    transcript = tmp_path / "core-sounds-en.txt.gz"
    transcript.write_bytes(gzip.compress(TRANSCRIPT.encode("utf-8")))
    return sounds, transcript


def test_parse_transcript():
    transcript = speech.parse_transcript(TRANSCRIPT)
    assert transcript["digits/7"] == "seven"
    assert transcript["hello-world"] == "Hello world."
    assert len(transcript) == 13  # the comment and the blank line are skipped
    with pytest.raises(ValueError, match="line 2 is not `<prompt>: <text>`"):
        speech.parse_transcript("ok: fine\nno separator here\n")


def test_is_speech():
    assert speech.is_speech("Hello world.")
    assert not speech.is_speech("[this is a simple beep tone]")
    assert not speech.is_speech("  ")


def test_load_prompts_pairs_recordings_with_transcripts(speech_tree):
    sounds, transcript = speech_tree
    prompts = speech.load_prompts(sounds, transcript)
    # beep (non-speech) and only-in-extra-sounds (no recording) are left out; sorted by prompt name.
    assert [prompt["name"] for prompt in prompts] == [f"digits/{digit}" for digit in range(10)] + ["hello-world"]
    for prompt in prompts:
        assert prompt["audio"].dtype == np.float32 and prompt["audio"].ndim == 1
        assert prompt["sampling_rate"] == SAMPLING_RATE
    # 16-bit PCM round trip: within one quantisation step.
    np.testing.assert_allclose(prompts[3]["audio"], _tone(350), atol=1 / 2**15)
    np.testing.assert_allclose(prompts[-1]["audio"], _tone(440) / 2, atol=1 / 2**15)  # stereo averaged to mono
    assert prompts[-1]["text"] == "Hello world."
    assert prompts[-1]["path"] == str(sounds / "hello-world.wav")


def test_load_spoken_digits(speech_tree):
    digits = speech.load_spoken_digits(*speech_tree)
    assert [digit["label"] for digit in digits] == list(range(10))
    assert [digit["text"] for digit in digits] == list(speech.DIGIT_WORDS)
    np.testing.assert_allclose(digits[9]["audio"], _tone(650), atol=1 / 2**15)


def test_speech_errors(speech_tree, tmp_path, monkeypatch):
    sounds, transcript = speech_tree
    with pytest.raises(ValueError, match="pass both sounds_dir and transcript_path"):
        speech.load_prompts(sounds_dir=sounds)
    (sounds / "digits" / "4.wav").unlink()
    with pytest.raises(RuntimeError, match="digits/4.wav or its transcript is missing"):
        speech.load_spoken_digits(sounds, transcript)
    wrong = tmp_path / "wrong.txt"
    wrong.write_text(TRANSCRIPT.replace("digits/4: four", "digits/4: for"))  # plain text: read without gzip too
    (sounds / "digits" / "4.wav").write_bytes((sounds / "digits" / "5.wav").read_bytes())
    with pytest.raises(RuntimeError, match="digits/4 is transcribed 'for', expected 'four'"):
        speech.load_spoken_digits(sounds, wrong)
    # Neither the system packages nor the cache: the error says how to fetch.
    monkeypatch.setattr(speech, "SOUNDS_IN_PACKAGE", tmp_path / "not-installed")
    monkeypatch.setattr(speech, "CACHED_SOUNDS", tmp_path / "never-fetched")
    with pytest.raises(RuntimeError, match=r"run `python -m corpus.speech`"):
        speech.load_prompts()


def _speech_fetched():
    try:
        speech.data_paths()
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(not _speech_fetched(), reason="speech corpus not fetched")
def test_fetched_speech():
    prompts = speech.load_prompts()
    assert len(prompts) > 500
    assert {prompt["sampling_rate"] for prompt in prompts} == {8000}
    digits = speech.load_spoken_digits()
    assert [digit["label"] for digit in digits] == list(range(10))
    assert all(0.2 < len(digit["audio"]) / digit["sampling_rate"] < 2.0 for digit in digits)
