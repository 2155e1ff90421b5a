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
"""

import gzip
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


SOUNDS_PACKAGE = "asterisk-core-sounds-en-wav"
TRANSCRIPT_PACKAGE = "asterisk-core-sounds-en"
SOUNDS_IN_PACKAGE = Path("usr/share/asterisk/sounds/en_US_f_Allison")  # where dpkg puts them, relative to the root
TRANSCRIPT_IN_PACKAGE = Path("usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache" / TRANSCRIPT_PACKAGE
CACHED_SOUNDS = CACHE_DIR / "sounds"
CACHED_TRANSCRIPT = CACHE_DIR / TRANSCRIPT_IN_PACKAGE.name
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


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
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"`{tool}` not found: the speech corpus is read from Debian packages.")
    CACHE_DIR.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR.parent) as work:
        packages = [SOUNDS_PACKAGE, TRANSCRIPT_PACKAGE]
        download = subprocess.run(["apt-get", "download", *packages], cwd=work, capture_output=True, text=True)
        root = Path(work) / "root"
        for package in packages:
            debs = sorted(Path(work).glob(f"{package}_*.deb"))
            if download.returncode != 0 or not debs:
                raise RuntimeError(
                    f"`apt-get download {' '.join(packages)}` failed (the package lists may need `apt-get update`):"
                    f"\n{download.stderr}"
                )
            subprocess.run(["dpkg", "-x", str(debs[0]), str(root)], check=True)
        staging = Path(work) / "staging"
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


if __name__ == "__main__":  # `python -m corpus.speech`: the one-time fetch
    try:
        sounds, transcript = fetch()
        prompts = load_prompts()
        digits = load_spoken_digits()
    except RuntimeError as error:
        sys.exit(f"error: {error}")
    minutes = sum(len(prompt["audio"]) / prompt["sampling_rate"] for prompt in prompts) / 60
    rates = sorted({prompt["sampling_rate"] for prompt in prompts})
    print(f"{len(prompts)} prompts ({minutes:.1f} min of audio at {rates} Hz), {len(digits)} digit recordings, from "
          f"{sounds}", file=sys.stderr)
