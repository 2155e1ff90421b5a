"""Hostile files (issue 11, "Files"): every bad source file stops a conversion with a `ConversionError` naming it,
and leaves nothing behind; `from_pretrained` names a broken weight file; the `python -m convert` CLI reports any
failure as one `error:` line and a non-zero exit, never a traceback; staging folders of killed conversions are
cleaned; converted folders follow the umask.

Each case breaks one file of a small, valid source (a tiny Llama checkpoint, single-file and sharded; a tiny GGUF;
a native AGILLM 4.x `.pt`) in the way a killed download, a full disk or a hostile upload would.
"""

import json
import os
import queue
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import convert.converter
from convert import ConversionError, convert_agillm4, convert_to_agillm
from convert.__main__ import main as cli_main
from convert.atomic import _host
from modeling_agillm import AgillmForCausalLM


REPO = Path(__file__).resolve().parents[1]


def _reads_unreadable_files() -> bool:
    """Whether this process reads a chmod-000 file anyway (root, i.e. CAP_DAC_OVERRIDE): those cases cannot fail."""
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "probe"
        probe.write_bytes(b"x")
        probe.chmod(0)
        try:
            probe.open("rb").close()
        except PermissionError:
            return False
        return True


READS_UNREADABLE = _reads_unreadable_files()
TINY_LLAMA = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
)
SHARD = "model-00002-of-"  # the second shard of the sharded source (the count depends on the tensor sizes)


@pytest.fixture(autouse=True)
def quiet_progress_bars():
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Valid sources, built once: `single` (model.safetensors), `sharded` (3 shards + index), `gguf` (a file)."""
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="12KB")
    assert len(list((root / "sharded").glob("*.safetensors"))) >= 3  # a first, a second and a later shard

    from gguf import GGUFWriter

    writer = GGUFWriter(root / "model.gguf", arch="llama")
    writer.add_tensor("token_embd.weight", torch.randn(64, 32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"single": root / "single", "sharded": root / "sharded", "gguf": root / "model.gguf"}


@pytest.fixture(scope="module")
def agillm_folder(tmp_path_factory) -> Path:
    """A saved AGILLM model (code files included, so it also loads as remote code): `single` and `sharded`."""
    from conftest import build_tiny_model

    root = tmp_path_factory.mktemp("agillm")
    model = build_tiny_model(seed=0)
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    return root


def assert_only(parent: Path, keep: set[str]) -> None:
    """Nothing was written beside `keep`: no output folder, no staging folder, no stray file."""
    assert {path.name for path in parent.iterdir()} == keep


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _shard(folder: Path) -> Path:
    return next(folder.glob(f"{SHARD}*.safetensors"))


def _garble_safetensors_header(path: Path) -> None:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    path.write_bytes(data[:8] + b"{" * length + data[8 + length:])  # same size, header no longer JSON


def _huge_header_length(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes((10**12).to_bytes(8, "little") + data[8:])


def _edit_index(folder: Path, edit) -> None:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))


def _move_listing(index: dict) -> None:
    """List a tensor of the first shard under the middle shard, which does not hold it."""
    name = next(name for name, file in index["weight_map"].items() if file.startswith("model-00001"))
    index["weight_map"][name] = next(file for file in index["weight_map"].values() if file.startswith(SHARD))


def _escape_folder(index: dict) -> None:
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../model.safetensors"  # a real file, outside the checkpoint folder


class CodeInPickle:
    """Pickles as a call to `open(path, "w")`: unpickling it without weights_only would create the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _bin_instead_of_safetensors(folder: Path, write) -> None:
    (folder / "model.safetensors").unlink()
    write(folder / "pytorch_model.bin")


