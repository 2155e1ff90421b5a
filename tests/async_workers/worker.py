"""One `torch.distributed.run --nproc_per_node 2` launch running several `scale_out.diloco` trainings and, for the
bench, transformers' pipeline-parallel generation, in turn.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.async_workers.worker \
        --runs runs.json --out OUT

`runs.json` is a list of `{"name", "kind": "train" | "pp_generate" | "pipeline_train" | "pipeline_speed", ...}`:

- train: `{"model": folder, "plan": TrainingPlan fields, "data": {"block_size", "train_blocks", "held_out_blocks"},
  "save": bool}`: every run starts from the same weights (the folder, loaded once as remote code); rank 0 writes
  `OUT/<name>.json` (the history) and, with `save`, the global model to `OUT/<name>/`.
- pp_generate: `{"model": folder, "prompt_tokens", "new_tokens", "repeats"}`: greedy generation timed with the
  model loaded once with `DistributedConfig(pp_size=2)` (layers split over the 2 processes) and once whole in
  rank 0 (one process), interleaved repeat by repeat; rank 0 writes `OUT/<name>.json` (seconds, tokens) and
  `OUT/<name>.pt` (the generated ids of both).
- pipeline_train: `{"model", "schedule", "microbatches", "batch", "block_size", "steps", "lr"}`: SGD through
  `scale_out.pipeline` (one stage per process, torch.distributed.pipelining); every rank writes
  `OUT/<name>_rank<r>.pt` (first-step gradients, layer range, losses on the last stage) and rank 0 the whole
  trained model, gathered from the stages, to `OUT/<name>/`.
- pipeline_speed: `{"model", "batch", "block_size", "microbatches", "steps", "repeats", "lr"}`: AdamW training
  pipelined over the 2 processes vs whole in rank 0, interleaved and timed (see `pipeline_speed_run`).
"""

import argparse
import copy
import json
import os
import time
from pathlib import Path


# Each rank gets its own remote-code module cache (set before transformers is imported): two processes loading a
# folder collectively (pipeline parallelism) would otherwise write the same module files at once.
_MODULES_CACHE = os.environ.get("HF_MODULES_CACHE", os.path.expanduser("~/.cache/huggingface/modules"))
os.environ["HF_MODULES_CACHE"] = os.path.join(_MODULES_CACHE, f"rank{os.environ['LOCAL_RANK']}")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from scale_out import diloco  # noqa: E402


