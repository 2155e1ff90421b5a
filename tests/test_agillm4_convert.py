"""`convert.agillm4`: native AGILLM 4.x `.pt` checkpoints into AGILLM folders.

Parity: every reference fixture (FORMAT.md: dense, dense_plain, tiekv, moe, tied, metric) is converted, run in
memory and reloaded from its folder as remote code, under eager and sdpa, and compared with the original's recorded
outputs (hidden states, residual stream, AR/SAT/NAT logits, SAT gate, MoE routing, greedy continuation). The rest
checks the two containers, the legacy layouts, tied weights, the tokenizer paths, the model card, the CLI, and that
every bad checkpoint raises `ConversionError` naming the problem while writing nothing.

Checkpoints for the other cases are built here from a fixture: loaded, edited and written back with the trainer's
own legacy `torch.save`, optionally inside the zstd/zlib wrapper.
"""

import base64
import copy
import hashlib
import io
import json
import logging
import re
import zipfile
import zlib

import pytest
import torch
import zstandard
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer
from transformers.utils import logging as hf_logging

import convert.agillm4
from bench.agillm4_parity import FIXTURE_DIR, FIXTURES, load_expected, measure_parity, tolerance, within_tolerance
from convert import ConversionError, agillm4_to_agillm, convert_agillm4, load_agillm4_checkpoint
from convert.__main__ import main as cli_main
from convert.agillm4_container import PAYLOAD_CODEC, PAYLOAD_CODEC_KEY, read_native_checkpoint
from tokenizer import TOKENIZER_DIR


# The fixtures are part of the test environment (`../shared/agillm41`); without them these tests fail, never skip.
assert FIXTURE_DIR.is_dir(), f"AGILLM 4.1 fixtures not found in {FIXTURE_DIR} (set AGILLM41_FIXTURES)"
SHIPPED_VOCAB = 8192
TEXT = "To be, or not to be, that is the question"


@pytest.fixture(autouse=True)
def quiet_progress_bars():
    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


def native(name: str) -> dict:
    """A fresh copy of a fixture's checkpoint dict, free to edit."""
    return load_agillm4_checkpoint(FIXTURE_DIR / f"{name}.pt")


