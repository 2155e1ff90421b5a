"""Async side workers (`scale_out/diloco.py`): DiLoCo and Streaming DiLoCo on torchft with AGILLM's layer groups as
fragments, in one `torch.distributed.run --nproc_per_node 2` launch on CPU (gloo, torchft's lighthouse in rank 0).

- DiLoCo with H=1, plain SGD inside and outer SGD lr 1 without momentum is synchronous averaging: each step the
  outer update moves the global weights by the mean of the replicas' local updates, which is one SGD step on the
  mean gradient. It must train exactly like torch DDP and like one process on the whole batch.
- Streaming DiLoCo with 2 layer groups and H=4 syncs group 0 at steps 2, 6 and group 1 at steps 4, 8: right after
  its sync a group is bitwise equal on both replicas, at every other step both groups differ (different data).
- The global model a worker saves loads as remote code in a fresh interpreter.
- Staged training (`scale_out/pipeline.py`, torch.distributed.pipelining, one layer range per process): GPipe and
  1F1B give the single-process gradients (the tied embedding / head's two shares summed) and SGD losses.
"""

import pytest
import torch
from safetensors.torch import load_file

from configuration_agillm import AgillmConfig
from modeling_agillm import AgillmForCausalLM
from scale_out import diloco, pipeline
from tests.async_workers.launch import run_worker
from tests.scale_out import common


pytest.importorskip("torchft", reason="torchft (requirements.txt) provides DiLoCo and the lighthouse")

ATOL = 1e-6  # fp32; DiLoCo's pseudo-gradient (global - local) then outer step rounds differently from SGD
BLOCK, ROWS_PER_PROCESS, SGD_LR = 16, 2, 0.5
DATA = {"block_size": BLOCK, "train_blocks": 32, "held_out_blocks": 4}
EXACT = {"steps": 3, "batch_per_process": ROWS_PER_PROCESS, "block_size": BLOCK, "inner_optimizer": "sgd",
         "inner_lr": SGD_LR, "eval_every": 3}
STREAMING = {"mode": "diloco", "steps": 8, "batch_per_process": ROWS_PER_PROCESS, "block_size": BLOCK,
             "inner_lr": 1e-2, "sync_every": 4, "fragments": 2, "eval_every": 4, "track_agreement": True}

PIPELINE = {"batch": 4, "block_size": BLOCK, "steps": 2, "lr": SGD_LR}
PIPELINE_SCHEDULES = [("gpipe", 2), ("1f1b", 4)]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    root = tmp_path_factory.mktemp("async-workers")
    torch.manual_seed(0)
    AgillmForCausalLM(AgillmConfig(**common.TINY_FIELDS)).save_pretrained(root / "tiny")
    folder = str(root / "tiny")
    runs = [
        {"name": "diloco_h1", "kind": "train", "model": folder, "data": DATA, "save": True,
         "plan": {**EXACT, "mode": "diloco", "sync_every": 1, "fragments": 1, "outer_lr": 1.0, "outer_momentum": 0}},
        {"name": "ddp", "kind": "train", "model": folder, "data": DATA, "save": True,
         "plan": {**EXACT, "mode": "sync"}},
        {"name": "streaming", "kind": "train", "model": folder, "data": DATA, "save": True, "plan": STREAMING},
        *[{"name": f"pipeline_{schedule}", "kind": "pipeline_train", "model": folder, "schedule": schedule,
           "microbatches": microbatches, **PIPELINE} for schedule, microbatches in PIPELINE_SCHEDULES],
    ]
    return root, run_worker(runs, root / "out", timeout=600)


def saved_weights(root, name):
    return load_file(root / "out" / name / "model.safetensors")


def single_process_sgd(folder) -> dict:
    """`EXACT`'s 3 SGD steps in this process, each on the whole global batch both replicas split."""
    model = AgillmForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR)
    train_blocks = diloco.random_blocks(model.config.vocab_size, BLOCK, DATA["train_blocks"], seed=1)
    for step in range(EXACT["steps"]):
        rows = diloco.global_batch(train_blocks, step, ROWS_PER_PROCESS * 2)
        model(input_ids=rows, labels=rows).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict()


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


