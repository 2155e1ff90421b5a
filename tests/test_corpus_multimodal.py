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

from corpus import images, speech, voices


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


# ---------------------------------------------------------------------------------------------------------------------
# Spoken digits in many voices (corpus/voices.py): the plumbing on fixtures and fake synthesisers; the real clips and
# programs when `python -m corpus.speech` has fetched them.

FLITE_LISTING = "Voices available: kal awb_time kal16 awb rms slt \n"
ESPEAK_LISTING = """Pty Language       Age/Gender VoiceName          File                 Other Languages
 2  en-gb           --/M      English_(Great_Britain) gmw/en               (en 2)
 3  en-uk           --/M      english-mb-en1     mb/mb-en1            (en-gb 3)(en 2)
 2  en-us           --/M      English_(America)  gmw/en-US            (en 3)
 9  en              --/F      en-german-1        mb/mb-de1-en
 5  en-gb-x-gbclan  --/M      English_(Lancaster) gmw/en-GB-x-gbclan   (en-gb 3)(en 5)
 5  en-us-nyc       --/M      English_(America,_New_York_City) gmw/en-US-nyc
"""
APT_SIMULATION = """NOTE: This is only a simulation!
Reading package lists...
Inst libsonic0 (0.2.0-12 Debian:12.12/stable [amd64])
Inst espeak-ng (1.51+dfsg-10+deb12u2 Debian:12.12/stable [amd64])
Conf libsonic0 (0.2.0-12 Debian:12.12/stable [amd64])
"""


def test_voice_plan_covers_both_engines_with_unique_names():
    plan = voices.voice_plan()
    names = [voice.name for voice in plan]
    assert len(names) == len(set(names)) == 5 + 7 * 14
    assert {voice.engine for voice in plan} == {"flite", "espeak-ng"}
    assert "flite-awb_time" not in names  # speaks only clock times
    assert "espeak-en-gb-scotland+f2" in names and "flite-slt" in names
    assert all(len(voice.styles) == 2 and "normal" in voice.styles for voice in plan)


def test_voice_commands():
    flite, espeak = voices.voice_plan()[0], voices.voice_plan()[-1]
    assert flite.command("seven", "slow", "out.wav") == (
        "-voice", "kal", "--setf", "duration_stretch=1.3", "-t", "seven", "-o", "out.wav"
    )
    assert espeak.command("two", "slow-low", "out.wav") == (
        "-v", "en-029+whisper", "-s", "130", "-p", "35", "-w", "out.wav", "two"
    )


def test_parse_synthesiser_listings():
    assert voices.parse_flite_voices(FLITE_LISTING) == ["kal", "awb_time", "kal16", "awb", "rms", "slt"]
    with pytest.raises(ValueError, match="printed no 'Voices available:' line"):
        voices.parse_flite_voices("usage: flite ...")
    # MBROLA voices (mb/...) need the separate mbrola program: left out. Other languages in brackets count too.
    assert voices.parse_espeak_voices(ESPEAK_LISTING) == [
        "en-gb", "en", "en-us", "en", "en-gb-x-gbclan", "en-gb", "en", "en-us-nyc"
    ]
    assert voices.parse_simulated_installs(APT_SIMULATION) == ["libsonic0", "espeak-ng"]


def test_engine_from_extracted_tree(tmp_path, monkeypatch):
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    assert voices.engine_from_tree("espeak-ng", tmp_path) is None
    libraries = tmp_path / "usr/lib/x86_64-linux-gnu"
    (libraries / "pulseaudio").mkdir(parents=True)
    (libraries / "libespeak-ng.so.1").touch()
    (libraries / "pulseaudio/libpulsecommon-16.1.so").touch()
    (tmp_path / "usr/bin").mkdir()
    (tmp_path / "usr/bin/espeak-ng").touch()
    assert voices.engine_from_tree("espeak-ng", tmp_path) is None  # no espeak-ng-data: it could not speak
    (libraries / "espeak-ng-data").mkdir()
    engine = voices.engine_from_tree("espeak-ng", tmp_path)
    assert engine.executable == str(tmp_path / "usr/bin/espeak-ng")
    assert engine.env["LD_LIBRARY_PATH"] == f"{libraries}:{libraries / 'pulseaudio'}"
    assert engine.fixed_args == (f"--path={libraries}",)
    with pytest.raises(ValueError, match="unknown engine 'festival'"):
        voices.find_engine("festival")


