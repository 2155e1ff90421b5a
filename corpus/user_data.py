"""The user's own text, as a `datasets.Dataset` of documents with one `text` column, read offline.

What `tokenizer.build_tokenizer` trains a tokenizer on and `demo.pretrain` pre-trains an AGILLM on, from one of:

- text files and folders (`--text`): read by `load_dataset("text", data_files=...)`. A folder contributes every
  `*.txt` file under it (sorted). `sample_by` says what one document is: a whole file (`document`, the default, as
  each Shakespeare play is one document), a blank-line-separated paragraph (`paragraph`) or a line (`line`).
  Documents are what pre-training holds out whole and separates with an eos token;
- a dataset (`--dataset`): a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`
  (`load_from_disk`), a local data file (`.json`, `.jsonl`, `.csv`, `.parquet`, `.arrow`, `.txt`) or a folder of
  them, or a Hub id that is already in the local cache. The command-line entry points set `HF_HUB_OFFLINE=1`
  unless the environment says otherwise, so a Hub id that is not cached fails with a clear error instead of
  downloading; `split` picks the split and `text_column` the column that holds the text.

Documents that are empty or only whitespace are dropped (a blank line in `line` mode is not a document).
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk


TEXT_FILE_PATTERN = "*.txt"  # what a folder given to `--text` contributes
SAMPLE_BY = ("document", "paragraph", "line")
# `load_dataset` builder for a single local data file, by suffix.
BUILDER_BY_SUFFIX = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow",
                     ".txt": "text"}  # fmt: skip


def text_files(paths: Sequence[str | Path]) -> list[str]:
    """The files named, and the `*.txt` files under each folder named (sorted), as strings for `data_files`."""
    files = []
    for path in (Path(p).expanduser() for p in paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob(TEXT_FILE_PATTERN) if p.is_file())
            if not found:
                raise ValueError(f"the folder {path} holds no {TEXT_FILE_PATTERN} file; name other files explicitly")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"no such file or folder: {path}")
    return [str(path) for path in files]


def documents_from_text_files(paths: Sequence[str | Path], sample_by: str = "document") -> Dataset:
    """The documents of the text files and folders `paths` (UTF-8), one row per document."""
    if sample_by not in SAMPLE_BY:
        raise ValueError(f"sample_by must be one of {SAMPLE_BY}, got {sample_by!r}")
    files = text_files(paths)
    if not files:
        raise ValueError("no text file given")
    try:
        documents = load_dataset("text", data_files=files, sample_by=sample_by, split="train")
    except UnicodeDecodeError as error:  # `datasets` wraps it in a DatasetGenerationError, but keeps the cause
        raise ValueError(f"the text files must be UTF-8: {error}") from error
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, UnicodeDecodeError):
            raise ValueError(f"the text files must be UTF-8: {error.__cause__}") from error
        raise
    return non_empty(documents, "text", f"the text files {files}")


def load_any_dataset(name_or_path: str | Path, config_name: str | None = None, split: str = "train") -> Dataset:
    """One split of a dataset saved with `save_to_disk`, of local data files, or of a Hub id in the local cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = load_from_disk(str(path))  # a `save_to_disk` folder: a Dataset, or a DatasetDict of splits
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                raise ValueError(f"{path} has no split {split!r}; its splits: {', '.join(loaded)} "
                                 "(choose with --split)")
            return loaded[split]
        if split != "train":  # a single saved Dataset has no splits to choose from
            raise ValueError(f"{path} is a single dataset without splits; --split {split} does not apply")
        return loaded
    if path.is_file():
        builder = BUILDER_BY_SUFFIX.get(path.suffix.lower())
        if builder is None:
            known = ", ".join(BUILDER_BY_SUFFIX)
            raise ValueError(f"cannot tell the format of {path} from its suffix; known suffixes: {known}")
        loader, config_name, data_files = builder, None, str(path)  # a packaged builder reads the file
    else:
        # A Hub id is `name` or `owner/name`: neither absolute, nor starting with "." or "~", nor with a file suffix.
        looks_local = (path.is_absolute() or str(name_or_path).startswith((".", "~"))
                       or path.suffix.lower() in BUILDER_BY_SUFFIX)  # fmt: skip
        if looks_local and not path.exists():
            raise ValueError(f"no such file or folder: {path}")
        loader, data_files = str(name_or_path), None  # a folder of data files, or a Hub id
    try:
        return load_dataset(loader, config_name, data_files=data_files, split=split)
    except ConnectionError as error:  # offline (HF_HUB_OFFLINE=1) and not in the local cache
        raise ValueError(
            f"the dataset {name_or_path!r} is neither a local path nor in the local Hugging Face cache, and the Hub "
            f"was not reached ({error}). Download it once where the network is allowed (HF_HUB_OFFLINE=0, "
            "`datasets.load_dataset(...)`), or pass a local file, a folder of data files, or a `save_to_disk` folder."
        ) from error
    except ValueError as error:  # `datasets` says so when the split does not exist
        if "split" in str(error).lower():
            raise ValueError(f"{name_or_path}: {error} (choose with --split)") from error
        raise


