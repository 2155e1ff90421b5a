"""English speech with transcripts: Asterisk's core prompts from Debian (one voice, "Allison"; CC-BY-SA 3.0, Digium).

`asterisk-core-sounds-en-wav` holds ~570 telephone prompts (8 kHz, 16-bit mono WAV) under
/usr/share/asterisk/sounds/en_US_f_Allison/<prompt>.wav; `asterisk-core-sounds-en` ships their transcript,
core-sounds-en.txt.gz, one `<prompt>: <text>` line each (`digits/7: seven`). Transcripts that are only a bracketed
description (`beep: [this is a simple beep tone]`) name a non-speech sound and are left out of `load_prompts`.

Where they come from, first match wins:
    1. the installed packages (`apt-get install asterisk-core-sounds-en-wav asterisk-core-sounds-en`);
    2. the repository's cache, `.cache/asterisk-core-sounds-en/` (git-ignored), which `python -m corpus.speech`
       fills without root: `apt-get download` (the package registry) and `dpkg -x`. Afterwards all of it works
       offline. Not part of `make setup`: CI never needs it.

Spoken digits from many voices (`load_spoken_digit_corpus`): Allison's ten recordings (voice "asterisk-allison")
plus corpus/voices.py's synthetic clips (flite and espeak-ng, 103 voices, two speaking styles each: 2,070 clips in
all). `spoken_digit_split` holds out whole voices, so accuracy on its test half is accuracy on unseen voices, and
`spoken_digit_dataset` turns records into a `datasets.Dataset` (arrays read with soundfile: `datasets`' audiofolder
needs torchcodec, whose wheel here is CUDA-built).

`python -m corpus.speech` (also run by `make data-multimodal`) fetches the recordings and the synthesisers and
synthesises the clips; a second run finds everything in the cache.
"""

import gzip
import sys
from pathlib import Path

import numpy as np

from corpus.debian import extracted_packages