# Writes a 0.2 s tone whose pitch depends on the word, the voice and the style, as flite (-t WORD -o OUT) or
# espeak-ng (-w OUT WORD) would be called; stdlib only, so that each call starts fast.
FAKE_SYNTHESISER = """
import array, math, sys, wave
args = sys.argv[1:]
out = args[args.index("-o" if "-o" in args else "-w") + 1]
word = args[args.index("-t") + 1] if "-t" in args else args[-1]
pitch = 100 + 10 * len(word) + (50 if "kal" in args else 0) + (25 if "slow" in args else 0)
samples = array.array("h", (int(8000 * math.sin(2 * math.pi * pitch * n / 8000)) for n in range(1600)))
with wave.open(out, "wb") as wav:
    wav.setnchannels(1); wav.setsampwidth(2); wav.setframerate(8000)
    wav.writeframes(samples.tobytes())
"""


@pytest.fixture
def fake_synthesis(tmp_path, monkeypatch):
    """`voices.synthesize` with a two-voice plan and a Python script standing in for both programs."""
    pytest.importorskip("soundfile")
    import sys

    fake = voices.Engine("fake", sys.executable, fixed_args=("-c", FAKE_SYNTHESISER))
    plan = [
        voices.Voice("flite-kal", "flite", ("-voice", "kal"), {"normal": (), "slow": ("slow",)}, "flite-kal"),
        voices.Voice("espeak-en-us+m1", "espeak-ng", ("-v", "en-us+m1"), {"normal": ()}, "espeak-ng+m1"),
    ]
    monkeypatch.setattr(voices, "fetch_engines", lambda: {"flite": fake, "espeak-ng": fake})
    monkeypatch.setattr(voices, "voice_plan", lambda: plan)
    monkeypatch.setattr(voices, "check_voices", lambda engines, planned: None)
    return tmp_path / "clips"


def test_synthesize_writes_clips_and_manifest_once(fake_synthesis, monkeypatch):
    with pytest.raises(RuntimeError, match=r"no synthetic spoken digits .* run `python -m corpus.speech`"):
        voices.load_synthetic_digits(fake_synthesis)
    manifest = voices.synthesize(fake_synthesis, workers=2)
    assert voices.is_synthesized(fake_synthesis) and manifest == fake_synthesis / "manifest.json"
    records = voices.load_synthetic_digits(fake_synthesis)
    assert len(records) == 10 * 3  # kal in two styles, en-us+m1 in one
    assert [record["text"] for record in records[:10]] == list(speech.DIGIT_WORDS)
    assert set(records[0]) == {"audio", "sampling_rate", "digit", "text", "voice", "speaker", "engine", "style"}
    assert (records[0]["voice"], records[0]["engine"], records[0]["style"]) == ("flite-kal", "flite", "normal")
    assert (records[-1]["voice"], records[-1]["digit"]) == ("espeak-en-us+m1", 9)
    assert all(record["sampling_rate"] == 8000 and record["audio"].dtype == np.float32 for record in records)
    assert (fake_synthesis / "flite-kal" / "7-slow.wav").is_file()
    kal_seven, kal_seven_slow = (records[7]["audio"], records[17]["audio"])
    assert not np.allclose(kal_seven, kal_seven_slow)  # the style's arguments reached the program
    # A second call finds the manifest and runs nothing: a failing program would raise.
    monkeypatch.setattr(voices, "fetch_engines", lambda: pytest.fail("synthesised again"))
    assert voices.synthesize(fake_synthesis) == manifest
    # A folder made with another plan is not taken for this one's.
    fewer_voices = voices.voice_plan()[:1]
    monkeypatch.setattr(voices, "voice_plan", lambda: fewer_voices)
    with pytest.raises(RuntimeError, match="holds clips of another voice plan"):
        voices.synthesize(fake_synthesis)



