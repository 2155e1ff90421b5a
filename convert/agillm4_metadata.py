"""The non-weight parts of a native AGILLM 4.x checkpoint: its embedded tokenizer and its provenance records.

A trainer checkpoint stores its tokenizer as `tokenizer_bundle` (the `save_pretrained` files) and/or
`tokenizer_json` (`backend_tokenizer.to_str()`), with the ids it trained with in `tokenizer_special`. Test
checkpoints made with the trainer's synthetic tokenizer hold a stand-in JSON instead; then no tokenizer is written
and the model card says why. Provenance (`agillm43_provenance`, step counts, library versions, ...) goes into the
model card as recorded: nothing is redacted, nothing is filled in.
"""

import base64
import binascii
import io
import json
import logging
import re
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .agillm4_container import NativeContainer
from .config_mapping import ConversionError
from .model_card import Provenance


logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- tokenizer


def _safe_file_name(name) -> str | None:
    """A bundle file name usable as-is inside the output folder (no directories, no traversal)."""
    name = str(name)
    return name if re.fullmatch(r"[\w][\w.\-]*", name) and ".." not in name else None


def _bundle_files(bundle: Mapping) -> dict[str, bytes]:
    """`tokenizer_bundle` -> {file name: bytes}: text files by name, binary ones base64-encoded under `base64`
    (a {name: base64} dict, or one base64 zip/tar archive of the `save_pretrained` folder)."""
    files = {}
    for name, content in bundle.items():
        if name == "base64":
            continue
        if isinstance(content, (str, bytes)) and _safe_file_name(name):
            files[name] = content.encode() if isinstance(content, str) else content
    encoded = bundle.get("base64")
    if isinstance(encoded, Mapping):
        files |= {name: base64.b64decode(text) for name, text in encoded.items() if _safe_file_name(name)}
    elif isinstance(encoded, str):
        files |= _archive_files(base64.b64decode(encoded))
    return files


def _archive_files(blob: bytes) -> dict[str, bytes]:
    if zipfile.is_zipfile(io.BytesIO(blob)):
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            return {Path(info.filename).name: archive.read(info) for info in archive.infolist()
                    if not info.is_dir() and _safe_file_name(Path(info.filename).name)}
    with tarfile.open(fileobj=io.BytesIO(blob)) as archive:  # raises tarfile.ReadError for anything else
        return {Path(member.name).name: archive.extractfile(member).read() for member in archive.getmembers()
                if member.isfile() and _safe_file_name(Path(member.name).name)}


def _tokenizer_from_bundle(bundle: Mapping) -> PreTrainedTokenizerBase:
    files = _bundle_files(bundle)
    if not files:
        raise ValueError("it holds no usable files")
    with tempfile.TemporaryDirectory() as folder:
        for name, content in files.items():
            (Path(folder) / name).write_bytes(content)
        # No trust_remote_code: a bundle naming custom tokenizer code fails here instead of running it.
        return AutoTokenizer.from_pretrained(folder)


def _tokenizer_from_json(tokenizer_json: str) -> PreTrainedTokenizerBase:
    from tokenizers import Tokenizer

    payload = json.loads(tokenizer_json)
    if isinstance(payload, dict) and payload.get("type") == "synthetic":
        raise ValueError(f"it is the trainer's synthetic stand-in tokenizer ({tokenizer_json}), not a real one")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json))


def _apply_special_tokens(tokenizer: PreTrainedTokenizerBase, special: Mapping) -> None:
    """Make the tokenizer's pad/eos the ones the trainer used (`tokenizer_special`)."""
    for role in ("pad", "eos"):
        token_id, token = special.get(f"{role}_token_id"), special.get(f"{role}_token")
        if not isinstance(token_id, int) or getattr(tokenizer, f"{role}_token_id") == token_id:
            continue
        token = token or tokenizer.convert_ids_to_tokens(token_id)
        if token is None or tokenizer.convert_tokens_to_ids(token) != token_id:
            logger.warning("tokenizer_special %s id %s has no token in the restored tokenizer.", role, token_id)
            continue
        setattr(tokenizer, f"{role}_token", token)


