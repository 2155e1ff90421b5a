"""AGILLM under scale-out engines (issue 11): tensor, expert and pipeline parallelism, FSDP2, DeepSpeed ZeRO-2/3
and `device_map` disk offload, each against the single-process model.

The multi-process engines run in one `torch.distributed.run --nproc_per_node 2` launch on CPU over gloo
(`tests/scale_out/worker.py`), so the start-up cost is paid once; `tests/scale_out/suite.py` gathers the figures,
which `bench/scale_out.py` also tabulates. Models are tiny and fp32: every engine must reproduce the single-process
logits, greedy tokens and (where it trains) SGD losses to float rounding, and every folder an engine saved must reload
as remote code in a fresh process with the logits the engine had.
"""

import json

import pytest
import torch
import transformers
from torch.distributed.fsdp import FSDPModule

from modeling_agillm import AgillmForCausalLM, AgillmForSequenceClassification
from tests.scale_out import common
from tests.scale_out.suite import run_suite


ATOL = 1e-5  # fp32: sharded matmuls and reductions reorder sums (observed up to ~1e-6); a real error is far larger


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return run_suite(tmp_path_factory.mktemp("scale-out"))


def engine_row(suite, name):
    row = suite["engines"][name]
    assert row["ok"], f"{name} failed:\n{row['error']}"
    return row


@pytest.mark.parametrize("name", list(common.ENGINES))
def test_engine_matches_single_process(suite, name):
    row = engine_row(suite, name)
    assert row["logits_diff"] <= ATOL, f"{name}: logits differ by {row['logits_diff']:.3g}"
    assert row["tokens_equal"], f"{name}: greedy generation differs from the single-process model"


@pytest.mark.parametrize("name", [name for name, (_, _, trains) in common.ENGINES.items() if trains])
def test_engine_trains_like_single_process(suite, name):
    row = engine_row(suite, name)
    assert len(row["losses"]) == common.TRAIN_STEPS
    assert row["losses"][-1] < row["losses"][0] - 0.1, f"{name}: SGD did not lower the loss: {row['losses']}"
    assert row["loss_diff"] <= ATOL, f"{name}: losses {row['losses']} vs single process {row['reference_losses']}"
    assert row["trained_logits_diff"] <= ATOL, f"{name}: trained weights differ ({row['trained_logits_diff']:.3g})"


@pytest.mark.parametrize("name", [name for name, (_, _, trains) in common.ENGINES.items() if trains])
def test_saved_folder_reloads_as_remote_code(suite, name):
    """The folder each training engine saved loads in a fresh process, from its own code files, with its weights."""
    row = engine_row(suite, name)
    reload = row["reload"]
    module, _, class_name = reload["class"].rpartition(".")
    assert module.startswith("transformers_modules.") and module.endswith(".modeling_agillm"), reload["class"]
    assert class_name == "AgillmForCausalLM"
    assert reload["auto_map"]["AutoModelForCausalLM"] == "modeling_agillm.AgillmForCausalLM"
    assert {"modeling_agillm.py", "configuration_agillm.py"} <= set(reload["files"])
    assert not [file for file in reload["files"] if file.startswith("_fsdp")], reload["files"]
    assert row["reload_logits_diff"] <= ATOL, f"{name}: reloaded logits differ by {row['reload_logits_diff']:.3g}"


def test_engine_specifics(suite):
    """Each engine really ran the way its row says: the sharding engines left rank 0 a part of the weights (ZeRO-2
    shards gradients and optimizer state, not weights), ZeRO-3 built the model partitioned, disk offload used the
    disk."""
    for name in ("tensor_parallel", "expert_parallel", "pipeline_parallel", "fsdp2", "deepspeed_zero3"):
        assert engine_row(suite, name)["held_fraction"] < 0.75, (name, engine_row(suite, name)["held_fraction"])
    assert engine_row(suite, "deepspeed_zero2")["held_fraction"] == 1.0
    assert engine_row(suite, "deepspeed_zero3")["partitioned_at_load"]
    assert not engine_row(suite, "deepspeed_zero2")["partitioned_at_load"]
    assert {"cpu", "disk"} == set(engine_row(suite, "disk_offload")["device_map"].values())


@pytest.mark.parametrize("model_class", [AgillmForCausalLM, AgillmForSequenceClassification])
def test_save_of_a_run_time_subclass_exports_agillm_code(model_class, make_config, tmp_path):
    """What FSDP2's `fully_shard` does to the instance (its class becomes a run-time subclass defined in torch's
    `_fsdp_init`) must not leak into the saved folder: AGILLM's files and `auto_map` entry, and the weights."""
    torch.manual_seed(0)
    model = model_class(make_config(num_labels=3)).eval()
    original_class = type(model)
    # As torch builds it: `type(f"FSDP{cls.__name__}", (FSDPModule, cls), ...)` inside `_fsdp_init`'s namespace.
    model.__class__ = type(f"FSDP{original_class.__name__}", (FSDPModule, original_class),
                           {"__module__": "torch.distributed.fsdp._fully_shard._fsdp_init"})
    model.save_pretrained(tmp_path)

    auto_class = original_class._auto_class
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"][auto_class] == (
        f"modeling_agillm.{original_class.__name__}"
    )
    files = {path.name for path in tmp_path.iterdir()}
    assert {"modeling_agillm.py", "configuration_agillm.py", "generation_agillm.py"} <= files
    assert not [file for file in files if file.startswith("_fsdp")], files
    assert "_auto_class" not in vars(type(model)), "the run-time class keeps no state from the save"
    assert type(model).is_remote_code()

    again = getattr(transformers, auto_class).from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(again).__module__.startswith("transformers_modules.") and type(again).__name__ == (
        original_class.__name__
    )
    ids = common.batch_ids()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_objective_none_means_ar_in_the_trunk(make_model):
    """transformers' pipeline parallelism hands the head's bound defaults (objective=None) to the trunk."""
    model = make_model()
    ids = common.batch_ids()
    with torch.no_grad():
        default = model.model(ids).last_hidden_state
        torch.testing.assert_close(model.model(ids, objective=None).last_hidden_state, default, rtol=0, atol=0)
    with pytest.raises(ValueError, match="objective must be one of"):
        model.model(ids, objective="bidirectional")
