"""Read a native AGILLM 4.x `.pt` checkpoint file into its checkpoint dict, without running any pickled code.

The trainer writes every file with the legacy (non-zip) `torch.save`. By default the checkpoint dict is first
serialized to memory, compressed, and the file then holds a small wrapper dict (FORMAT.md, section 2):

    {"__agillm43_payload_codec__": "agillm43_zstd_torch_v1", "codec": "zstd", "raw_nbytes": ..., "payload": uint8[...]}

where `payload` is one zstd frame, or the bytes `ZLIB` + a zlib stream when `zstandard` was missing at save time.
A file whose compressed form would not have been smaller holds the checkpoint dict directly. Only the magic key
decides which it is (the inner `agillm43_ckpt_codec` records what was *requested*, not what was written).

Both levels are read with `torch.load(weights_only=True)`: dicts, lists, strings, numbers and tensors only.
"""

import hashlib
import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .config_mapping import ConversionError
from .reading import reading


PAYLOAD_CODEC_KEY = "__agillm43_payload_codec__"
PAYLOAD_CODEC = "agillm43_zstd_torch_v1"
ZLIB_FALLBACK_MAGIC = b"ZLIB"
ZSTD_FRAME_MAGIC = b"\x28\xb5\x2f\xfd"
# What a torch file starts with: a pickle stream (protocol >= 2, legacy torch.save) or a zip archive (torch >= 1.6).
TORCH_FILE_PREFIXES = (b"\x80", b"PK\x03\x04")


@dataclass
class NativeContainer:
    """How a checkpoint file was stored; recorded in the converted model card."""

    file_name: str
    file_bytes: int
    sha256: str
    codec: str  # "plain", "zstd" or "zlib" (the `ZLIB` fallback payload)
    codec_level: int | None = None  # the zstd level the wrapper records
    raw_nbytes: int | None = None  # size of the inner torch.save stream, for wrapped files

    def describe(self) -> str:
        if self.codec == "plain":
            return "plain legacy `torch.save` (no compression wrapper)"
        level = f" level {self.codec_level}" if self.codec_level is not None else ""
        return f"`{PAYLOAD_CODEC}` wrapper, {self.codec}{level} payload ({self.raw_nbytes:,} bytes uncompressed)"


def _check_torch_prefix(head: bytes, what: str) -> None:
    if not head.startswith(TORCH_FILE_PREFIXES):
        raise ConversionError(
            f"Not a torch checkpoint: {what} starts with bytes {head[:8].hex(' ') or '(none: it is empty)'}, "
            "not a pickle stream or a zip archive."
        )


def _torch_load(source, what: str) -> object:
    """`torch.load(weights_only=True)` of a path or a byte stream; every failure becomes a `ConversionError`."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises EOFError, RuntimeError, UnpicklingError, KeyError ...
        if "Weights only load failed" in str(error):
            reason = "it pickles objects other than tensors and plain containers, which are never unpickled here"
        else:
            reason = f"truncated or corrupt ({type(error).__name__}: {str(error).strip() or 'unexpected end of data'})"
        raise ConversionError(f"Cannot read {what}: {reason}.") from error


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _decompress(wrapper: dict, what: str) -> tuple[bytes, str]:
    payload = wrapper.get("payload")
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
        raise ConversionError(f"{what} has the {PAYLOAD_CODEC} wrapper but no 1-D uint8 `payload` tensor.")
    blob = memoryview(payload.contiguous().numpy())  # no copy of a payload that may be gigabytes
    magic = bytes(blob[:4])
    try:
        if magic == ZLIB_FALLBACK_MAGIC:
            return zlib.decompress(blob[len(ZLIB_FALLBACK_MAGIC):]), "zlib"
        if magic != ZSTD_FRAME_MAGIC:
            raise ConversionError(
                f"{what}: the payload is neither a zstd frame nor the ZLIB fallback (starts {magic.hex(' ')})."
            )
        import zstandard  # imported here: only wrapped checkpoints need it

        return zstandard.ZstdDecompressor().decompress(blob), "zstd"
    except ConversionError:
        raise
    except Exception as error:  # noqa: BLE001 - zlib.error, zstandard.ZstdError
        raise ConversionError(f"Cannot decompress {what}: truncated or corrupt payload ({error}).") from error


def read_native_checkpoint(path) -> tuple[dict, NativeContainer]:
    """The checkpoint dict stored in `path` (zstd/zlib wrapper removed) and how it was stored.

    Raises:
        ConversionError: a missing, truncated or non-torch file, a pickle that holds code, a corrupt payload, or a
            file whose content is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"Checkpoint {path} not found (or not a file).")
    what = f"checkpoint {path.name}"
    with reading(path, "checkpoint"):  # permission denied, an I/O error: named like every other bad file
        with path.open("rb") as file:
            head = file.read(8)
        file_bytes, sha256 = path.stat().st_size, _file_sha256(path)
    _check_torch_prefix(head, what)
    container = NativeContainer(file_name=path.name, file_bytes=file_bytes, sha256=sha256, codec="plain")
    checkpoint = _torch_load(path, what)
    if isinstance(checkpoint, dict) and checkpoint.get(PAYLOAD_CODEC_KEY) == PAYLOAD_CODEC:
        raw, container.codec = _decompress(checkpoint, what)
        expected = checkpoint.get("raw_nbytes")
        if isinstance(expected, int) and expected != len(raw):
            raise ConversionError(
                f"Checkpoint {path.name}: the payload decompresses to {len(raw)} bytes, the wrapper says {expected}."
            )
        container.raw_nbytes = len(raw)
        level = checkpoint.get("zstd_level")
        container.codec_level = level if isinstance(level, int) and container.codec == "zstd" else None
        del checkpoint  # the compressed payload; only the decompressed stream is needed from here on
        _check_torch_prefix(raw[:8], f"the payload of {what}")
        checkpoint = _torch_load(io.BytesIO(raw), f"the payload of {what}")
    if not isinstance(checkpoint, dict):
        raise ConversionError(
            f"Checkpoint {path.name} holds a {type(checkpoint).__name__}, not an AGILLM checkpoint dict."
        )
    return checkpoint, container
