"""The Python 3.11 documentation sources from Debian's `python3.11-doc` package (~500 pages, ~12 MB, PSF licence).

Sphinx ships each page's reStructuredText source next to its HTML as `html/_sources/<page>.rst.txt`; these are the
documents, kept as written (reST markup, code samples and all: the register that sets them apart from Shakespeare).

Where they come from, first match wins:
    1. the installed package: /usr/share/doc/python3.11/html/_sources (`apt-get install python3.11-doc`);
    2. the repository's cache, `.cache/python3.11-doc/_sources` (git-ignored), which `python -m corpus.python_docs`
       fills without root: `apt-get download python3.11-doc` (the package registry) and `dpkg -x`. `make setup`
       runs that step; afterwards everything here works offline.
"""

import sys
from functools import lru_cache
from pathlib import Path

from corpus.debian import extracted_packages


PACKAGE = "python3.11-doc"
SOURCES_IN_PACKAGE = Path("usr/share/doc/python3.11/html/_sources")  # where dpkg puts them, relative to the root
SYSTEM_SOURCES = Path("/") / SOURCES_IN_PACKAGE
CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache" / PACKAGE
CACHED_SOURCES = CACHE_DIR / "_sources"
SUFFIX = ".rst.txt"
# Whole pages held out for evaluation (one of each kind: tutorial, library reference, how-to, language reference,
# FAQ), so held-out loss measures pages the model never saw.
HELD_OUT_DOCS = (
    "tutorial/controlflow",
    "library/itertools",
    "library/collections",
    "howto/sorting",
    "reference/compound_stmts",
    "faq/programming",
)


def sources_dir() -> Path:
    """The `_sources` folder to read: the installed package's, else the cache's."""
    for folder in (SYSTEM_SOURCES, CACHED_SOURCES):
        if folder.is_dir():
            return folder
    raise RuntimeError(
        f"the Python docs corpus needs Debian's {PACKAGE} package: run `python -m corpus.python_docs` (part of "
        f"`make setup`) to extract it into {CACHE_DIR}, or `apt-get install {PACKAGE}`."
    )


def fetch() -> Path:
    """Make the sources available (a no-op when they already are); returns the folder `load_docs` reads."""
    try:
        return sources_dir()
    except RuntimeError:
        pass
    with extracted_packages([PACKAGE], CACHE_DIR) as root:
        (root / SOURCES_IN_PACKAGE).rename(CACHED_SOURCES)  # only the sources are kept
    return CACHED_SOURCES


def _clean(text: str) -> str:
    """Trailing spaces and runs of blank lines removed; the reST itself is kept."""
    lines = "\n".join(line.rstrip() for line in text.splitlines())
    while "\n\n\n" in lines:
        lines = lines.replace("\n\n\n", "\n\n")
    return lines.strip() + "\n"


@lru_cache(maxsize=1)
def load_docs() -> dict[str, str]:
    """Every page as `{name: text}`, the name being its path without the suffix (`library/itertools`), sorted."""
    root = sources_dir()
    docs = {}
    for path in sorted(root.rglob(f"*{SUFFIX}")):
        text = _clean(path.read_text(encoding="utf-8"))
        if text.strip():
            docs[path.relative_to(root).as_posix()[: -len(SUFFIX)]] = text
    if len(docs) < 400:
        raise RuntimeError(f"expected the ~500 pages of {PACKAGE} in {root}, found {len(docs)}")
    missing = [name for name in HELD_OUT_DOCS if name not in docs]
    if missing:
        raise RuntimeError(f"{root} lacks the held-out pages {missing}")
    return docs


def train_and_held_out() -> tuple[list[str], list[str]]:
    """(training pages, held-out pages) as lists of texts."""
    docs = load_docs()
    train = [text for name, text in docs.items() if name not in HELD_OUT_DOCS]
    held_out = [docs[name] for name in HELD_OUT_DOCS]
    return train, held_out


if __name__ == "__main__":  # `python -m corpus.python_docs`: the setup step
    folder = fetch()
    pages = load_docs()
    print(f"{len(pages)} pages, {sum(map(len, pages.values())) / 1e6:.1f} MB of text in {folder}", file=sys.stderr)