def documents_from_dataset(name_or_path: str | Path, config_name: str | None = None, split: str = "train",
                           text_column: str = "text") -> Dataset:
    """The documents of one split of a dataset: its `text_column` alone, renamed `text`."""
    dataset = load_any_dataset(name_or_path, config_name, split)
    if text_column not in dataset.column_names:
        columns = ", ".join(dataset.column_names)
        raise ValueError(f"{name_or_path} has no column {text_column!r}; its columns: {columns} "
                         "(choose with --text-column)")
    feature = dataset.features[text_column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise ValueError(f"the column {text_column!r} of {name_or_path} must hold strings, it holds {feature}")
    dataset = dataset.select_columns([text_column])
    if text_column != "text":
        dataset = dataset.rename_column(text_column, "text")
    return non_empty(dataset, "text", f"{name_or_path} ({split}, column {text_column!r})")


def non_empty(documents: Dataset, column: str, description: str) -> Dataset:
    """`documents` without its empty and whitespace-only rows; a ValueError if none is left."""
    kept = documents.filter(lambda texts: [bool(text and text.strip()) for text in texts], batched=True,
                            input_columns=column, desc="Dropping empty documents")  # fmt: skip
    if len(kept) == 0:
        raise ValueError(f"no text in {description}: the corpus is empty")
    return kept


# --------------------------------------------------------------------------------------------------- command line


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """`--text` / `--dataset` (one of them) and the options that go with them."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--text", nargs="+", metavar="FILE_OR_DIR",
                        help=f"UTF-8 text files, and folders whose {TEXT_FILE_PATTERN} files are read")
    source.add_argument("--dataset", metavar="NAME_OR_PATH",
                        help="a `save_to_disk` folder, a local data file or folder (.json/.jsonl/.csv/.parquet/"
                             ".arrow/.txt), or a Hub dataset id already in the local cache (offline)")
    parser.add_argument("--sample-by", choices=SAMPLE_BY, default=None,
                        help="with --text: one document per file (default), per blank-line-separated paragraph, or "
                             "per line")
    parser.add_argument("--dataset-config", default=None, help="with --dataset: the configuration (subset) name")
    parser.add_argument("--split", default=None, help="with --dataset: the split to read (default: train)")
    parser.add_argument("--text-column", default=None, help="with --dataset: the column holding the text "
                                                            "(default: text)")  # fmt: skip


def documents_from_args(args: argparse.Namespace) -> Dataset:
    """The documents named by the options of `add_data_arguments`; a ValueError for an option of the other source."""
    if args.text is not None:
        stray = [option for option in ("dataset_config", "split", "text_column") if getattr(args, option) is not None]
        if stray:
            raise ValueError(f"--{stray[0].replace('_', '-')} goes with --dataset, not --text")
        return documents_from_text_files(args.text, args.sample_by or "document")
    if args.sample_by is not None:
        raise ValueError("--sample-by goes with --text, not --dataset")
    return documents_from_dataset(args.dataset, args.dataset_config, args.split or "train", args.text_column or "text")


def data_name(args: argparse.Namespace) -> str:
    """A short name for the data: the first text file's (or folder's) stem, or the dataset's last path part."""
    if args.text is not None:
        return Path(args.text[0]).stem or "text"
    return Path(str(args.dataset).rstrip("/")).name or "dataset"
