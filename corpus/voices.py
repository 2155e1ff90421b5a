"""Spoken digits "zero" ... "nine" in many synthetic voices, made offline with Debian's `flite` and `espeak-ng`.

Licences: the clips are synthesised by programs used as tools only; nothing of them is redistributed or linked in.
    - flite (Carnegie Mellon University's Festival-lite) and its CMU voices kal, kal16, awb, rms and slt: a BSD-like
      licence (free use, modification and redistribution with the copyright notice kept).
    - espeak-ng and espeak-ng-data: GPL-3.0-or-later.

Voices (`voice_plan()`), 103 of them, each saying every digit in two speaking styles:
    - flite's five English voices `flite-{kal,kal16,awb,rms,slt}` (`awb_time`, which only speaks clock times, is
      left out), styles "normal" and "slow" (`duration_stretch` 1.3);
    - espeak-ng's seven built-in English accents that say the digits differently (`ESPEAK_ACCENTS`; the MBROLA
      voices that `--voices=en` also lists need the non-free mbrola program) times fourteen voice variants
      (`ESPEAK_VARIANTS`: male m1-m7, female f1-f5, croak, whisper), named like `espeak-en-gb-scotland+f2`,
      styles "normal" (espeak-ng's defaults) and "slow-low" (130 words per minute, pitch 35 of 99).

Where the programs come from, per engine, first match wins:
    1. the installed package (`apt-get install flite espeak-ng`);
    2. the repository's cache, `.cache/debian-<engine>/` (git-ignored), which `fetch_engines()` (run by
       `python -m corpus.speech`) fills without root: `apt-get download` of the engine and of every library package
       that `apt-get install` would add (`apt-get -s`, a simulation), then `dpkg -x`. The programs run from there
       with LD_LIBRARY_PATH pointing into the tree (espeak-ng also with `--path=` to its espeak-ng-data).

`synthesize()` writes the clips to `.cache/spoken-digits/plan-<digest>/<voice>/<digit>-<style>.wav` plus a
manifest.json; the digest is of the voice plan, so a changed plan is synthesised afresh, and a second call finds the
clips and returns at once. `load_synthetic_digits()` reads them back and needs neither program.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from corpus.debian import extracted_packages
from corpus.speech import DIGIT_WORDS, read_audio


CACHE_ROOT = Path(__file__).resolve().parent.parent / ".cache"
CLIPS_DIR = CACHE_ROOT / "spoken-digits"
MANIFEST_NAME = "manifest.json"

FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")
FLITE_STYLES = {"normal": (), "slow": ("--setf", "duration_stretch=1.3")}
# Named by the language each voice file answers to. British English is "en", not "en-gb": espeak-ng 1.51 drops the
# variant from "en-gb+m3" (all variants came out identical). "en-us-nyc" is left out: it says every digit sample for
# sample as "en-us" does.
ESPEAK_ACCENTS = (
    "en",  # British
    "en-us",
    "en-gb-scotland",
    "en-gb-x-gbclan",  # Lancaster
    "en-gb-x-gbcwmd",  # West Midlands
    "en-gb-x-rp",  # Received Pronunciation
    "en-029",  # Caribbean
)
ESPEAK_VARIANTS = tuple(f"m{n}" for n in range(1, 8)) + tuple(f"f{n}" for n in range(1, 6)) + ("croak", "whisper")
ESPEAK_STYLES = {"normal": (), "slow-low": ("-s", "130", "-p", "35")}


# ---------------------------------------------------------------------------------------------------------------------
# The programs: installed, or extracted from Debian's packages into the cache


@dataclass(frozen=True)
class Engine:
    """How to run one synthesiser: the program, the environment it needs and arguments that every call takes."""

    name: str
    executable: str
    env: dict = field(default_factory=dict)
    fixed_args: tuple = ()

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.executable, *self.fixed_args, *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
        )


def engine_cache_dir(name: str) -> Path:
    return CACHE_ROOT / f"debian-{name}"


def engine_from_tree(name: str, root: Path) -> Engine | None:
    """The engine as extracted by `dpkg -x` under `root`, or None when it is not there."""
    executable = root / "usr" / "bin" / name
    if not executable.is_file():
        return None
    # Every folder holding shared objects: usr/lib/<arch>/ and, for libpulse, usr/lib/<arch>/pulseaudio/.
    library_dirs = sorted({str(library.parent) for library in root.glob("usr/lib/**/*.so*")})
    env = {"LD_LIBRARY_PATH": os.pathsep.join(library_dirs + [os.environ.get("LD_LIBRARY_PATH", "")]).rstrip(":")}
    fixed_args = ()
    if name == "espeak-ng":
        data = sorted(root.glob("usr/lib/*/espeak-ng-data"))
        if not data:
            return None
        fixed_args = (f"--path={data[0].parent}",)  # the folder that holds espeak-ng-data, not the folder itself
    return Engine(name, str(executable), env, fixed_args)


def find_engine(name: str) -> Engine | None:
    """The installed program, else the cache's; None when neither is there."""
    if name not in ("flite", "espeak-ng"):
        raise ValueError(f"unknown engine {name!r}: expected 'flite' or 'espeak-ng'")
    installed = shutil.which(name)
    if installed is not None:
        return Engine(name, installed)
    return engine_from_tree(name, engine_cache_dir(name))