def test_diloco_h1_outer_lr1_is_synchronous_averaging(launched):
    root, results = launched
    h1, ddp = results["diloco_h1"], results["ddp"]
    assert h1["outer_syncs"] == EXACT["steps"] and h1["sync_steps"] == [1, 2, 3]
    # rank 0's loss at each step (before its update) is the same: both runs hold the same weights every step
    torch.testing.assert_close(torch.tensor(h1["train_loss"]), torch.tensor(ddp["train_loss"]), rtol=0, atol=ATOL)
    assert max_weight_diff(saved_weights(root, "diloco_h1"), saved_weights(root, "ddp")) <= ATOL
    reference = single_process_sgd(root / "tiny")
    assert set(reference) - set(saved_weights(root, "ddp")) == {"lm_head.weight"}  # tied: saved as the embedding
    reference = {key: value for key, value in reference.items() if key in saved_weights(root, "ddp")}
    assert max_weight_diff(saved_weights(root, "ddp"), reference) <= ATOL
    assert max_weight_diff(saved_weights(root, "diloco_h1"), reference) <= ATOL
    assert h1["held_out_loss"][-1] != h1["held_out_loss"][0], "the global model did not move"


def test_streaming_fragments_sync_on_their_schedule(launched):
    _, results = launched
    run = results["streaming"]
    steps, per_group = STREAMING["steps"], STREAMING["sync_every"] // STREAMING["fragments"]
    # step s (1-based) syncs group (s / per_group - 1) % 2 when s is a multiple of per_group
    expected = [[step % per_group == 0 and (step // per_group - 1) % 2 == group for group in range(2)]
                for step in range(1, steps + 1)]
    assert run["agreement"] == expected
    assert run["sync_steps"] == [2, 4, 6, 8] and run["outer_syncs"] == 4
    # every sync all-reduces one layer group's fp32 pseudo-gradients: groups 0, 1, 0, 1
    group_bytes = [4 * elements for elements in run["fragment_elements"]]
    assert run["allreduce_bytes"] == 2 * sum(group_bytes)
    assert all(elements > 0 for elements in run["fragment_elements"])


def test_saved_global_model_reloads_as_remote_code(launched, tmp_path):
    root, _ = launched
    folder = root / "out" / "streaming"
    reloaded = common.reload_in_fresh_process({"streaming": folder}, tmp_path)["streaming"]
    module, _, class_name = reloaded["class"].rpartition(".")
    assert module.startswith("transformers_modules.") and class_name == "AgillmForCausalLM"
    assert {"modeling_agillm.py", "configuration_agillm.py", "model.safetensors"} <= set(reloaded["files"])
    model = AgillmForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(input_ids=common.batch_ids()).logits
    torch.testing.assert_close(reloaded["logits"], expected, rtol=0, atol=0)


def test_layer_group_fragments():
    """Decoder layers in contiguous groups; the embedding (and the tied head, the same tensor) in the first, the
    final norm and an untied head in the last; every parameter in exactly one group."""
    for tied in (True, False):
        fields = {**common.TINY_FIELDS, "num_hidden_layers": 4, "tie_word_embeddings": tied,
                  "layer_types": ["full_attention"] * 4}
        model = AgillmForCausalLM(AgillmConfig(**fields))
        groups = diloco.layer_group_fragments(model, 2)
        owner = {id(parameter): index for index, group in enumerate(groups) for parameter in group}
        assert sum(len(group) for group in groups) == len(owner) == len(list(model.parameters()))
        assert owner[id(model.model.embed_tokens.weight)] == 0
        assert owner[id(model.lm_head.weight)] == (0 if tied else 1)
        assert owner[id(model.model.norm.weight)] == 1
        for layer_index, layer in enumerate(model.model.layers):
            assert {owner[id(parameter)] for parameter in layer.parameters()} == {layer_index // 2}
    with pytest.raises(ValueError, match="fragments must be between 1 and the 4 decoder layers"):
        diloco.layer_group_fragments(model, 5)


@pytest.mark.parametrize("fields, message", [
    ({"sync_every": 3, "fragments": 2}, "must be a multiple of fragments"),
    ({"mode": "async"}, "mode must be"),
    ({"inner_optimizer": "adam"}, "inner_optimizer must be"),
    ({"steps": 0}, "must be positive"),
])
def test_training_plan_rejects(fields, message):
    with pytest.raises(ValueError, match=message):
        diloco.TrainingPlan(**fields).check()


def single_process_pipeline_reference(folder) -> tuple[dict, list[float], dict]:
    """First-step gradients, per-step losses and final weights of `PIPELINE`'s SGD steps on the whole batch in
    this process."""
    model = AgillmForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=SGD_LR)
    input_ids = diloco.random_blocks(model.config.vocab_size, BLOCK, PIPELINE["batch"], seed=4)
    losses, grads = [], None
    for _ in range(PIPELINE["steps"]):
        output = model(input_ids=input_ids, labels=input_ids)
        # the pipeline's loss is AGILLM's own causal-LM loss
        torch.testing.assert_close(pipeline.next_token_loss(output.logits, input_ids), output.loss)
        output.loss.backward()
        losses.append(output.loss.item())
        if grads is None:
            grads = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
    return grads, losses, model.state_dict()


@pytest.mark.parametrize("schedule", [schedule for schedule, _ in PIPELINE_SCHEDULES])
def test_pipelined_training_matches_single_process(launched, schedule):
    root, results = launched
    first, last = results[f"pipeline_{schedule}"]["ranks"]
    assert first["layer_range"] == (0, 1) and last["layer_range"] == (1, 2)
    grads, losses, weights = single_process_pipeline_reference(root / "tiny")
    # the tied embedding / head: `model.embed_tokens.weight` on the first stage, `lm_head.weight` on the last
    tied = "model.embed_tokens.weight"
    assert tied in first["grads"] and "lm_head.weight" in last["grads"] and tied not in last["grads"]
    torch.testing.assert_close(first["grads"][tied], last["grads"]["lm_head.weight"], rtol=0, atol=0)
    staged = {**last["grads"], **first["grads"]}
    staged.pop("lm_head.weight")
    assert staged.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(staged[name], grad, rtol=0, atol=ATOL,
                                   msg=lambda text, name=name: f"{name}: {text}")
    assert first["losses"] == [None] * PIPELINE["steps"]
    torch.testing.assert_close(torch.tensor(last["losses"]), torch.tensor(losses), rtol=0, atol=ATOL)
    assert losses[1] < losses[0]
    # the stages' weights, gathered and saved by rank 0, are the single-process model's after the same steps
    saved = saved_weights(root, f"pipeline_{schedule}")
    assert set(weights) - set(saved) == {"lm_head.weight"}  # tied: saved once, as the embedding
    assert max_weight_diff(saved, {key: value for key, value in weights.items() if key in saved}) <= ATOL


def test_pipeline_stage_rejects_bad_splits(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="num_stages must be between 2 and the 2 decoder layers"):
        pipeline.AgillmPipelineStage(model, 0, 3)
    with pytest.raises(ValueError, match="stage_index must be in"):
        pipeline.AgillmPipelineStage(model, 2, 2)
    stage = pipeline.AgillmPipelineStage(model, 0, 2)
    with pytest.raises(ValueError, match="do not split into 2 equal micro-batches"):
        pipeline.build_schedule(stage, 0, 2, (3, BLOCK), 2)
    with pytest.raises(ValueError, match="schedule must be one of"):
        pipeline.build_schedule(stage, 0, 2, (4, BLOCK), 2, schedule="zero-bubble")
