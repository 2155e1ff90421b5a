"""Every source file the converters read goes through here, so that a bad file always stops with one clear message.

Low-level readers fail in their own words, and most of them never say which file they were reading: safetensors
raises `SafetensorError: incomplete metadata, file not fully covered`, `torch.load` an `UnpicklingError` or a
`RuntimeError` from its zip reader, `json` a `JSONDecodeError` with a line and column, the OS a `PermissionError`.
`reading(path)` turns each of those into a `ConversionError` that names the file and says what is wrong with it;
the helpers below add the checks the libraries skip (an empty file, an index naming a shard outside its folder, a
GGUF file shorter than its own tensor table).

Only failures of *reading* are translated (`SOURCE_READ_ERRORS`); a `TypeError` or `AttributeError` from inside a
reader is a bug and propagates unchanged.
"""

import json
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open

from .config_mapping import ConversionError


# What a reader raises for a missing, unreadable, truncated or corrupt file (ValueError covers JSONDecodeError,
# UnicodeDecodeError and the GGUF reader's checks; RuntimeError is torch's zip reader; KeyError and struct.error
# come from torch.load and the GGUF reader on damaged bytes).
SOURCE_READ_ERRORS = (
    OSError,
    SafetensorError,
    pickle.UnpicklingError,
    EOFError,
    RuntimeError,
    ValueError,
    KeyError,
    struct.error,
    zipfile.BadZipFile,
    yaml.YAMLError,
)
# What readers raise on bytes that are cut short or damaged (torch.load, zip and GGUF parsing).
DAMAGED_BYTES_ERRORS = (pickle.UnpicklingError, EOFError, RuntimeError, KeyError, struct.error, zipfile.BadZipFile)
# torch's message when weights_only refuses a pickle that would build arbitrary objects or call functions; it says
# the same, plus "Unsupported operand", for bytes that are no pickle at all.
WEIGHTS_ONLY_REFUSAL = "Weights only load failed"
WEIGHTS_ONLY_BAD_BYTES = "Unsupported operand"
# What a torch file starts with: a zip archive (torch >= 1.6) or a pickle stream (protocol >= 2, legacy format).
ZIP_MAGIC, PICKLE_PROTOCOL_OPCODE = b"PK", b"\x80"


def _reason(error: BaseException) -> str:
    """What is wrong with the file, in words; the low-level message is kept as the detail."""
    detail = " ".join(str(error).split()) or "unexpected end of data"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, FileNotFoundError):
        return "it does not exist"
    if isinstance(error, IsADirectoryError):
        return "it is a folder, not a file"
    if isinstance(error, SafetensorError):
        return f"not a valid safetensors file, truncated or corrupt ({detail})"
    if isinstance(error, json.JSONDecodeError):
        return f"invalid JSON ({detail})"
    if isinstance(error, UnicodeDecodeError):
        return "not UTF-8 text"
    if WEIGHTS_ONLY_REFUSAL in str(error) and WEIGHTS_ONLY_BAD_BYTES not in str(error):
        return "it pickles objects other than tensors and plain containers, which are never unpickled here"
    if isinstance(error, DAMAGED_BYTES_ERRORS):
        return f"truncated or corrupt ({type(error).__name__}: {detail})"
    return f"{type(error).__name__}: {detail}"  # e.g. a config value a library rejects: its own words are best


@contextmanager
def reading(path, what: str | None = None) -> Iterator[None]:
    """Turn a failure to read `path` inside the block into a `ConversionError` naming it (`what` describes it)."""
    try:
        yield
    except ConversionError:
        raise
    except SOURCE_READ_ERRORS as error:
        raise ConversionError(f"Cannot read {what or 'file'} {path}: {_reason(error)}.") from error


def check_not_empty(path: Path, what: str | None = None) -> None:
    """An empty file is the usual trace of a copy or download that died at once; say so instead of a parse error."""
    with reading(path, what):
        with open(path, "rb") as file:  # opened, not just stat'ed: no permission is "permission denied", not "corrupt"
            size = os.fstat(file.fileno()).st_size
    if size == 0:
        raise ConversionError(f"Cannot read {what or 'file'} {path}: it is empty (0 bytes).")


def read_json(path: Path, what: str | None = None) -> dict:
    """A JSON file that must hold an object (config.json, an index, ...)."""
    check_not_empty(path, what)
    with reading(path, what):
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ConversionError(f"Cannot read {what or 'file'} {path}: it holds a JSON {type(data).__name__}, "
                              "not an object.")
    return data


def safetensors_names(path: Path) -> list[str]:
    """The tensor names in a safetensors file; opening it checks the header against the file's size."""
    check_not_empty(path, "safetensors file")
    with reading(path, "safetensors file"), safe_open(path, framework="pt") as file:
        return list(file.keys())


def safetensors_tensor(path: Path, name: str) -> torch.Tensor:
    with reading(path, "safetensors file"), safe_open(path, framework="pt") as file:
        return file.get_tensor(name)


def torch_load(path: Path, **kwargs) -> object:
    """`torch.load(path, weights_only=True)` (no pickled code runs), memory-mapped when the file format allows it."""
    check_not_empty(path, "torch checkpoint")
    with reading(path, "torch checkpoint"):
        with open(path, "rb") as file:
            head = file.read(8)
        is_zip = zipfile.is_zipfile(path)
    # torch's own errors for these say "Invalid argument" or "Unsupported operand 110"; the first bytes tell more.
    if head.startswith(ZIP_MAGIC) and not is_zip:
        raise ConversionError(
            f"Cannot read torch checkpoint {path}: truncated or corrupt (a zip archive without its central directory)."
        )
    if not is_zip and not head.startswith(PICKLE_PROTOCOL_OPCODE):
        raise ConversionError(
            f"Cannot read torch checkpoint {path}: not a torch file (it starts with bytes {head.hex(' ')}, not a zip "
            "archive or a pickle stream)."
        )
    with reading(path, "torch checkpoint"):
        # Only the zip format (torch >= 1.6) can be memory-mapped; the legacy format is read whole.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip, **kwargs)


def check_gguf_file(path: Path) -> dict:
    """The GGUF file's metadata, after checking that the file holds every byte its tensor table points at.

    transformers' GGUF reader parses the header without looking at the data, and a file cut short in its data
    section would fail much later, deep inside dequantization, without its name.
    """
    from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata

    check_not_empty(path, "GGUF file")
    with reading(path, "GGUF file"):
        metadata, _ = read_gguf_metadata(str(path), string_arrays=("general.languages",))
        header = GgufHeader.from_file(str(path))
        size = os.path.getsize(path)
    needed = max((header.data_start + info.offset + info.nbytes for info in header.tensors), default=0)
    if needed > size:
        raise ConversionError(
            f"Cannot read GGUF file {path}: truncated (its tensor table needs {needed:,} bytes, the file has "
            f"{size:,})."
        )
    return metadata


def shard_path(folder: Path, file_name, index_path: Path) -> Path:
    """The path of a shard named in a weight index; a name that leaves the folder is refused, never followed."""
    if not isinstance(file_name, str) or file_name in ("", ".", "..") or Path(file_name).name != file_name:
        raise ConversionError(
            f"Cannot read weight index {index_path}: it names the shard {file_name!r}, which is not a plain file name "
            "inside the checkpoint folder."
        )
    return folder / file_name