def _bin_truncated(path: Path) -> None:
    torch.save({"model.embed_tokens.weight": torch.zeros(64, 32)}, path)
    _truncate(path, path.stat().st_size // 2)


def _unreadable(path: Path) -> None:
    path.chmod(0)


# case: (source kind, break(source path), the file the message must name, expected message)
HOSTILE_SOURCES = {
    "safetensors-zero-byte": ("single", lambda s: (s / "model.safetensors").write_bytes(b""), "model.safetensors",
                              "empty"),
    "safetensors-truncated-header": ("single", lambda s: _truncate(s / "model.safetensors", 20), "model.safetensors",
                                     "truncated or corrupt"),
    "safetensors-truncated-data": ("single", lambda s: _truncate(s / "model.safetensors", -100), "model.safetensors",
                                   "truncated or corrupt"),
    "safetensors-header-not-json": ("single", lambda s: _garble_safetensors_header(s / "model.safetensors"),
                                    "model.safetensors", "invalid JSON"),
    "safetensors-header-length-huge": ("single", lambda s: _huge_header_length(s / "model.safetensors"),
                                       "model.safetensors", "header too large"),
    "shard-truncated": ("sharded", lambda s: _truncate(_shard(s), -64), SHARD, "truncated or corrupt"),
    "shard-missing": ("sharded", lambda s: _shard(s).unlink(), SHARD, "is missing"),
    "index-tensor-not-in-shard": ("sharded", lambda s: _edit_index(s, _move_listing), SHARD, "does not hold"),
    "index-not-json": ("sharded", lambda s: (s / "model.safetensors.index.json").write_text("{\"weight_map\": {"),
                       "model.safetensors.index.json", "invalid JSON"),
    "index-without-weight-map": ("sharded", lambda s: _edit_index(s, lambda index: index.pop("weight_map")),
                                 "model.safetensors.index.json", "no `weight_map`"),
    "index-shard-outside-folder": ("sharded", lambda s: _edit_index(s, _escape_folder),
                                   "model.safetensors.index.json", "not a plain file name"),
    "config-not-json": ("single", lambda s: (s / "config.json").write_text("{'model_type': 'llama'"), "config.json",
                        "invalid JSON"),
    "config-not-an-object": ("single", lambda s: (s / "config.json").write_text("[1, 2]"), "config.json",
                             "not an object"),
    "config-zero-byte": ("single", lambda s: (s / "config.json").write_bytes(b""), "config.json", "empty"),
    "generation-config-not-utf8": ("single", lambda s: (s / "generation_config.json").write_bytes(b"\xff\xfe{"),
                                   "generation_config.json", "not UTF-8"),
    "bin-not-a-torch-file": ("single", lambda s: _bin_instead_of_safetensors(s, lambda p: p.write_text("<html>")),
                             "pytorch_model.bin", "not a torch file"),
    "bin-pickle-garbage": (
        "single", lambda s: _bin_instead_of_safetensors(s, lambda p: p.write_bytes(b"\x80\x02" + b"garbage" * 20)),
        "pytorch_model.bin", "truncated or corrupt",
    ),
    "bin-pickle-runs-code": (
        "single",
        lambda s: _bin_instead_of_safetensors(s, lambda p: torch.save({"x": CodeInPickle(p.parent / "pwned")}, p)),
        "pytorch_model.bin", "never unpickled",
    ),
    "bin-truncated-zip": ("single", lambda s: _bin_instead_of_safetensors(s, _bin_truncated), "pytorch_model.bin",
                          "truncated or corrupt"),
    "gguf-zero-byte": ("gguf", lambda s: s.write_bytes(b""), "model.gguf", "empty"),
    "gguf-truncated-data": ("gguf", lambda s: _truncate(s, -100), "model.gguf", "truncated"),
    "gguf-truncated-header": ("gguf", lambda s: _truncate(s, 30), "model.gguf", "truncated or corrupt"),
    "safetensors-unreadable": ("single", lambda s: _unreadable(s / "model.safetensors"), "model.safetensors",
                               "permission denied"),
    "config-unreadable": ("single", lambda s: _unreadable(s / "config.json"), "config.json", "permission denied"),
}
UNREADABLE_CASES = {"safetensors-unreadable", "config-unreadable"}
NEEDS_PERMISSIONS = pytest.mark.skipif(READS_UNREADABLE, reason="root reads a chmod-000 file anyway")


def _copy_source(sources: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    if kind == "gguf":
        return Path(shutil.copy(sources["gguf"], tmp_path / "model.gguf"))
    return Path(shutil.copytree(sources[kind], tmp_path / "source"))


@pytest.mark.parametrize(
    "kind, damage, named, message",
    [pytest.param(*case, id=name, marks=[NEEDS_PERMISSIONS] if name in UNREADABLE_CASES else [])
     for name, case in HOSTILE_SOURCES.items()],
)
def test_hostile_source_file_is_named_and_nothing_is_written(sources, tmp_path, kind, damage, named, message):
    source = _copy_source(sources, kind, tmp_path)
    damage(source)
    with pytest.raises(ConversionError, match=message) as raised:
        convert_to_agillm(source, tmp_path / "agillm")
    assert named in str(raised.value)
    assert_only(tmp_path, {source.name})  # no output, no staging folder, and no `pwned`: no pickled call ran


# --------------------------------------------------------------------------------------------------- other inputs


def test_native_checkpoint_that_is_a_folder_or_unreadable(tmp_path):
    """`--agillm4` sources: a folder where the `.pt` should be; a chmod-000 `.pt` (checked when not root)."""
    (tmp_path / "ckpt.pt").mkdir()
    with pytest.raises(ConversionError, match="ckpt.pt not found .or not a file"):
        convert_agillm4(tmp_path / "ckpt.pt", tmp_path / "agillm")
    assert_only(tmp_path, {"ckpt.pt"})
    if not READS_UNREADABLE:
        (tmp_path / "ckpt.pt").rmdir()
        torch.save({"cfg": {}}, tmp_path / "ckpt.pt")
        _unreadable(tmp_path / "ckpt.pt")
        with pytest.raises(ConversionError, match="ckpt.pt: permission denied"):
            convert_agillm4(tmp_path / "ckpt.pt", tmp_path / "agillm")
        assert_only(tmp_path, {"ckpt.pt"})


def test_output_path_is_a_file_or_under_one(sources, tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(FileExistsError, match="taken exists and is not a folder"):
        convert_to_agillm(sources["single"], tmp_path / "taken", overwrite=True)
    with pytest.raises(NotADirectoryError, match="taken is a file"):
        convert_to_agillm(sources["single"], tmp_path / "taken" / "agillm")
    assert_only(tmp_path, {"taken"})
    assert (tmp_path / "taken").read_text() == "not a folder"


# (folder kind, damage, the file the message must name, expected message)
HOSTILE_WEIGHT_FILES = {
    "zero-byte": ("single", lambda f: (f / "model.safetensors").write_bytes(b""), "model.safetensors", "empty"),
    "truncated-data": ("single", lambda f: _truncate(f / "model.safetensors", -100), "model.safetensors",
                       "truncated or corrupt"),
    "header-not-json": ("single", lambda f: _garble_safetensors_header(f / "model.safetensors"), "model.safetensors",
                        "truncated or corrupt"),
    "shard-truncated": ("sharded", lambda f: _truncate(_shard(f), -64), SHARD, "truncated or corrupt"),
    "unreadable": ("single", lambda f: _unreadable(f / "model.safetensors"), "model.safetensors",
                   "Permission denied"),
}


@pytest.mark.parametrize(
    "kind, damage, named, message",
    [pytest.param(*case, id=name, marks=[NEEDS_PERMISSIONS] if name == "unreadable" else [])
     for name, case in HOSTILE_WEIGHT_FILES.items()],
)
def test_from_pretrained_names_the_broken_weight_file(agillm_folder, tmp_path, kind, damage, named, message):
    """transformers alone raises `SafetensorError: incomplete metadata, file not fully covered`, naming no file."""
    folder = Path(shutil.copytree(agillm_folder / kind, tmp_path / "model"))
    damage(folder)
    with pytest.raises(OSError, match=message) as raised:
        AgillmForCausalLM.from_pretrained(folder)
    assert named in str(raised.value)


def test_from_pretrained_names_the_broken_shard_through_remote_code(agillm_folder, tmp_path):
    """The check lives in the folder's own modeling_agillm.py, so `trust_remote_code` loading has it too."""
    folder = Path(shutil.copytree(agillm_folder / "sharded", tmp_path / "model"))
    _truncate(_shard(folder), 100)
    with pytest.raises(OSError, match=rf"weights file .*{SHARD}.*truncated or corrupt") as raised:
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert type(raised.value).__module__ == "builtins"  # our OSError, not safetensors' bare SafetensorError
    AutoModelForCausalLM.from_pretrained(agillm_folder / "sharded", trust_remote_code=True)  # the intact one loads


# --------------------------------------------------------------------------------------------------- the CLI


def _env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "AGILLM_DEBUG": "", **extra}


def run_cli(*args: str, script: str | None = None) -> subprocess.CompletedProcess:
    """`python -m convert ARGS` in a fresh process; with `script`, that Python code runs instead (it calls `main`)."""
    command = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "convert", *args]
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def assert_one_error_line(result: subprocess.CompletedProcess, code: int, *expected: str) -> str:
    lines = result.stderr.splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_cli_usage_error_is_one_line(tmp_path):
    assert_one_error_line(run_cli(), 2, "give SOURCE and OUTPUT_DIR", "--help")
    assert_one_error_line(run_cli("--no-such-flag", "a", "b"), 2, "unrecognized arguments: --no-such-flag")


def test_cli_truncated_shard(sources, tmp_path):
    source = Path(shutil.copytree(sources["sharded"], tmp_path / "source"))
    _truncate(_shard(source), -64)
    result = run_cli(str(source), str(tmp_path / "agillm"))
    assert_one_error_line(result, 1, "Cannot read safetensors file", SHARD, "truncated or corrupt")
    assert_only(tmp_path, {"source"})


def test_cli_native_pickle_that_runs_code(tmp_path):
    torch.save({"cfg": {}, "evil": CodeInPickle(tmp_path / "pwned")}, tmp_path / "ckpt.pt",
               _use_new_zipfile_serialization=False)  # the trainer's legacy format
    result = run_cli("--agillm4", str(tmp_path / "ckpt.pt"), str(tmp_path / "agillm"))
    assert_one_error_line(result, 1, "ckpt.pt", "never unpickled")
    assert_only(tmp_path, {"ckpt.pt"})  # no `pwned`


def test_cli_output_is_an_existing_file(sources, tmp_path):
    (tmp_path / "taken").write_text("mine")
    result = run_cli(str(sources["single"]), str(tmp_path / "taken"), "--overwrite")
    assert_one_error_line(result, 1, "taken exists and is not a folder")
    assert (tmp_path / "taken").read_text() == "mine"


# Runs the CLI with the model card writer (called inside the staging folder) replaced by `ACTION`.
CLI_WITH_HOOK = """
import os, signal, sys, time
import convert.converter
from convert.__main__ import main

def hook(staging, *args, **kwargs):
    ACTION

convert.converter.write_model_card = hook
sys.exit(main(sys.argv[1:]))
"""


def test_cli_keyboard_interrupt_is_one_line_and_leaves_nothing(sources, tmp_path):
    """SIGINT while the staging folder is being written: one line, exit 130, the staging folder removed."""
    # A terminal's Ctrl-C reaches a Python that has its default handler; a test run started in the background by a
    # non-interactive shell inherits SIGINT ignored, so the child restores the handler before interrupting itself.
    interrupt = "signal.signal(signal.SIGINT, signal.default_int_handler); os.kill(os.getpid(), signal.SIGINT)"
    script = CLI_WITH_HOOK.replace("ACTION", f"{interrupt}; time.sleep(60)")
    result = run_cli(str(sources["single"]), str(tmp_path / "agillm"), script=script)
    assert_one_error_line(result, 130, "interrupted")
    assert_only(tmp_path, set())


def test_cli_unexpected_error_is_one_line_with_a_hint(sources, tmp_path, monkeypatch, capsys):
    script = CLI_WITH_HOOK.replace("ACTION", "raise TypeError('a bug in the converter')")
    result = run_cli(str(sources["single"]), str(tmp_path / "agillm"), script=script)
    assert_one_error_line(result, 1, "unexpected TypeError: a bug in the converter", "AGILLM_DEBUG=1")
    assert_only(tmp_path, set())

    # With AGILLM_DEBUG the bug propagates (with its traceback); checked in-process, as the CLI's `main` sees it.
    def bug(*args, **kwargs):
        raise TypeError("a bug in the converter")

    monkeypatch.setattr(convert.converter, "write_model_card", bug)
    monkeypatch.setenv("AGILLM_DEBUG", "1")
    with pytest.raises(TypeError, match="a bug in the converter"):
        cli_main([str(sources["single"]), str(tmp_path / "agillm")])
    monkeypatch.setenv("AGILLM_DEBUG", "")
    assert cli_main([str(sources["single"]), str(tmp_path / "agillm")]) == 1
    assert "set AGILLM_DEBUG=1" in capsys.readouterr().err
    assert_only(tmp_path, set())


# --------------------------------------------------------------------------------------------------- staging


def _staging_name(target: str, kind: str, pid: int) -> str:
    return f".{target}.{kind}-{pid}@{_host()}-abcd1234"


def _wait_for_staging(process: subprocess.Popen, timeout: float = 240) -> Path:
    """The staging folder the hooked CLI prints once it is inside it (other libraries may print lines first)."""
    lines = queue.Queue()  # a reader thread: select() on a buffered pipe could miss a line already buffered
    def read_lines():
        for line in process.stdout:
            lines.put(line)
        lines.put("")  # end of output

    threading.Thread(target=read_lines, daemon=True).start()
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line.startswith("STAGING "):
            return Path(line.split(" ", 1)[1].strip())
        if not line:  # end of output: the process ended without reaching its staging folder
            break
    process.kill()
    raise AssertionError(f"the conversion never reached its staging folder: {process.stderr.read()[-2000:]}")


def test_staging_of_a_killed_conversion_is_cleaned_but_not_a_live_ones(sources, tmp_path):
    # A real conversion, killed with SIGKILL while it writes its staging folder: nothing can clean up after it.
    script = CLI_WITH_HOOK.replace("ACTION", "print('STAGING', staging, flush=True); time.sleep(600)")
    killed = subprocess.Popen([sys.executable, "-c", script, str(sources["single"]), str(tmp_path / "agillm")],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        staging = _wait_for_staging(killed)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    assert staging.is_dir() and staging.parent == tmp_path and f".tmp-{killed.pid}@" in staging.name
    assert (staging / "model.safetensors").is_file()  # killed mid-write: the weights were already there

    live = subprocess.Popen(["sleep", "600"])  # stands for a concurrent conversion, still running
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        (tmp_path / _staging_name("other", "tmp", live.pid)).mkdir()
        (tmp_path / _staging_name("other", "tmp", dead.pid)).mkdir()
        # A backup whose conversion died between moving the old folder aside and renaming the new one in: it is
        # the only copy of `previous`, so it is put back, not deleted.
        backup = tmp_path / _staging_name("previous", "old", dead.pid)
        backup.mkdir()
        (backup / "config.json").write_text("{}")
        (tmp_path / _staging_name("foreign", "tmp", dead.pid).replace(_host(), "another-host")).mkdir()

        convert_to_agillm(sources["single"], tmp_path / "agillm")
        assert_only(tmp_path, {
            "agillm",
            _staging_name("other", "tmp", live.pid),
            "previous",
            _staging_name("foreign", "tmp", dead.pid).replace(_host(), "another-host"),  # pids of another machine
        })
        assert (tmp_path / "previous" / "config.json").read_text() == "{}"
    finally:
        live.kill()
        live.wait()


# --------------------------------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask-022", "umask-077"])
def test_output_follows_the_umask(sources, tmp_path, umask):
    previous = os.umask(umask)
    try:
        output = convert_to_agillm(sources["single"], tmp_path / "agillm")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(output.stat().st_mode) == 0o777 & ~umask  # tempfile.mkdtemp alone would give 0o700
    files = [path for path in output.rglob("*") if path.is_file()]
    assert len(files) >= 10
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