def save_native(checkpoint: dict, path, codec: str = "plain"):
    """Write `checkpoint` as the trainer does: legacy torch.save, in the zstd (or `ZLIB` fallback) wrapper."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer, _use_new_zipfile_serialization=False)
    raw = buffer.getvalue()
    if codec == "plain":
        path.write_bytes(raw)
        return path
    payload = zstandard.ZstdCompressor(level=3).compress(raw) if codec == "zstd" else b"ZLIB" + zlib.compress(raw)
    wrapper = {
        PAYLOAD_CODEC_KEY: PAYLOAD_CODEC, "codec": "zstd", "zstd_level": 3, "requested_codec": "zstd3",
        "raw_nbytes": len(raw), "packed_nbytes": len(payload),
        "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
    }
    torch.save(wrapper, path, _use_new_zipfile_serialization=False)
    return path


def load_folder(folder):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def assert_nothing_written(parent, keep: set[str]) -> None:
    """No output folder and no staging (`.NAME.tmp-*`) folder left beside the inputs."""
    assert {path.name for path in parent.iterdir()} == keep


@torch.no_grad()
def ar_logits(model, input_ids):
    return model(input_ids, use_cache=False).logits


# --------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_parity_with_native_reference_outputs(fixture, tmp_path):
    expected = load_expected(fixture)
    folder = convert_agillm4(FIXTURE_DIR / f"{fixture}.pt", tmp_path / "agillm")
    models = {"memory": agillm4_to_agillm(native(fixture)), "folder": load_folder(folder)}
    assert type(models["folder"]).__module__.startswith("transformers_modules.")

    required = {"hidden_ar", "hidden_sat", "hidden_nat", "layer_states_ar", "ar_logits", "sat_logits",
                "sat_gate_logits", "nat_logits"}
    if FIXTURES[fixture] == "moe":
        required |= {f"moe_{kind}_{objective}" for kind in ("router_logits", "top1_expert")
                     for objective in ("ar", "sat", "nat")}
    if FIXTURES[fixture] == "dense":
        required |= {"greedy_generated_ids", "greedy_step_logits"}
    for source, model in models.items():
        for attn_implementation in ("eager", "sdpa"):
            diffs = measure_parity(model, expected, attn_implementation)
            measured = ", ".join(f"{name}={value:.1e}" for name, value in diffs.items())
            print(f"{fixture} [{source}/{attn_implementation}]: {measured}")
            assert required <= set(diffs)
            assert within_tolerance(diffs, fixture) == [], f"beyond {tolerance(fixture)}"


def test_the_references_catch_a_dropped_metric(monkeypatch):
    """`metric` (rank > d_k) needs U folded into the queries: without it the AR logits are far off."""
    monkeypatch.setattr(convert.agillm4, "_fold_metric_into_query", lambda query, metric, num_heads: query)
    diffs = measure_parity(agillm4_to_agillm(native("metric")), load_expected("metric"), "sdpa")
    assert diffs["ar_logits"] > 1e-2


# --------------------------------------------------------------------------------------------------- containers


def test_both_containers_give_identical_weights(tmp_path):
    wrapped = read_native_checkpoint(FIXTURE_DIR / "dense.pt")
    plain = read_native_checkpoint(FIXTURE_DIR / "dense_plain.pt")
    assert (wrapped[1].codec, wrapped[1].codec_level, plain[1].codec) == ("zstd", 3, "plain")
    zlib_path = save_native(plain[0], tmp_path / "zlib.pt", codec="zlib")
    from_zlib, container = read_native_checkpoint(zlib_path)
    assert container.codec == "zlib"

    reference = agillm4_to_agillm(plain[0]).state_dict()
    for checkpoint in (wrapped[0], from_zlib):
        state = agillm4_to_agillm(checkpoint).state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[name], reference[name]) for name in reference)


def test_tied_heads_stay_one_tensor(tmp_path):
    def assert_tied(model):
        embedding = model.model.embed_tokens.weight
        assert model.lm_head.weight is embedding
        assert model.sat_head.proj.weight is embedding
        assert model.nat_head.weight is embedding
        assert model.lm_head.bias is None and model.sat_head.proj.bias is None and model.nat_head.bias is None

    checkpoint = native("tied")
    assert checkpoint["ar"]["proj.weight"].data_ptr() == checkpoint["core"]["emb.weight"].data_ptr()  # as stored
    assert_tied(agillm4_to_agillm(checkpoint))
    folder = convert_agillm4(FIXTURE_DIR / "tied.pt", tmp_path / "agillm")
    assert_tied(load_folder(folder))

    del checkpoint["tie_weights"]  # older files: inferred from the aliased storage
    assert agillm4_to_agillm(checkpoint).config.tie_word_embeddings
    dense = native("dense")
    del dense["tie_weights"]
    assert not agillm4_to_agillm(dense).config.tie_word_embeddings


def test_legacy_layouts():
    """`_orig_mod.` prefixes and split q/k/v load as the fused layout; missing SAT/NAT biases are zero-filled."""
    expected = load_expected("dense")
    checkpoint = native("dense")
    core = checkpoint["core"]
    query, key, value = core.pop("blocks.1.mha.qkv.weight").chunk(3)
    core |= {"blocks.1.mha.q.weight": query, "blocks.1.mha.k.weight": key, "blocks.1.mha.v.weight": value}
    checkpoint["core"] = {f"_orig_mod.{name}": tensor for name, tensor in core.items()}
    del checkpoint["sat"]["proj.bias"], checkpoint["sat"]["gate.bias"], checkpoint["nat"]["proj.bias"]

    model = agillm4_to_agillm(checkpoint)
    assert (ar_logits(model, expected["input_ids"]) - expected["ar_logits"]).abs().max() <= 1e-4
    assert not model.sat_head.proj.bias.any() and not model.sat_head.gate.bias.any() and not model.nat_head.bias.any()

    without_nat = native("dense")
    del without_nat["nat"]  # --no_nat_head / --agillm3_compat checkpoints
    model = agillm4_to_agillm(without_nat)
    assert model.config.heads == ["ar", "sat"] and not hasattr(model, "nat_head")
    assert (ar_logits(model, expected["input_ids"]) - expected["ar_logits"]).abs().max() <= 1e-4


def native_moe_ffn(core: dict, layer: int, top_k: int, x: torch.Tensor) -> torch.Tensor:
    """FORMAT.md 6.7, written from the spec: top-k over raw router logits, softmax over the k, plus shared experts."""
    prefix = f"blocks.{layer}.ff."

    def mlp(name, rows):
        hidden = torch.relu(rows @ core[f"{prefix}{name}.0.weight"].T + core[f"{prefix}{name}.0.bias"])
        return hidden @ core[f"{prefix}{name}.2.weight"].T + core[f"{prefix}{name}.2.bias"]

    values, index = torch.topk(x @ core[f"{prefix}router.weight"].T, top_k, dim=-1)
    weights = values.softmax(-1)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for r in range(top_k):
            out[n] += weights[n, r] * mlp(f"experts.{index[n, r]}", x[n])
    return out + mlp("shared.0", x)


@torch.no_grad()
def test_moe_top2_follows_the_native_rule():
    """No fixture has top_k > 1: check the converted MoE layer against FORMAT.md's formula directly."""
    checkpoint = native("moe")
    checkpoint["cfg"]["moe_top_k"] = 2
    model = agillm4_to_agillm(checkpoint)
    assert (model.config.num_experts_per_tok, model.config.router_type) == (2, "softmax_topk")
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    for layer in range(2):
        expected = native_moe_ffn(checkpoint["core"], layer, 2, x)
        actual = model.model.layers[layer].mlp(x[None])[0]
        assert (actual - expected).abs().max() <= 1e-5