def packages_to_extract(package: str) -> list[str]:
    """`package` and every package `apt-get install` would add with it (libraries missing here), by name."""
    simulation = subprocess.run(
        ["apt-get", "-s", "-o", "Debug::NoLocking=1", "install", "--no-install-recommends", package],
        capture_output=True,
        text=True,
    )
    if simulation.returncode != 0:
        raise RuntimeError(
            f"`apt-get -s install {package}` failed (the package lists may need `apt-get update`):\n"
            f"{simulation.stderr}"
        )
    return [package] + [name for name in parse_simulated_installs(simulation.stdout) if name != package]


def parse_simulated_installs(output: str) -> list[str]:
    """Package names from `apt-get -s install` output, whose lines look like
    `Inst libsonic0 (0.2.0-12 Debian:12.12/stable [amd64])`."""
    return [line.split()[1] for line in output.splitlines() if line.startswith("Inst ")]


def extract_packages(packages: list[str], target: Path) -> None:
    """`apt-get download` + `dpkg -x` of `packages` into `target`, created in one step (never left half-made)."""
    with extracted_packages(packages, target.parent) as root:
        root.rename(target)


def check_engine(engine: Engine) -> None:
    """Run the program once, so that a missing library fails here with the loader's message."""
    probe = engine.run("-lv") if engine.name == "flite" else engine.run("--version")
    if probe.returncode != 0:
        raise RuntimeError(f"{engine.executable} does not run:\n{probe.stderr.strip()}")


def fetch_engines() -> dict[str, Engine]:
    """flite and espeak-ng, each installed or extracted into the cache (done once); checked by running them."""
    engines = {}
    for name in ("flite", "espeak-ng"):
        engine = find_engine(name)
        if engine is None:
            extract_packages(packages_to_extract(name), engine_cache_dir(name))
            engine = find_engine(name)
        check_engine(engine)
        engines[name] = engine
    return engines


# ---------------------------------------------------------------------------------------------------------------------
# Voices and synthesis


@dataclass(frozen=True)
class Voice:
    """One synthetic voice: `name` is unique (`flite-slt`, `espeak-en-us+m3`); `styles` maps a style name to the
    extra arguments that give it. `speaker` groups voices that share a timbre: espeak-ng's variant (`espeak-ng+m3`)
    sets pitch, formants and breathiness whatever the accent, and two accents even give sample-identical clips of
    some digits with the same variant (en-029 and en-gb-x-gbclan say "eight" alike), so a held-out voice is only
    unseen when its whole speaker is held out (see `corpus.speech.spoken_digit_split`)."""

    name: str
    engine: str
    voice_args: tuple
    styles: dict
    speaker: str

    def command(self, word: str, style: str, wav: Path) -> tuple:
        if self.engine == "flite":
            return (*self.voice_args, *self.styles[style], "-t", word, "-o", str(wav))
        return (*self.voice_args, *self.styles[style], "-w", str(wav), word)


def voice_plan() -> list[Voice]:
    """Every synthetic voice, in a fixed order (see the module docstring)."""
    voices = [
        Voice(f"flite-{name}", "flite", ("-voice", name), FLITE_STYLES, speaker=f"flite-{name}")
        for name in FLITE_VOICES
    ]
    for accent in ESPEAK_ACCENTS:
        for variant in ESPEAK_VARIANTS:
            voice = f"{accent}+{variant}"
            voices.append(Voice(f"espeak-{voice}", "espeak-ng", ("-v", voice), ESPEAK_STYLES, f"espeak-ng+{variant}"))
    return voices


def parse_flite_voices(listing: str) -> list[str]:
    """Voice names from `flite -lv` (`Voices available: kal awb_time kal16 awb rms slt`)."""
    prefix = "Voices available:"
    for line in listing.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].split()
    raise ValueError(f"`flite -lv` printed no {prefix!r} line: {listing!r}")


def parse_espeak_voices(listing: str) -> list[str]:
    """Languages the built-in voices of `espeak-ng --voices=<lang>` answer to: each row's Language column and the
    `(language priority)` pairs after its File column (`gmw/en` is "en-gb" and also "en"). Rows of MBROLA voices
    (file `mb/...`) are left out: they need the separate mbrola program."""
    languages = []
    for line in listing.splitlines()[1:]:
        columns = line.split(maxsplit=5)
        if len(columns) < 5 or columns[4].startswith("mb/"):
            continue
        languages.append(columns[1])
        if len(columns) == 6:
            languages.extend(re.findall(r"\(([\w-]+) \d+\)", columns[5]))
    return languages


