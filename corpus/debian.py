"""Debian packages as data: `apt-get download` (the package registry, no root) + `dpkg -x` into a scratch folder.

Every corpus that reads files out of a Debian package (Python docs, Asterisk prompts, flite / espeak-ng) fetches it
the same way: `with extracted_packages([...], cache_parent) as root:` yields the unpacked tree in a temporary folder
under `cache_parent`; the caller moves what it keeps into place with one `rename` (so an interrupted fetch never
leaves a partial folder), and the rest is deleted on exit.
"""

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def extracted_packages(packages: list[str], cache_parent: Path) -> Iterator[Path]:
    """Download `packages` and unpack them all into one root folder (a scratch folder inside `cache_parent`)."""
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"`{tool}` not found: {', '.join(packages)} are read from Debian packages.")
    cache_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_parent) as work:
        download = subprocess.run(["apt-get", "download", *packages], cwd=work, capture_output=True, text=True)
        if download.returncode != 0:
            raise RuntimeError(
                f"`apt-get download {' '.join(packages)}` failed (the package lists may need `apt-get update`):\n"
                f"{download.stderr}"
            )
        root = Path(work) / "root"
        for package in packages:
            debs = sorted(Path(work).glob(f"{package}_*.deb"))
            if not debs:
                raise RuntimeError(f"`apt-get download {package}` left no {package}_*.deb")
            subprocess.run(["dpkg", "-x", str(debs[0]), str(root)], check=True)
        yield root