SOUNDS_PACKAGE = "asterisk-core-sounds-en-wav"
TRANSCRIPT_PACKAGE = "asterisk-core-sounds-en"
SOUNDS_IN_PACKAGE = Path("usr/share/asterisk/sounds/en_US_f_Allison")  # where dpkg puts them, relative to the root
TRANSCRIPT_IN_PACKAGE = Path("usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache" / TRANSCRIPT_PACKAGE
CACHED_SOUNDS = CACHE_DIR / "sounds"
CACHED_TRANSCRIPT = CACHE_DIR / TRANSCRIPT_IN_PACKAGE.name
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RECORDED_VOICE = "asterisk-allison"


def data_paths() -> tuple[Path, Path]:
    """(sounds folder, transcript file): the installed packages', else the cache's."""
    for sounds, transcript in (
        (Path("/") / SOUNDS_IN_PACKAGE, Path("/") / TRANSCRIPT_IN_PACKAGE),
        (CACHED_SOUNDS, CACHED_TRANSCRIPT),
    ):
        if sounds.is_dir() and transcript.is_file():
            return sounds, transcript
    raise RuntimeError(
        f"the speech corpus needs Debian's {SOUNDS_PACKAGE} and {TRANSCRIPT_PACKAGE} packages: run "
        f"`python -m corpus.speech` (once, needs apt-get and the registry) to extract them into {CACHE_DIR}, or "
        f"`apt-get install {SOUNDS_PACKAGE} {TRANSCRIPT_PACKAGE}`."
    )


def fetch() -> tuple[Path, Path]:
    """Make the recordings and transcript available (a no-op when they already are); returns `data_paths()`."""
    try:
        return data_paths()
    except RuntimeError:
        pass
    with extracted_packages([SOUNDS_PACKAGE, TRANSCRIPT_PACKAGE], CACHE_DIR.parent) as root:
        staging = root.parent / "staging"
        staging.mkdir()
        (root / SOUNDS_IN_PACKAGE).rename(staging / CACHED_SOUNDS.name)
        (root / TRANSCRIPT_IN_PACKAGE).rename(staging / CACHED_TRANSCRIPT.name)
        # Moved in one step so that an interrupted fetch never leaves a partial folder.
        staging.rename(CACHE_DIR)
    return data_paths()


def parse_transcript(text: str) -> dict[str, str]:
    """`{prompt: text}` from core-sounds-en.txt lines `<prompt>: <text>`; `;` comments and blank lines skipped."""
    transcript = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(";"):
            continue
        prompt, separator, spoken = line.partition(":")
        if not separator or not prompt.strip():
            raise ValueError(f"transcript line {number} is not `<prompt>: <text>`: {line!r}")
        transcript[prompt.strip()] = spoken.strip()
    return transcript


def read_transcript(path: Path) -> dict[str, str]:
    """`parse_transcript` of a file, gzip-compressed (as Debian ships it) or not."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return parse_transcript(raw.decode("utf-8"))


def is_speech(text: str) -> bool:
    """False for transcripts that only describe a sound (`[ascending tones]`) or are empty."""
    text = text.strip()
    return bool(text) and not (text.startswith("[") and text.endswith("]"))


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """(float32 mono samples in [-1, 1], sampling rate); channels are averaged when there are several."""
    try:
        import soundfile
    except ImportError as error:
        raise RuntimeError("reading audio needs soundfile: pip install -r requirements.txt") from error
    audio, sampling_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return audio.mean(axis=1, dtype=np.float32), sampling_rate


def load_prompts(sounds_dir: Path | None = None, transcript_path: Path | None = None) -> list[dict]:
    """Every spoken prompt that has both a recording and a transcript, sorted by prompt name, as
    {"name" (`digits/7`), "path", "text", "audio": float32 [samples], "sampling_rate"}.

    The folders default to `data_paths()`; pass both to read another tree laid out the same way.
    """
    if (sounds_dir is None) != (transcript_path is None):
        raise ValueError("pass both sounds_dir and transcript_path, or neither")
    if sounds_dir is None:
        sounds_dir, transcript_path = data_paths()
    sounds_dir = Path(sounds_dir)
    prompts = []
    for prompt, text in sorted(read_transcript(transcript_path).items()):
        path = sounds_dir / f"{prompt}.wav"
        # The transcript also lists prompts shipped only in other packages (extra sounds): those have no file here.
        if not is_speech(text) or not path.is_file():
            continue
        audio, sampling_rate = read_audio(path)
        prompts.append(
            {"name": prompt, "path": str(path), "text": text, "audio": audio, "sampling_rate": sampling_rate}
        )
    if not prompts:
        raise RuntimeError(f"no transcript entry of {transcript_path} has a recording in {sounds_dir}")
    return prompts


def load_spoken_digits(sounds_dir: Path | None = None, transcript_path: Path | None = None) -> list[dict]:
    """The ten recordings `digits/0` ... `digits/9` as in `load_prompts`, plus "label": 0-9, in label order."""
    by_name = {prompt["name"]: prompt for prompt in load_prompts(sounds_dir, transcript_path)}
    digits = []
    for label, word in enumerate(DIGIT_WORDS):
        prompt = by_name.get(f"digits/{label}")
        if prompt is None:
            raise RuntimeError(f"the recording digits/{label}.wav or its transcript is missing")
        if prompt["text"].lower().strip(" .") != word:
            raise RuntimeError(f"digits/{label} is transcribed {prompt['text']!r}, expected {word!r}")
        digits.append({**prompt, "label": label})
    return digits


def load_spoken_digit_corpus(include_recorded: bool = True) -> list[dict]:
    """Every spoken digit as {"audio": float32 [samples], "sampling_rate", "digit", "text", "voice", "speaker",
    "engine", "style"}: the synthetic voices (`corpus.voices.load_synthetic_digits`), then, with `include_recorded`,
    Allison's recordings (voice and speaker "asterisk-allison", engine "asterisk", style "recorded"). Rates differ by
    voice (8, 16 or 22.05 kHz); AgillmFeatureExtractor resamples when given `sampling_rate=`."""
    from corpus import voices  # imported here: corpus.voices itself imports this module

    records = voices.load_synthetic_digits()
    if include_recorded:
        for recording in load_spoken_digits():
            records.append(
                {
                    "audio": recording["audio"],
                    "sampling_rate": recording["sampling_rate"],
                    "digit": recording["label"],
                    "text": DIGIT_WORDS[recording["label"]],
                    "voice": RECORDED_VOICE,
                    "speaker": RECORDED_VOICE,
                    "engine": "asterisk",
                    "style": "recorded",
                }
            )
    return records


def held_out_speakers(speakers_by_engine: dict[str, list[str]], held_out_fraction: float, seed: int) -> set[str]:
    """`round(held_out_fraction * n)` of each engine's n speakers, drawn with `seed`; at least one of every engine
    that has two or more (so the held-out set mixes engines) and never all of one. An engine with a single speaker
    (Allison's recordings) stays in training: there is no second speaker of it to learn from."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    generator = np.random.default_rng(seed)
    held_out = set()
    for engine in sorted(speakers_by_engine):
        names = sorted(set(speakers_by_engine[engine]))
        if len(names) < 2:
            continue
        count = min(max(round(held_out_fraction * len(names)), 1), len(names) - 1)
        held_out.update(names[index] for index in generator.permutation(len(names))[:count])
    return held_out


def spoken_digit_split(
    records: list[dict], held_out_fraction: float = 0.25, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """(train, test) of `records` split by speaker, hence by voice: no voice is in both, so test accuracy is accuracy
    on unseen voices.

    A record's speaker is its "speaker" (else its "voice"): espeak-ng voices that share a variant (`+m3`) share one,
    whatever their accent, because they share a timbre and even some sample-identical clips (see
    `corpus.voices.Voice`); holding out single voices would leak those into the test half. The held-out speakers
    depend only on the set of speakers, `held_out_fraction` and `seed` (see `held_out_speakers`); with the full
    corpus and the defaults they are 1 of flite's 5 voices and 4 of espeak-ng's 14 variants (each in all 7 accents),
    listed by `python -m corpus.speech`; Allison stays in training. Record order is kept within each half.
    """
    speakers_by_engine = {}
    for record in records:
        speaker = record.get("speaker", record["voice"])
        speakers_by_engine.setdefault(record.get("engine", speaker), []).append(speaker)
    held_out = held_out_speakers(speakers_by_engine, held_out_fraction, seed)
    train = [record for record in records if record.get("speaker", record["voice"]) not in held_out]
    test = [record for record in records if record.get("speaker", record["voice"]) in held_out]
    return train, test


def spoken_digit_dataset(records: list[dict]):
    """A `datasets.Dataset` of `records`: "audio" as a float32 list, "digit" as a ClassLabel named by DIGIT_WORDS,
    "sampling_rate", "text", "voice", "speaker", "engine", "style". `.with_format("numpy")` gives the arrays back."""
    import pyarrow
    from datasets import ClassLabel, Dataset, Features, List, Value

    features = Features(
        {
            "audio": List(Value("float32")),
            "sampling_rate": Value("int32"),
            "digit": ClassLabel(names=list(DIGIT_WORDS)),
            "text": Value("string"),
            "voice": Value("string"),
            "speaker": Value("string"),
            "engine": Value("string"),
            "style": Value("string"),
        }
    )
    columns = {name: [record[name] for record in records] for name in features if name != "audio"}
    # One Arrow list array over all samples: ten times faster than letting `datasets` convert array after array.
    offsets = np.cumsum([0] + [len(record["audio"]) for record in records], dtype=np.int64)
    samples = np.concatenate([np.asarray(record["audio"], dtype=np.float32) for record in records] or [[]])
    columns["audio"] = pyarrow.ListArray.from_arrays(
        pyarrow.array(offsets.astype(np.int32)), pyarrow.array(samples.astype(np.float32))
    )
    return Dataset.from_dict({name: columns[name] for name in features}, features=features)


def main() -> None:
    """`python -m corpus.speech`: the one-time fetch and synthesis, then a summary on stderr."""
    import time

    from corpus import voices

    sounds, transcript = fetch()
    prompts = load_prompts()
    minutes = sum(len(prompt["audio"]) / prompt["sampling_rate"] for prompt in prompts) / 60
    rates = sorted({prompt["sampling_rate"] for prompt in prompts})
    print(f"{len(prompts)} prompts ({minutes:.1f} min of audio at {rates} Hz) from {sounds}", file=sys.stderr)

    start = time.perf_counter()
    manifest = voices.synthesize()
    synthesis_seconds = time.perf_counter() - start
    records = load_spoken_digit_corpus()
    train, test = spoken_digit_split(records)
    held_out = sorted({record["speaker"] for record in test})
    print(
        f"{len(records)} spoken digits in {len({record['voice'] for record in records})} voices "
        f"({synthesis_seconds:.1f} s to synthesise or find {manifest.parent}); split by speaker: {len(train)} clips "
        f"of {len({record['voice'] for record in train})} voices to train, {len(test)} of "
        f"{len({record['voice'] for record in test})} to test; held-out speakers: {', '.join(held_out)}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as error:
        sys.exit(f"error: {error}")