def test_config_comes_from_the_tensors():
    moe = agillm4_to_agillm(native("moe")).config
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (4, 1, 64)
    assert (moe.router_type, moe.shared_expert_intermediate_size) == ("top1_straight_through", 128)
    tiekv = agillm4_to_agillm(native("tiekv"))
    assert tiekv.config.tie_kv and not hasattr(tiekv.model.layers[0].self_attn, "v_proj")
    dense = agillm4_to_agillm(native("dense")).config
    assert (dense.vocab_size, dense.position_embedding_type, dense.norm_type, dense.mlp_type) == (
        512, "agillm_alibi", "layer_norm", "plain")
    assert (dense.pad_token_id, dense.eos_token_id, dense.nat_mask_token_id, dense.max_position_embeddings) == (
        0, 1, 0, 1122)


# --------------------------------------------------------------------------------------------------- bad checkpoints


class CodeInPickle:
    """Pickles as a call to `open(path, "w")`: loading it with weights_only=False would create the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _edit(name: str, edit) -> dict:
    checkpoint = native(name)
    edit(checkpoint)
    return checkpoint


def _bytes(name: str) -> bytes:
    return (FIXTURE_DIR / f"{name}.pt").read_bytes()


BAD_CHECKPOINTS = {
    # case: (writes ckpt.pt into the folder, expected message)
    "truncated-plain": (lambda p: p.write_bytes(_bytes("dense_plain")[:400_000]), "truncated or corrupt"),
    "truncated-zstd": (lambda p: p.write_bytes(_bytes("dense")[:-1000]), "truncated or corrupt"),
    "wrong-magic": (lambda p: p.write_bytes(b"GGUF\x03\x00\x00\x00" + _bytes("dense")[8:]), "Not a torch checkpoint"),
    "empty-file": (lambda p: p.write_bytes(b""), "Not a torch checkpoint"),
    "corrupt-payload": (
        lambda p: save_native(_edit("dense", lambda c: None), p, codec="zstd").write_bytes(
            p.read_bytes()[:-50_000] + bytes(50_000)
        ),
        "Cannot decompress|truncated or corrupt|decompresses to",
    ),
    "missing-cfg": (lambda p: save_native(_edit("dense", lambda c: c.pop("cfg")), p), "no `cfg`"),
    "delta": (
        lambda p: save_native({"weights": {k: native("dense")[k] for k in ("core", "ar", "sat")}, "delta": True,
                               "step": 5}, p),
        "delta",
    ),
    "emb-width": (
        lambda p: save_native(_edit("dense", lambda c: c["core"].update({"emb.weight": torch.zeros(512, 32)})), p),
        r"cfg says d=64 but core\['emb.weight'\] is \[512, 32\]",
    ),
    "qkv-rows": (
        lambda p: save_native(_edit("dense", lambda c: c["core"].update(
            {"blocks.0.mha.qkv.weight": torch.zeros(256, 64)})), p),
        r"blocks.0.mha.qkv.weight'\] has 256 rows",
    ),
    "U-shape": (
        lambda p: save_native(_edit("dense", lambda c: c["core"].update({"blocks.1.mha.U": torch.zeros(8, 16)})), p),
        r"blocks.1.mha.U'\] is \[8, 16\], expected \[16, 16\]",
    ),
    "expert-shape": (
        lambda p: save_native(_edit("moe", lambda c: c["core"].update(
            {"blocks.1.ff.experts.2.0.weight": torch.zeros(32, 64)})), p),
        r"blocks.1.ff.experts.2.0.weight'\] is \[32, 64\], expected \[64, 64\]",
    ),
    "layer-count": (lambda p: save_native(_edit("dense", lambda c: c["cfg"].update(layers=3)), p), "layers=3"),
    "moe-flag": (lambda p: save_native(_edit("dense", lambda c: c["cfg"].update(moe_ffn=True)), p), "moe_ffn=True"),
    "anchor-memory": (
        lambda p: save_native(_edit("dense", lambda c: c["core"].update({"anchor.score.weight": torch.zeros(1, 64)})),
                              p),
        r"core\['anchor.score.weight'\].*anchor memory",
    ),
    "dblock-loop": (
        lambda p: save_native(_edit("dense", lambda c: c["core"].update(
            {"dblock_loop_embed.weight": torch.zeros(4, 64)})), p),
        r"core\['dblock_loop_embed.weight'\]",
    ),
    "mlp-sat-head": (
        lambda p: save_native(_edit("dense", lambda c: c["sat"].update({"proj.0.weight": torch.zeros(64, 64)})), p),
        r"sat\['proj.0.weight'\].*MLP SAT head",
    ),
    "tied-head-differs": (
        lambda p: save_native(_edit("tied", lambda c: c["ar"].update({"proj.weight": torch.zeros(512, 64)})), p),
        r"tie_weights is True but ar\['proj.weight'\] differs",
    ),
    "untied-head-missing": (
        lambda p: save_native(_edit("dense", lambda c: c["nat"].pop("proj.weight")), p),
        r"nat\['proj.weight'\] is missing",
    ),
    "pickled-code": (
        lambda p: save_native(_edit("dense", lambda c: c.update(evil=CodeInPickle(p.parent / "pwned"))), p),
        "never unpickled",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_raises_and_writes_nothing(case, tmp_path):
    write, message = BAD_CHECKPOINTS[case]
    write(tmp_path / "ckpt.pt")
    with pytest.raises(ConversionError, match=message):
        convert_agillm4(tmp_path / "ckpt.pt", tmp_path / "agillm")
    assert_nothing_written(tmp_path, keep={"ckpt.pt"})  # also: no `pwned` file, the pickled call never ran


def test_missing_file_and_existing_output(tmp_path):
    with pytest.raises(ConversionError, match="not found"):
        convert_agillm4(tmp_path / "nope.pt", tmp_path / "agillm")
    (tmp_path / "agillm").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_agillm4(FIXTURE_DIR / "dense.pt", tmp_path / "agillm")
    assert_nothing_written(tmp_path, keep={"agillm"})


# --------------------------------------------------------------------------------------------------- tokenizer


def with_shipped_vocab(checkpoint: dict) -> dict:
    """Grow the vocabulary to the shipped tokenizer's 8192 ids (new rows random), pad/eos as that tokenizer's."""
    generator = torch.Generator().manual_seed(0)

    def grow(tensor):
        extra = 0.02 * torch.randn(SHIPPED_VOCAB - tensor.shape[0], *tensor.shape[1:], generator=generator)
        return torch.cat([tensor, extra])

    checkpoint["core"]["emb.weight"] = grow(checkpoint["core"]["emb.weight"])
    for group in ("ar", "sat", "nat"):
        for name in ("proj.weight", "proj.bias"):
            checkpoint[group][name] = grow(checkpoint[group][name])
    checkpoint["tokenizer_special"] = {"pad_token": "<|pad|>", "pad_token_id": 0, "eos_token": "<|eos|>",
                                       "eos_token_id": 2, "sep_token": None, "sep_token_id": 2,
                                       "vocab_size": SHIPPED_VOCAB}
    return checkpoint


def _shipped_files() -> dict[str, str]:
    return {path.name: path.read_text() for path in TOKENIZER_DIR.iterdir() if path.suffix in (".json", ".jinja")}


def _zip_b64(files: dict[str, str]) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(f"tokenizer/{name}", text)
    return base64.b64encode(buffer.getvalue()).decode()


TOKENIZER_PAYLOADS = {
    "bundle-text": lambda: {"tokenizer_bundle": _shipped_files()},
    "bundle-base64-zip": lambda: {"tokenizer_bundle": {"base64": _zip_b64(_shipped_files())}},
    "bundle-base64-files": lambda: {"tokenizer_bundle": {
        "base64": {name: base64.b64encode(text.encode()).decode() for name, text in _shipped_files().items()}}},
    "tokenizer-json": lambda: {"tokenizer_json": (TOKENIZER_DIR / "tokenizer.json").read_text()},
}


@pytest.mark.parametrize("payload", list(TOKENIZER_PAYLOADS))
def test_embedded_tokenizer_is_restored(payload, tmp_path):
    checkpoint = with_shipped_vocab(native("dense"))
    checkpoint.pop("tokenizer_json")
    checkpoint |= TOKENIZER_PAYLOADS[payload]()
    out = convert_agillm4(save_native(checkpoint, tmp_path / "ckpt.pt", codec="zstd"), tmp_path / "agillm")

    shipped = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    restored = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert restored(TEXT).input_ids == shipped(TEXT).input_ids
    assert (restored.pad_token_id, restored.eos_token_id, len(restored)) == (0, 2, SHIPPED_VOCAB)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    if payload.startswith("bundle"):  # the save_pretrained files include the chat template
        assert AutoProcessor.from_pretrained(out, trust_remote_code=True).chat_template
    assert re.search(r"Tokenizer (restored|rebuilt) from the checkpoint", (out / "README.md").read_text())
    ids = restored(TEXT, return_tensors="pt").input_ids
    assert torch.equal(ar_logits(load_folder(out), ids), ar_logits(agillm4_to_agillm(checkpoint), ids))


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    checkpoint = native("dense") | {"tokenizer_bundle": _shipped_files()}  # 512 embeddings, 8192 tokens
    with pytest.raises(ConversionError, match="8192 tokens but the model only 512 embeddings"):
        convert_agillm4(save_native(checkpoint, tmp_path / "ckpt.pt"), tmp_path / "agillm")
    assert_nothing_written(tmp_path, keep={"ckpt.pt"})


def test_synthetic_tokenizer_model_card_and_warning(tmp_path, caplog):
    path = FIXTURE_DIR / "dense.pt"
    with caplog.at_level(logging.WARNING, logger="convert.agillm4"):
        out = convert_agillm4(path, tmp_path / "agillm")
    assert "synthetic" in caplog.text and "No tokenizer was written" in caplog.text
    assert not (out / "tokenizer.json").exists() and (out / "processing_agillm.py").is_file()

    card = (out / "README.md").read_text()
    provenance = load_agillm4_checkpoint(path)["agillm43_provenance"]
    recorded_values = (
        hashlib.sha256(path.read_bytes()).hexdigest(), provenance["train_argv"], provenance["train_script_sha256"],
        "| step | 0 |", "| seen_tok | 0 |", "| transformers_version | `5.23.0` |", "from_scratch; source=none",
        "| agillm43_warmstart_kind | `from_scratch` |", "zstd level 3", "No tokenizer was written",
    )
    for recorded in recorded_values:
        assert recorded in card, recorded
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["do_sample"], generation["eos_token_id"], generation["pad_token_id"]) == (False, 1, 0)


# --------------------------------------------------------------------------------------------------- CLI


def test_cli(tmp_path, capsys):
    out = tmp_path / "agillm"
    assert cli_main(["--agillm4", str(FIXTURE_DIR / "moe.pt"), str(out), "--dtype", "bfloat16"]) == 0
    assert str(out) in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_folder(out).config.num_experts == 4

    assert cli_main(["--agillm4", str(FIXTURE_DIR / "moe.pt"), str(out)]) == 1  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err

    (tmp_path / "bad.pt").write_bytes(_bytes("dense_plain")[:1000])
    assert cli_main(["--agillm4", str(tmp_path / "bad.pt"), str(tmp_path / "other")]) == 1
    assert "error: Cannot read checkpoint bad.pt: truncated" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    with pytest.raises(SystemExit):
        cli_main(["--agillm4", str(tmp_path / "bad.pt"), str(tmp_path / "other"), "--tokenizer", "x"])


def test_checkpoint_dicts_are_not_modified():
    """`agillm4_to_agillm` works on copies: a caller's dict (e.g. the demo's) is left as it was."""
    checkpoint = native("dense")
    before = copy.deepcopy(checkpoint)
    agillm4_to_agillm(checkpoint)
    assert checkpoint.keys() == before.keys()
    assert all(torch.equal(checkpoint["core"][k], before["core"][k]) for k in before["core"])