def test_failed_synthesis_names_the_voice(tmp_path):
    import sys

    failing = voices.Engine("espeak-ng", sys.executable, fixed_args=("-c", "import sys; sys.exit('no such voice')"))
    voice = voices.Voice("espeak-xx+m1", "espeak-ng", ("-v", "xx+m1"), {"normal": ()}, "espeak-ng+m1")
    with pytest.raises(RuntimeError, match="espeak-ng failed on espeak-xx\\+m1 'three': no such voice"):
        voices.synthesize_clip(failing, voice, 3, "normal", tmp_path)
    assert not list(tmp_path.rglob("*.wav"))  # nothing half-written is left to be taken for a clip


def _digit_records(speakers_by_engine):
    """Ten records per voice; `speakers_by_engine` maps engine -> {speaker: [voice, ...]}."""
    return [
        {"audio": np.full(80 + digit, digit / 10, np.float32), "sampling_rate": 8000, "digit": digit,
         "text": speech.DIGIT_WORDS[digit], "voice": voice, "speaker": speaker, "engine": engine, "style": "normal"}
        for engine, speakers in speakers_by_engine.items() for speaker, names in speakers.items()
        for voice in names for digit in range(10)
    ]


def test_spoken_digit_split_holds_out_whole_speakers_of_every_engine():
    espeak = {f"espeak-ng+m{n}": [f"espeak-{accent}+m{n}" for accent in ("en", "en-us")] for n in range(12)}
    flite = {name: [name] for name in ("flite-a", "flite-b", "flite-c")}
    allison = {"asterisk-allison": ["asterisk-allison"]}
    records = _digit_records({"espeak-ng": espeak, "flite": flite, "asterisk": allison})
    train, test = speech.spoken_digit_split(records)
    train_voices, test_voices = {r["voice"] for r in train}, {r["voice"] for r in test}
    assert not train_voices & test_voices and len(train) + len(test) == len(records)
    test_speakers = {r["speaker"] for r in test}
    assert not test_speakers & {r["speaker"] for r in train}  # both accents of a variant go to the same half
    assert len(test_speakers) == 3 + 1 and len(test_voices) == 2 * 3 + 1  # round(0.25 * 12) variants, 1 flite voice
    assert {r["engine"] for r in test} == {"espeak-ng", "flite"}  # the single recorded voice stays in training
    assert "asterisk-allison" in train_voices
    assert [r["digit"] for r in test[:10]] == list(range(10))  # whole voices, in record order
    # Deterministic for a seed; another seed draws other speakers.
    assert speech.spoken_digit_split(records)[1] == test
    assert {r["speaker"] for r in speech.spoken_digit_split(records, seed=1)[1]} != test_speakers
    assert len({r["speaker"] for r in speech.spoken_digit_split(records, held_out_fraction=0.5)[1]}) == 6 + 2
    # Without "speaker", each voice is its own speaker.
    voice_only = [{key: value for key, value in r.items() if key != "speaker"} for r in records]
    assert len({r["voice"] for r in speech.spoken_digit_split(voice_only)[1]}) == round(0.25 * 24) + 1
    for fraction in (0, 1, 1.5):
        with pytest.raises(ValueError, match="held_out_fraction must be in"):
            speech.spoken_digit_split(records, held_out_fraction=fraction)