def restore_tokenizer(checkpoint: Mapping, vocab_size: int) -> tuple[PreTrainedTokenizerBase | None, str]:
    """The tokenizer embedded in the checkpoint (`tokenizer_bundle`, else `tokenizer_json`), and how it was found.

    Returns `(None, reason)` when the checkpoint embeds no real tokenizer (e.g. the synthetic test tokenizer).

    Raises:
        ConversionError: the tokenizer has more tokens than the model has embeddings.
    """
    attempts = []
    tokenizer, source = None, ""
    bundle, tokenizer_json = checkpoint.get("tokenizer_bundle"), checkpoint.get("tokenizer_json")
    if isinstance(bundle, Mapping):
        try:
            tokenizer, source = _tokenizer_from_bundle(bundle), "restored from the checkpoint's `tokenizer_bundle`"
        except (OSError, ValueError, KeyError, binascii.Error, tarfile.TarError, zipfile.BadZipFile) as error:
            attempts.append(f"`tokenizer_bundle` could not be loaded ({error})")
    if tokenizer is None and isinstance(tokenizer_json, str):
        try:
            tokenizer, source = _tokenizer_from_json(tokenizer_json), "rebuilt from the checkpoint's `tokenizer_json`"
        except Exception as error:  # noqa: BLE001 - json and tokenizers raise assorted types for bad input
            attempts.append(f"`tokenizer_json` is not usable: {error}")
    if tokenizer is None:
        reason = "; ".join(attempts) or "the checkpoint has neither `tokenizer_bundle` nor `tokenizer_json`"
        tokenizer_id = checkpoint.get("tokenizer_id")
        hint = f" The trainer's tokenizer id was `{tokenizer_id}`." if tokenizer_id else ""
        return None, f"No tokenizer was written: {reason}.{hint}"
    _apply_special_tokens(tokenizer, checkpoint.get("tokenizer_special") or {})
    if len(tokenizer) > vocab_size:
        raise ConversionError(
            f"The embedded tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} embeddings."
        )
    return tokenizer, f"Tokenizer {source} ({len(tokenizer)} tokens)."


# --------------------------------------------------------------------------------------------------- provenance


def _scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _cell_value(value) -> str:
    return f"`{value}`" if isinstance(value, str) and value else ('""' if value == "" else str(value))


def _native_details(checkpoint: Mapping, container: NativeContainer) -> list[tuple[str, str]]:
    """Rows of the model card's source table: the file, then every scalar the checkpoint records about itself."""
    rows = [
        ("file", f"`{container.file_name}` ({container.file_bytes:,} bytes)"),
        ("sha256", f"`{container.sha256}`"),
        ("container", container.describe()),
        ("cfg", f"`{json.dumps(dict(checkpoint['cfg']), default=str)}`"),
        ("tie_weights", str(checkpoint.get("tie_weights"))),
    ]
    skip = {"cfg", "tie_weights", "core", "ar", "sat", "nat", "opt", "scaler", "tokenizer_json", "tokenizer_bundle"}
    for key, value in checkpoint.items():
        if key not in skip and _scalar(value):
            rows.append((str(key), _cell_value(value)))
    provenance = checkpoint.get("agillm43_provenance")
    if isinstance(provenance, Mapping):
        rows += [(f"provenance.{key}", _cell_value(value)) for key, value in provenance.items() if _scalar(value)]
    return rows


def _native_record(checkpoint: Mapping) -> dict:
    """The checkpoint's non-tensor metadata, verbatim, for the model card's full record."""
    keys = ("tokenizer_id", "tokenizer_special", "dataset_provenance", "agillm43_provenance")
    return {key: checkpoint[key] for key in keys if key in checkpoint}


def native_provenance(checkpoint: Mapping, container: NativeContainer, notes: list[str]) -> Provenance:
    """What the model card says about the source: the file, the checkpoint's own records, and `notes`."""
    return Provenance(
        model_type="agillm4",
        name="a native AGILLM 4.x checkpoint",
        description=f"native AGILLM 4.x checkpoint `{container.file_name}` (sha256 `{container.sha256[:16]}…`)",
        fidelity=(
            "the configuration reproduces the native forward pass (LayerNorm, ReLU MLP or MoE, AGILLM 4.x's "
            "future-only ALiBi, AR/SAT/NAT heads with their attention patterns) and the per-layer attention metric "
            "`U` is folded into each query projection; on the AGILLM 4.1 reference checkpoints every head's logits "
            "match the original's within fp32 rounding"
        ),
        command="python -m convert --agillm4 CHECKPOINT.pt OUTPUT_DIR",
        source_details=_native_details(checkpoint, container),
        source_record=_native_record(checkpoint),
        notes=notes,
    )
