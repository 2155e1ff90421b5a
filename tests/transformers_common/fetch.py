"""Get transformers' common model tests from its source distribution and make them importable.

The transformers wheel ships no tests; its sdist (`pip download --no-deps --no-binary :all: transformers==X`) has
`tests/test_modeling_common.py` with `ModelTesterMixin`. `ensure_transformers_tests()` downloads the sdist of the
*installed* transformers once into `.cache/` (ignored by git; reused afterwards), checks that it is that version, and
builds this importable package from it:

    .cache/transformers-<version>-tests/transformers_sdist_tests/
        __init__.py
        test_modeling_common.py      copied unchanged from the sdist's tests/
        generation/test_utils.py     our stand-in (standin_generation.py): the sdist lacks this module
        exporters/test_export.py     our stand-in (standin_exporters.py): the sdist lacks this module

It needs the package registry (pip) only on the first run. Run this file as a script to fetch ahead of the tests
(e.g. during setup): `.venv/bin/python tests/transformers_common/fetch.py`.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / ".cache"
PACKAGE_NAME = "transformers_sdist_tests"  # not `tests`: that name is this repository's own test folder
# Files taken unchanged from the sdist's tests/ folder. The only relative imports of test_modeling_common.py are
# `.generation.test_utils` and `.exporters.test_export`, which the sdist lacks and STANDINS provide.
SDIST_TEST_FILES = ("test_modeling_common.py",)
STANDINS = {
    "generation/test_utils.py": "standin_generation.py",
    "exporters/test_export.py": "standin_exporters.py",
}
STAMP_NAME = "BUILT_FROM"
PIP_TIMEOUT_S = 600


def installed_transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def download_sdist(version: str) -> Path:
    """Path of `transformers-<version>.tar.gz` in `.cache/`, downloaded with pip the first time."""
    sdist = CACHE_DIR / f"transformers-{version}.tar.gz"
    if sdist.is_file():
        return sdist
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    # Download into a private folder and move the file into place, so a concurrent or interrupted run never leaves
    # a partial archive under the final name.
    with tempfile.TemporaryDirectory(dir=CACHE_DIR, prefix=".pip-download-") as download_dir:
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
            f"transformers=={version}", "--dest", download_dir,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        downloaded = Path(download_dir) / sdist.name
        if result.returncode != 0 or not downloaded.is_file():
            raise RuntimeError(
                f"Could not download the transformers {version} sdist with `{' '.join(command)}` "
                f"(exit code {result.returncode}); the common model tests need it once (then cached in {CACHE_DIR}).\n"
                f"{result.stderr[-2000:]}"
            )
        os.replace(downloaded, sdist)
    return sdist


def read_sdist_files(sdist: Path, version: str) -> dict[str, bytes]:
    """The SDIST_TEST_FILES of the archive, after checking that its PKG-INFO names `version`."""
    root = f"transformers-{version}"
    wanted = {f"{root}/PKG-INFO": "PKG-INFO", **{f"{root}/tests/{name}": name for name in SDIST_TEST_FILES}}
    found = {}
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            for member in archive:
                if member.name in wanted and member.isfile():
                    found[wanted[member.name]] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise RuntimeError(f"{sdist} is not a readable .tar.gz ({error}); delete it to download it again.") from error
    missing = sorted(set(wanted.values()) - set(found))
    if missing:
        raise RuntimeError(f"{sdist} lacks {missing} under {root}/; delete it to download it again.")
    pkg_info = found.pop("PKG-INFO").decode().splitlines()
    pkg_version = next((line.split(":", 1)[1].strip() for line in pkg_info if line.startswith("Version:")), None)
    if pkg_version != version:
        raise RuntimeError(f"{sdist} is transformers {pkg_version}, expected {version}; delete it to download again.")
    return found


def package_files(sdist_files: dict[str, bytes]) -> dict[str, bytes]:
    """Relative path -> content of every file of the package, stand-ins and `__init__.py` files included."""
    here = Path(__file__).parent
    files = {"__init__.py": b'"""transformers\' common model tests, built by tests/transformers_common/fetch.py."""\n'}
    files.update(sdist_files)
    for target, source in STANDINS.items():
        files[target] = (here / source).read_bytes()
        files[str(Path(target).parent / "__init__.py")] = b""
    return files


def build_package(package_dir: Path, files: dict[str, bytes], stamp: str) -> None:
    """Write the package into a private folder and rename it into place (safe against concurrent test runs)."""
    if (package_dir / STAMP_NAME).is_file() and (package_dir / STAMP_NAME).read_text() == stamp:
        return
    package_dir.parent.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(dir=package_dir.parent, prefix=".build-"))
    for relative_path, content in files.items():
        (build_dir / relative_path).parent.mkdir(parents=True, exist_ok=True)
        (build_dir / relative_path).write_bytes(content)
    (build_dir / STAMP_NAME).write_text(stamp)
    shutil.rmtree(package_dir, ignore_errors=True)  # stale: built from other files
    try:
        os.rename(build_dir, package_dir)
    except OSError:  # another run renamed its (identical) build into place first
        shutil.rmtree(build_dir, ignore_errors=True)


def ensure_transformers_tests() -> str:
    """Make `transformers_sdist_tests` importable (fetching and building it if needed); returns the package name."""
    version = installed_transformers_version()
    package_dir = CACHE_DIR / f"transformers-{version}-tests" / PACKAGE_NAME
    files = package_files(read_sdist_files(download_sdist(version), version))
    # The stamp names exactly what the package was built from, so an edited stand-in triggers a rebuild.
    digest = hashlib.sha256(b"".join(path.encode() + content for path, content in sorted(files.items())))
    build_package(package_dir, files, stamp=f"transformers {version} sha256 {digest.hexdigest()}\n")
    if str(package_dir.parent) not in sys.path:
        sys.path.insert(0, str(package_dir.parent))
    return PACKAGE_NAME


if __name__ == "__main__":
    name = ensure_transformers_tests()
    print(f"{name} ready in {CACHE_DIR / f'transformers-{installed_transformers_version()}-tests'}")