def check_voices(engines: dict[str, Engine], voices: list[Voice]) -> None:
    """Every planned voice exists in the installed programs, so a missing one is named rather than misspoken."""
    available = {
        "flite": set(parse_flite_voices(engines["flite"].run("-lv").stdout)),
        "espeak-ng": set(parse_espeak_voices(engines["espeak-ng"].run("--voices=en").stdout)),
    }
    # flite's `-voice slt` and espeak-ng's `-v en-us+m3`: the voice proper comes before any `+variant`.
    names = [voice.voice_args[1] for voice in voices]
    missing = [name for voice, name in zip(voices, names) if name.split("+")[0] not in available[voice.engine]]
    if missing:
        raise RuntimeError(f"voices not found in the installed synthesisers: {sorted(set(missing))}")


def describe_plan(voices: list[Voice]) -> list[dict]:
    """The plan as JSON-ready data: what a manifest records and `plan_digest` hashes."""
    return [
        {"name": voice.name, "engine": voice.engine, "voice_args": list(voice.voice_args), "speaker": voice.speaker,
         "styles": {style: list(args) for style, args in voice.styles.items()}}
        for voice in voices
    ]


def plan_digest(voices: list[Voice]) -> str:
    return hashlib.sha1(json.dumps(describe_plan(voices), sort_keys=True).encode("utf-8")).hexdigest()[:12]


def default_clips_dir() -> Path:
    """Where the clips of the current `voice_plan()` live: a folder per plan, so that clips made with other voices
    or settings are never mixed in."""
    return CLIPS_DIR / f"plan-{plan_digest(voice_plan())}"


def clip_path(voice: str, digit: int, style: str) -> Path:
    return Path(voice) / f"{digit}-{style}.wav"


def synthesize_clip(engine: Engine, voice: Voice, digit: int, style: str, clips_dir: Path) -> dict:
    """Synthesise one clip (written under a temporary name, then renamed) and return its manifest entry."""
    relative = clip_path(voice.name, digit, style)
    wav = clips_dir / relative
    if not wav.is_file():
        wav.parent.mkdir(parents=True, exist_ok=True)
        partial = wav.with_suffix(".partial.wav")
        result = engine.run(*voice.command(DIGIT_WORDS[digit], style, partial))
        if result.returncode != 0 or not partial.is_file():
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"{engine.name} failed on {voice.name} {DIGIT_WORDS[digit]!r}: {result.stderr.strip()}")
        partial.rename(wav)
    return {
        "path": str(relative),
        "digit": digit,
        "text": DIGIT_WORDS[digit],
        "voice": voice.name,
        "speaker": voice.speaker,
        "engine": voice.engine,
        "style": style,
    }


def synthesize(clips_dir: Path | None = None, workers: int | None = None) -> Path:
    """Every digit in every voice and style of `voice_plan()` under `clips_dir` (default `default_clips_dir()`),
    listed in its manifest.json, which is written last: its presence means the set is complete. Returns its path."""
    voices = voice_plan()
    clips_dir = Path(clips_dir) if clips_dir is not None else default_clips_dir()
    manifest = clips_dir / MANIFEST_NAME
    if manifest.is_file():
        if json.loads(manifest.read_text(encoding="utf-8"))["plan"] != describe_plan(voices):
            raise RuntimeError(f"{clips_dir} holds clips of another voice plan: remove it, or pass another folder")
        return manifest
    engines = fetch_engines()
    check_voices(engines, voices)
    jobs = [(voice, digit, style) for voice in voices for style in voice.styles for digit in range(len(DIGIT_WORDS))]
    # The programs are single-threaded and short-lived: one process per core keeps them all busy.
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        entries = list(
            pool.map(lambda job: synthesize_clip(engines[job[0].engine], *job, clips_dir=clips_dir), jobs)
        )
    partial_manifest = manifest.with_suffix(".partial")
    partial_manifest.write_text(json.dumps({"plan": describe_plan(voices), "clips": entries}), encoding="utf-8")
    partial_manifest.rename(manifest)
    return manifest


def is_synthesized(clips_dir: Path | None = None) -> bool:
    return ((Path(clips_dir) if clips_dir is not None else default_clips_dir()) / MANIFEST_NAME).is_file()


def load_synthetic_digits(clips_dir: Path | None = None) -> list[dict]:
    """The synthesised clips in manifest order, as {"audio": float32 [samples], "sampling_rate", "digit", "text",
    "voice", "speaker", "engine", "style"}. Needs `synthesize()` to have run (`python -m corpus.speech`)."""
    clips_dir = Path(clips_dir) if clips_dir is not None else default_clips_dir()
    manifest = clips_dir / MANIFEST_NAME
    if not manifest.is_file():
        raise RuntimeError(
            f"no synthetic spoken digits in {clips_dir}: run `python -m corpus.speech` once (it fetches flite and "
            f"espeak-ng from Debian's packages, then synthesises them)."
        )
    records = []
    for entry in json.loads(manifest.read_text(encoding="utf-8"))["clips"]:
        audio, sampling_rate = read_audio(clips_dir / entry.pop("path"))
        records.append({"audio": audio, "sampling_rate": sampling_rate, **entry})
    return records