def random_data(vocab_size: int, spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    block = spec["block_size"]
    return (diloco.random_blocks(vocab_size, block, spec["train_blocks"], seed=1),
            diloco.random_blocks(vocab_size, block, spec["held_out_blocks"], seed=2))


def train_run(run: dict, cache: dict, out: Path) -> None:
    """One `diloco.train` from the folder's weights (loaded once per launch, copied for every run)."""
    folder = run["model"]
    if folder not in cache:
        cache[folder] = diloco.build_model(folder, seed=0)
    model = copy.deepcopy(cache[folder])
    plan = diloco.TrainingPlan(**run["plan"])
    if run["data"] == "shakespeare":
        tokens = plan.steps * plan.batch_per_process * dist.get_world_size() * plan.block_size
        if ("shakespeare", plan.block_size, tokens) not in cache:
            cache["shakespeare", plan.block_size, tokens] = diloco.shakespeare_blocks(plan.block_size, tokens,
                                                                                      held_out_blocks=64)
        train_blocks, held_out = cache["shakespeare", plan.block_size, tokens]
    else:
        train_blocks, held_out = random_data(model.config.vocab_size, run["data"])
    save_to = out / run["name"] if run.get("save") else None
    history = diloco.train(model, plan, train_blocks, held_out, run_name=run["name"], save_to=save_to)
    if dist.get_rank() == 0:
        (out / f"{run['name']}.json").write_text(json.dumps(history))


def timed_generate(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    tokens = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start, tokens


def pp_generate_run(run: dict, out: Path) -> None:
    """Greedy generation with the layers on 2 processes (transformers' pipeline parallelism) vs in 1 process."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    staged = AutoModelForCausalLM.from_pretrained(run["model"], trust_remote_code=True, dtype=torch.float32,
                                                  distributed_config=DistributedConfig(pp_size=2)).eval()
    whole = None
    if dist.get_rank() == 0:
        whole = AutoModelForCausalLM.from_pretrained(run["model"], trust_remote_code=True,
                                                     dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(32, staged.config.vocab_size, (1, run["prompt_tokens"]), generator=generator)
    timings = {"pp_size_2": [], "one_process": []}
    tokens = {}
    for _ in range(run["repeats"] + 1):  # the first repeat warms up and is dropped
        dist.barrier()
        seconds, tokens["pp_size_2"] = timed_generate(staged, prompt, run["new_tokens"])
        timings["pp_size_2"].append(seconds)
        dist.barrier()
        if whole is not None:
            seconds, tokens["one_process"] = timed_generate(whole, prompt, run["new_tokens"])
            timings["one_process"].append(seconds)
        dist.barrier()
    if dist.get_rank() == 0:
        held = sum(parameter.numel() for parameter in staged.parameters())
        total = sum(parameter.numel() for parameter in whole.parameters())
        result = {name: seconds[1:] for name, seconds in timings.items()}
        result.update(new_tokens=run["new_tokens"], prompt_tokens=run["prompt_tokens"],
                      rank0_held_fraction=held / total, parameters=total,
                      tokens_equal=torch.equal(tokens["pp_size_2"], tokens["one_process"]))
        (out / f"{run['name']}.json").write_text(json.dumps(result))
        torch.save(tokens, out / f"{run['name']}.pt")


def pipeline_train_run(run: dict, out: Path) -> None:
    """`run["steps"]` SGD steps of `scale_out.pipeline` (one stage per process) on fixed random blocks; each rank
    writes `OUT/<name>_rank<r>.pt`: its stage's gradients of the first step (after the tied-weight sum), its layer
    range and, on the last stage, the loss of every step; then the stages' weights are gathered and saved."""
    from scale_out import pipeline

    rank, world_size = dist.get_rank(), dist.get_world_size()
    stage = pipeline.AgillmPipelineStage(diloco.build_model(run["model"], seed=0), rank, world_size)
    group = pipeline.tied_group(world_size)
    schedule = pipeline.build_schedule(stage, rank, world_size, (run["batch"], run["block_size"]),
                                       run["microbatches"], run["schedule"])
    optimizer = torch.optim.SGD(stage.parameters(), lr=run["lr"])
    input_ids = diloco.random_blocks(stage.model.config.vocab_size, run["block_size"], run["batch"], seed=4)
    losses, first_grads = [], None
    for _ in range(run["steps"]):
        losses.append(pipeline.train_step(schedule, stage, input_ids, group))
        if first_grads is None:
            first_grads = {name: parameter.grad.clone() for name, parameter in stage.model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.save({"grads": first_grads, "losses": losses, "layer_range": stage.layer_range},
               out / f"{run['name']}_rank{rank}.pt")
    pipeline.save_pipelined_model(stage, out / run["name"])
    if rank == 0:
        (out / f"{run['name']}.json").write_text(json.dumps({"stages": world_size}))


def pipeline_speed_run(run: dict, cache: dict, out: Path) -> None:
    """AdamW training of the same model pipelined over the 2 processes (`scale_out.pipeline`, 1F1B) and whole in
    rank 0, on the same Shakespeare batches, timed block by block (`steps` steps a block, the two interleaved; the
    first block warms up). Both keep training across blocks from the same start, so their losses stay comparable;
    rank 0 writes `OUT/<name>.json` (seconds per block, losses of both)."""
    from transformers import AutoModelForCausalLM

    from scale_out import pipeline

    rank, world_size = dist.get_rank(), dist.get_world_size()
    load = dict(trust_remote_code=True, dtype=torch.float32)
    stage = pipeline.AgillmPipelineStage(AutoModelForCausalLM.from_pretrained(run["model"], **load), rank,
                                         world_size)
    whole = AutoModelForCausalLM.from_pretrained(run["model"], **load).train() if rank == 0 else None
    batch_shape = (run["batch"], run["block_size"])
    group = pipeline.tied_group(world_size)
    schedule = pipeline.build_schedule(stage, rank, world_size, batch_shape, run["microbatches"], "1f1b")
    optimizers = {"pipelined": torch.optim.AdamW(stage.parameters(), lr=run["lr"], weight_decay=0.1)}
    if whole is not None:
        optimizers["whole"] = torch.optim.AdamW(whole.parameters(), lr=run["lr"], weight_decay=0.1)
    blocks = (run["repeats"] + 1) * run["steps"]
    key = ("shakespeare", run["block_size"], blocks * run["batch"] * run["block_size"])
    if key not in cache:
        cache[key] = diloco.shakespeare_blocks(run["block_size"], key[2], held_out_blocks=64)
    train_blocks = cache[key][0]
    seconds = {"pipelined": [], "whole": []}
    losses = {"pipelined": [], "whole": []}
    for repeat in range(run["repeats"] + 1):
        batches = [diloco.global_batch(train_blocks, repeat * run["steps"] + step, run["batch"])
                   for step in range(run["steps"])]
        dist.barrier()
        start = time.perf_counter()
        for input_ids in batches:
            losses["pipelined"].append(pipeline.train_step(schedule, stage, input_ids, group))
            optimizers["pipelined"].step()
            optimizers["pipelined"].zero_grad(set_to_none=True)
        seconds["pipelined"].append(time.perf_counter() - start)
        dist.barrier()
        if whole is not None:
            start = time.perf_counter()
            for input_ids in batches:
                loss = whole(input_ids=input_ids, labels=input_ids).loss
                loss.backward()
                optimizers["whole"].step()
                optimizers["whole"].zero_grad(set_to_none=True)
                losses["whole"].append(loss.item())
            seconds["whole"].append(time.perf_counter() - start)
        dist.barrier()
    gathered = [None] * world_size if rank == 0 else None
    dist.gather_object(losses["pipelined"], gathered, dst=0)
    if rank == 0:
        result = {name: values[1:] for name, values in seconds.items()}
        result.update(steps=run["steps"], batch=run["batch"], block_size=run["block_size"],
                      microbatches=run["microbatches"], whole_losses=losses["whole"],
                      pipelined_losses=gathered[-1], layer_range_rank0=stage.layer_range)
        (out / f"{run['name']}.json").write_text(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = json.loads(args.runs.read_text())
    dist.init_process_group("gloo", timeout=diloco.COLLECTIVE_TIMEOUT)
    cache: dict = {}  # loaded models and tokenized data, shared by the runs of this launch
    for run in runs:
        start = time.perf_counter()
        if run["kind"] == "train":
            train_run(run, cache, args.out)
        elif run["kind"] == "pp_generate":
            pp_generate_run(run, args.out)
        elif run["kind"] == "pipeline_train":
            pipeline_train_run(run, args.out)
        elif run["kind"] == "pipeline_speed":
            pipeline_speed_run(run, cache, args.out)
        else:
            raise ValueError(f"unknown run kind {run['kind']!r}")
        if dist.get_rank() == 0:
            print(f"[worker] {run['name']}: {time.perf_counter() - start:.1f} s", flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