def test_spoken_digit_dataset_round_trip():
    records = _digit_records({"flite": {"flite-a": ["flite-a"]}, "espeak-ng": {"espeak-ng+m1": ["espeak-b"]}})
    dataset = speech.spoken_digit_dataset(records)
    assert len(dataset) == 20 and dataset.features["digit"].names == list(speech.DIGIT_WORDS)
    rows = dataset.with_format("numpy")
    for index in (0, 7, 19):
        np.testing.assert_array_equal(rows[index]["audio"], records[index]["audio"])
        assert rows[index]["audio"].dtype == np.float32
        assert rows[index]["digit"] == records[index]["digit"] and rows[index]["voice"] == records[index]["voice"]
    assert len(speech.spoken_digit_dataset([])) == 0


@pytest.mark.skipif(not voices.is_synthesized() or not _speech_fetched(), reason="spoken digits not synthesised")
def test_fetched_spoken_digit_corpus():
    records = speech.load_spoken_digit_corpus()
    assert len(records) == 10 * (2 * 103 + 1) and len({r["voice"] for r in records}) == 104
    assert {r["sampling_rate"] for r in records} == {8000, 16000, 22050}
    for record in records:  # non-silent and about a word long
        assert np.abs(record["audio"]).max() > 0.05, (record["voice"], record["text"], record["style"])
        assert 0.3 < len(record["audio"]) / record["sampling_rate"] < 2.0, (record["voice"], record["text"])
    # Every voice sounds different: no two voices give the same clips (espeak-ng silently drops the variant of
    # "en-gb+m3", and en-us-nyc says the digits exactly as en-us does: both were left out for this).
    by_voice = {}
    for record in records:
        by_voice.setdefault(record["voice"], []).append(record["audio"].tobytes())
    assert len({b"".join(clips) for clips in by_voice.values()}) == len(by_voice) == 104
    # ... and not only by a few samples: a low male and a female voice have different average spectra.
    def spectrum(voice):
        audio = next(r["audio"] for r in records if r["voice"] == voice and r["digit"] == 7 and r["style"] == "normal")
        frames = np.lib.stride_tricks.sliding_window_view(audio, 512)[::256] * np.hanning(512)
        magnitude = np.abs(np.fft.rfft(frames)).mean(axis=0)
        return magnitude / np.linalg.norm(magnitude)
    assert spectrum("espeak-en-us+m3") @ spectrum("espeak-en-us+f2") < 0.95
    assert spectrum("flite-slt") @ spectrum("flite-rms") < 0.95
    # The slow styles are slower.
    lengths = {(r["voice"], r["digit"], r["style"]): len(r["audio"]) for r in records}
    for (voice, digit, style), length in lengths.items():
        if style in ("slow", "slow-low"):
            assert length > 1.1 * lengths[voice, digit, "normal"], (voice, digit)

    train, test = speech.spoken_digit_split(records)
    assert not {r["voice"] for r in train} & {r["voice"] for r in test}
    assert len({r["voice"] for r in test}) == 1 + 4 * 7 and {r["engine"] for r in test} == {"flite", "espeak-ng"}
    # No test clip is a sample-for-sample copy of a training clip (some accents say some digits alike).
    train_clips = {r["audio"].tobytes() for r in train}
    assert not [(r["voice"], r["text"]) for r in test if r["audio"].tobytes() in train_clips]
    assert sorted(np.bincount([r["digit"] for r in test])) == [len(test) // 10] * 10  # every voice says every digit


@pytest.mark.skipif(
    voices.find_engine("flite") is None or voices.find_engine("espeak-ng") is None, reason="synthesisers not fetched"
)
def test_fetched_synthesisers_speak(tmp_path):
    engines = {name: voices.find_engine(name) for name in ("flite", "espeak-ng")}
    plan = voices.voice_plan()
    voices.check_voices(engines, plan)
    for voice in (plan[0], plan[-1]):
        entry = voices.synthesize_clip(engines[voice.engine], voice, 4, "normal", tmp_path)
        audio, sampling_rate = speech.read_audio(tmp_path / entry["path"])
        assert sampling_rate in (8000, 22050) and np.abs(audio).max() > 0.05
