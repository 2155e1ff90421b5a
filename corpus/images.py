"""Small offline image sets for multimodal work, from package registries only (never a hub).

- `load_digits()`: scikit-learn's bundled handwritten digits (1797 8x8 greyscale images, labels 0-9; a copy of the
  UCI "Optical Recognition of Handwritten Digits" test set), inside the `scikit-learn` wheel.
- `load_skimage_photos()`: the colour photographs that ship inside the `scikit-image` wheel (astronaut, cat, coffee,
  rocket, ...). Only files present in the wheel are read; the `skimage.data` functions whose files need a `pooch`
  download are never called.
- `load_emoji()`: the Twemoji 64x64 PNGs with their names and categories from the npm package
  `emoji-datasource-twitter` (emoji.json from iamcal/emoji-data). Graphics: Copyright 2019 Twitter, Inc and other
  contributors (Twemoji), licensed CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/); data: iamcal/emoji-data
  (MIT). `python -m corpus.images` fetches the package once with `npm pack` into the git-ignored
  `.cache/emoji-datasource-twitter-<version>/`; afterwards everything here works offline.
"""

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np


EMOJI_PACKAGE = "emoji-datasource-twitter"
EMOJI_VERSION = "16.0.0"
EMOJI_SIZE = 64
EMOJI_IMAGES_IN_PACKAGE = f"img/twitter/{EMOJI_SIZE}"  # relative to the package root, as in the npm tarball
EMOJI_CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache" / f"{EMOJI_PACKAGE}-{EMOJI_VERSION}"

# `skimage.data` function -> the file it reads from the wheel's data folder. Only RGB photographs: the greyscale,
# synthetic (colorwheel, logo) and download-only images are left out.
SKIMAGE_PHOTOS = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
}


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [1797, 8, 8] with grey levels 0-16, labels int64 [1797] in 0-9), in the file's order."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as error:
        raise RuntimeError("the digits images need scikit-learn: pip install -r requirements.txt") from error
    digits = sklearn_load_digits()
    # Stored as float64 counts of set pixels in 4x4 blocks (0-16): exact small integers, so uint8 loses nothing.
    images = digits.images.astype(np.uint8)
    if not np.array_equal(images, digits.images):
        raise RuntimeError("scikit-learn's digits are expected to hold integer grey levels 0-16")
    return images, digits.target.astype(np.int64)


def load_skimage_photos() -> dict[str, np.ndarray]:
    """The wheel's colour photographs as `{name: uint8 [H, W, 3]}`, sorted by name."""
    try:
        import skimage.data
    except ImportError as error:
        raise RuntimeError("the photos need scikit-image: pip install -r requirements.txt") from error
    data_dir = Path(skimage.data.__file__).parent
    photos = {}
    for name, filename in sorted(SKIMAGE_PHOTOS.items()):
        # Checked first: a missing file would make skimage try a pooch download, which must never happen here.
        if not (data_dir / filename).is_file():
            raise RuntimeError(f"{filename} is not in scikit-image's wheel ({data_dir}); expected scikit-image 0.26")
        image = np.asarray(getattr(skimage.data, name)())
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise RuntimeError(f"skimage.data.{name}() gave {image.dtype} {image.shape}, expected uint8 [H, W, 3]")
        photos[name] = image
    return photos


def emoji_dir() -> Path:
    """The extracted package folder (holding emoji.json and img/), or a clear error when it was never fetched."""
    if (EMOJI_CACHE_DIR / "emoji.json").is_file():
        return EMOJI_CACHE_DIR
    raise RuntimeError(
        f"the emoji images need the npm package {EMOJI_PACKAGE}@{EMOJI_VERSION}: run `python -m corpus.images` "
        f"(once, needs npm and the registry) to extract it into {EMOJI_CACHE_DIR}."
    )


