"""Write a folder all at once: build it beside the target, then rename it into place.

Staging folders are named `.<target>.tmp-<pid>@<host>-<random>` (backups of a replaced target `.old-` likewise),
so that a conversion killed outright (SIGKILL, out of memory, power loss) leaves a folder whose owner can be
checked: the next conversion into the same parent deletes the ones whose process is gone, and never one of a live
process (a concurrent conversion) or of another machine sharing the folder (its pids mean nothing here).
"""

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


# Kinds: `tmp` the folder being built, `old` the previous target moved aside while it is replaced. tempfile's random
# suffix is 8 characters of [a-z0-9_].
STAGING_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)@(?P<host>[\w.-]*)-[a-z0-9_]{8}$")


def _host() -> str:
    return re.sub(r"[^\w.-]", "_", socket.gethostname())[:64]


def _staging_prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{os.getpid()}@{_host()}-"


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (setting it is process-wide, not per thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def apply_umask(folder: Path) -> None:
    """Give `folder` and everything in it the modes a plain `mkdir` / `open` would have given them.

    `tempfile.mkdtemp` creates the staging folder 0700 whatever the umask, and the rename keeps that mode: without
    this a converted folder would be private to its owner even where the user's umask shares files (0022).
    """
    umask = current_umask()
    folder_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    os.chmod(folder, folder_mode)
    for root, folders, files in os.walk(folder):
        for name in folders:
            os.chmod(os.path.join(root, name), folder_mode, follow_symlinks=False)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    except (OverflowError, ValueError):  # not a pid this OS can have; leave the folder alone
        return True
    return True


def clean_stale_staging(parent: Path) -> list[Path]:
    """Delete the staging folders in `parent` left by conversions of this machine whose process is gone.

    A stale backup (`.old-`) whose target is missing is the only copy of the previous folder (the conversion died
    between moving it aside and renaming the new one in): it is put back instead of deleted.

    Returns:
        The staging folders removed or restored.
    """
    cleaned = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:  # an unreadable parent: the conversion itself will fail there with a clear error
        return cleaned
    host = _host()
    for entry in entries:
        match = STAGING_NAME.match(entry.name)
        if match is None or match["host"] != host or entry.is_symlink() or not entry.is_dir():
            continue
        if _process_alive(int(match["pid"])):
            continue
        target = entry.parent / match["target"]
        if match["kind"] == "old" and not os.path.lexists(target):
            try:
                entry.rename(target)
                cleaned.append(entry)
                continue
            except OSError:  # another process restored it first, or the target appeared meanwhile
                pass
        shutil.rmtree(entry, ignore_errors=True)  # another cleaner may be deleting it at the same time
        if not os.path.lexists(entry):
            cleaned.append(entry)
    return cleaned


def check_output_dir(target: Path, overwrite: bool) -> None:
    """Fail before any work is done if `target` cannot be (re)placed."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder.")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it.")
    for parent in target.parents:  # e.g. OUTPUT_DIR = some/file.txt/agillm
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"Cannot create {target}: {parent} is a file, not a folder.")
            break


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to `target`; on success it replaces `target`, on error it is deleted.

    The temporary folder lives in the same parent, so the final step is a rename on one filesystem: readers see
    either the old folder or the complete new one, never a half-written one. An existing `target` (with
    `overwrite=True`) is moved aside first and restored if the rename fails. Stale staging folders of killed
    conversions in the same parent are removed first; the result's modes follow the umask.
    """
    target = Path(target).absolute()
    check_output_dir(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(target.parent)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(target, "tmp"), dir=target.parent))
    try:
        yield staging
        apply_umask(staging)
        _replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    backup = Path(tempfile.mkdtemp(prefix=_staging_prefix(target, "old"), dir=target.parent))
    backup.rmdir()  # only the unique name is needed; `rename` wants it free
    target.rename(backup)
    try:
        staging.rename(target)
    except BaseException:
        backup.rename(target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def check_output_file(target: Path, overwrite: bool) -> None:
    """Fail before any work is done if the file `target` cannot be (re)placed."""
    target = Path(target)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a folder; give the path of the file to write.")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it.")
    check_output_dir(target, overwrite=True)  # a parent that is a file


@contextmanager
def atomic_file(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path next to `target`; on success it replaces `target`, on error it is deleted.

    The single-file twin of `atomic_directory` (same staging name), for outputs such as a GGUF file: readers see
    the old file or the complete new one. The file's mode follows the umask.
    """
    target = Path(target).absolute()
    check_output_file(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=_staging_prefix(target, "tmp"), dir=target.parent)
    os.close(descriptor)
    staging = Path(name)
    try:
        yield staging
        os.chmod(staging, 0o666 & ~current_umask())  # mkstemp creates it 0600
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