def fetch_emoji() -> Path:
    """Extract emoji.json and the 64px PNGs from the npm tarball (a no-op when already there); returns the folder."""
    try:
        return emoji_dir()
    except RuntimeError:
        pass
    if shutil.which("npm") is None:
        raise RuntimeError(f"`npm` not found: the emoji images come from the npm package {EMOJI_PACKAGE}.")
    EMOJI_CACHE_DIR.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=EMOJI_CACHE_DIR.parent) as work:
        spec = f"{EMOJI_PACKAGE}@{EMOJI_VERSION}"
        pack = subprocess.run(["npm", "pack", spec], cwd=work, capture_output=True, text=True)
        tarballs = sorted(Path(work).glob(f"{EMOJI_PACKAGE}-*.tgz"))
        if pack.returncode != 0 or not tarballs:
            raise RuntimeError(f"`npm pack {spec}` failed:\n{pack.stderr}")
        staging = Path(work) / "package"
        with tarfile.open(tarballs[0]) as tarball:
            # The tarball also holds 16/20/32px copies and sprite sheets (~60 MB): only what the loader reads.
            wanted = [
                member
                for member in tarball.getmembers()
                if member.name == "package/emoji.json"
                or (member.name.startswith(f"package/{EMOJI_IMAGES_IN_PACKAGE}/") and member.name.endswith(".png"))
            ]
            tarball.extractall(work, members=wanted, filter="data")
        if not (staging / "emoji.json").is_file():
            raise RuntimeError(f"{tarballs[0].name} has no package/emoji.json")
        # Moved in one step so that an interrupted fetch never leaves a partial folder.
        staging.rename(EMOJI_CACHE_DIR)
    return EMOJI_CACHE_DIR


def parse_emoji_index(index_path: Path) -> list[dict]:
    """The emoji.json entries that have a Twitter image, as {"name", "category", "short_name", "file"}, sorted
    by the dataset's `sort_order` (the Unicode emoji ordering) so the list is stable across runs."""
    entries = json.loads(Path(index_path).read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise ValueError(f"{index_path}: expected a JSON list of emoji, got {type(entries).__name__}")
    emoji = []
    for entry in sorted(entries, key=lambda entry: entry.get("sort_order", 0)):
        if not entry.get("has_img_twitter"):
            continue
        missing = [key for key in ("image", "short_name", "category") if not entry.get(key)]
        if missing:
            raise ValueError(f"{index_path}: entry {entry.get('unified', entry)} lacks {missing}")
        # A few entries have no Unicode name (`null`, e.g. some flags): fall back to the short name.
        name = entry.get("name") or entry["short_name"].replace("_", " ").upper()
        emoji.append(
            {"name": name, "category": entry["category"], "short_name": entry["short_name"], "file": entry["image"]}
        )
    return emoji


def load_emoji(root: Path | None = None, mode: str = "RGBA") -> list[dict]:
    """Every emoji with a Twitter image as {"name", "category", "short_name", "image": uint8 [64, 64, C]} where C
    is 4 for mode "RGBA" (the PNGs' own transparency) or 3 for "RGB" (composited onto white).

    `root` is a folder laid out like the package (emoji.json, img/twitter/64/*.png); by default, the fetched one.
    """
    from PIL import Image

    if mode not in ("RGBA", "RGB"):
        raise ValueError(f"mode must be 'RGBA' or 'RGB', got {mode!r}")
    root = Path(root) if root is not None else emoji_dir()
    images_dir = root / EMOJI_IMAGES_IN_PACKAGE
    emoji = []
    for entry in parse_emoji_index(root / "emoji.json"):
        path = images_dir / entry.pop("file")
        if not path.is_file():
            raise RuntimeError(f"{path} is listed in emoji.json but missing: re-run `python -m corpus.images`")
        with Image.open(path) as png:
            rgba = png.convert("RGBA")
        if rgba.size != (EMOJI_SIZE, EMOJI_SIZE):
            raise RuntimeError(f"{path} is {rgba.size[0]}x{rgba.size[1]}, expected {EMOJI_SIZE}x{EMOJI_SIZE}")
        if mode == "RGB":
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgba = Image.alpha_composite(white, rgba)
        entry["image"] = np.asarray(rgba.convert(mode), dtype=np.uint8)
        emoji.append(entry)
    return emoji


def fetch() -> None:
    """Fetch what the loaders need and is not there yet, then print what each loader finds."""
    fetch_emoji()
    images, labels = load_digits()
    photos = load_skimage_photos()
    emoji = load_emoji()
    categories = sorted({entry["category"] for entry in emoji})
    print(f"digits: {len(images)} images {images.shape[1:]}, {len(set(labels.tolist()))} labels", file=sys.stderr)
    print(f"skimage photos: {len(photos)} ({', '.join(photos)})", file=sys.stderr)
    print(f"emoji: {len(emoji)} images {EMOJI_SIZE}x{EMOJI_SIZE} in {len(categories)} categories", file=sys.stderr)


if __name__ == "__main__":  # `python -m corpus.images`: the one-time fetch
    try:
        fetch()
    except RuntimeError as error:
        sys.exit(f"error: {error}")
