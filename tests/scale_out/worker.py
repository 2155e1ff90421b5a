"""One `torch.distributed.run --nproc_per_node 2` launch that runs AGILLM under several scale-out engines in turn.

    python -m torch.distributed.run --nproc_per_node 2 tests/scale_out/worker.py \
        --folders '{"dense": "...", "moe": "..."}' --engines tensor_parallel,fsdp2 --out OUT

Every engine loads the saved folders as remote code (`trust_remote_code=True`), runs the fixed batch of `common.py`
(logits, greedy generation) and, where it trains, `common.TRAIN_STEPS` SGD steps, then saves the trained model
with `save_pretrained` into `OUT/saved_<engine>`. Rank 0 writes `OUT/results.json` (one entry per engine: ok,
error, seconds, losses) and `OUT/<engine>.pt` (tensors). An engine that raises is recorded and the next one runs,
so one broken engine does not hide the others. CPU only, gloo.
"""

import argparse
import datetime
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path


# Each rank gets its own remote-code module cache: two processes writing one cache race on the same files.
_MODULES_CACHE = os.environ.get("HF_MODULES_CACHE", os.path.expanduser("~/.cache/huggingface/modules"))
os.environ["HF_MODULES_CACHE"] = os.path.join(_MODULES_CACHE, f"rank{os.environ['LOCAL_RANK']}")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed: run on CPU with gloo, never probe for CUDA

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers.distributed import DistributedConfig  # noqa: E402


def _load_common():
    """`common.py` by file location: this script must not put the repository on sys.path."""
    spec = importlib.util.spec_from_file_location("scale_out_common", Path(__file__).with_name("common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _load_common()
COLLECTIVE_TIMEOUT_S = 120


def mean_over_ranks(value: torch.Tensor) -> float:
    """Mean of a per-rank scalar (each data-parallel rank's loss covers its own, equally sized, rows)."""
    value = value.detach().float().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def sgd(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=common.LEARNING_RATE)

    def step(loss):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def evaluate(model) -> dict:
    """Logits of the full batch, in eval mode (every rank feeds the same rows)."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=common.batch_ids()).logits
    return {"logits": logits.detach().float().cpu()}


def greedy(model) -> dict:
    """Greedy tokens from the first row's first 8 ids (every rank generates in step with the others)."""
    ids = common.batch_ids()[:1, :8]
    tokens = model.generate(ids, max_new_tokens=common.GENERATE_TOKENS, do_sample=False)
    return {"tokens": tokens.cpu()}


def held_parameter_elements(model) -> int:
    """Parameter elements this rank holds: a DTensor's local shard, a ZeRO-3 partition, else the whole tensor (a
    pipeline stage holds only its own layers), to show that the engine really split the model."""
    from torch.distributed.tensor import DTensor

    total = 0
    for parameter in model.parameters():
        if hasattr(parameter, "ds_tensor"):
            total += parameter.ds_tensor.numel()
        elif isinstance(parameter, DTensor):
            total += parameter.to_local().numel()
        else:
            total += parameter.numel()
    return total


def reshard_fsdp(model) -> None:
    """Reshard FSDP2 units after forwards without backward (a no-op for other engines).

    transformers plans the final norm and the tied embedding/head `keep_full_weight` (`reshard_after_forward=False`);
    after an inference forward they stay unsharded, and training from there diverged from single-process training
    after the first step (a plain transformers Llama does the same). torch's FSDP2 asks for `reshard()` then.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def native(folder, out, name, distributed_config, train: bool, data_parallel: bool) -> tuple[dict, dict]:
    """An engine of transformers' `DistributedConfig` (TP, EP, PP, FSDP2): load, evaluate, generate, train, save."""
    model = common.load_remote(folder, distributed_config=distributed_config)
    scalars = {"held_parameter_elements": held_parameter_elements(model)}  # before a forward unshards anything
    tensors = {**evaluate(model), **greedy(model)}
    if train:
        reshard_fsdp(model)
        rows = common.rank_rows(dist.get_rank()) if data_parallel else None
        losses = common.sgd_steps(model, sgd(model), rows)
        scalars["losses"] = [mean_over_ranks(loss) if data_parallel else loss.item() for loss in losses]
        tensors["trained_logits"] = evaluate(model)["logits"]
        saved = out / f"saved_{name}"
        model.save_pretrained(saved)  # every rank: the weights are gathered collectively, rank 0 writes
        scalars["saved"] = str(saved)
    return tensors, scalars


def deepspeed_engine(folder, out, name, stage: int) -> tuple[dict, dict]:
    """ZeRO stage 2 or 3 through accelerate's DeepSpeed plugin (what `accelerate launch` + a DeepSpeed config
    sets up), on DeepSpeed's CPU accelerator; the optimizer is the same plain SGD as everywhere else."""
    import deepspeed.ops
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (about 2 minutes on 2 cores) that only its
    # inference kernels call (`inference_all_reduce`); ZeRO's collectives are torch.distributed's over gloo either way.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    AcceleratorState._reset_state(True)  # an earlier engine of this launch may have set up accelerate's state
    ds_config = {
        "train_micro_batch_size_per_gpu": common.BATCH // common.WORLD_SIZE,
        "gradient_accumulation_steps": 1,
        # ZeRO-3: `get_state_dict` gathers the partitioned weights for `save_pretrained` only with this set (the
        # "16bit" in its name is DeepSpeed's; the weights keep their dtype, fp32 here)
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
        "zero_allow_untested_optimizer": True,  # a client torch optimizer, not DeepSpeed's own
        "gradient_clipping": 0.0,
    }
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config))
    model = common.load_remote(folder)  # with ZeRO-3 active, from_pretrained builds it under deepspeed.zero.Init
    # ZeRO-3 partitions the weights as they are built (DeepSpeed tags each with a `ds_id`); ZeRO-2 does not
    partitioned_at_load = all(hasattr(parameter, "ds_id") for parameter in model.parameters())
    held = held_parameter_elements(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=common.LEARNING_RATE)
    engine, optimizer = accelerator.prepare(model, optimizer)
    # ZeRO-3 gathers each layer's weights in its forward hooks: both ranks generate in step (same greedy lengths)
    tensors = {**evaluate(engine), **greedy(accelerator.unwrap_model(engine))}

    def step(loss):
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    losses = common.sgd_steps(engine, step, common.rank_rows(dist.get_rank()))
    scalars = {"losses": [mean_over_ranks(loss) for loss in losses], "partitioned_at_load": partitioned_at_load,
               "held_parameter_elements": held}
    tensors["trained_logits"] = evaluate(engine)["logits"]
    saved = out / f"saved_{name}"
    state_dict = accelerator.get_state_dict(engine)  # ZeRO-3: gathers the partitioned weights (collective)
    accelerator.unwrap_model(engine).save_pretrained(
        saved, state_dict=state_dict, is_main_process=accelerator.is_main_process
    )
    scalars["saved"] = str(saved)
    accelerator.wait_for_everyone()
    return tensors, scalars


def run_engine(name: str, folders: dict[str, Path], out: Path) -> tuple[dict, dict]:
    folder = folders[common.ENGINES[name][0]]
    if name == "tensor_parallel":
        return native(folder, out, name, DistributedConfig(tp_plan="auto"), train=True, data_parallel=False)
    if name == "expert_parallel":
        # experts split 2 per rank by expert parallelism, the dense modules by tensor parallelism
        return native(folder, out, name, DistributedConfig(tp_size=2, ep_size=2), train=True, data_parallel=False)
    if name == "pipeline_parallel":  # transformers' pipeline schedule runs forward only: inference, no training
        return native(folder, out, name, DistributedConfig(pp_size=2), train=False, data_parallel=False)
    if name == "fsdp2":
        return native(folder, out, name, DistributedConfig(fsdp_size=2), train=True, data_parallel=True)
    if name == "deepspeed_zero2":
        return deepspeed_engine(folder, out, name, stage=2)
    if name == "deepspeed_zero3":
        return deepspeed_engine(folder, out, name, stage=3)
    raise ValueError(f"unknown engine {name!r}; known: {common.DISTRIBUTED_ENGINES}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folders", required=True, help="JSON {model name: saved folder}")
    parser.add_argument("--engines", required=True, help=f"comma-separated, from {common.DISTRIBUTED_ENGINES}")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    folders = {name: Path(path) for name, path in json.loads(args.folders).items()}
    engines = args.engines.split(",")
    for name in engines:
        if name not in common.DISTRIBUTED_ENGINES:
            parser.error(f"unknown engine {name!r}; known: {common.DISTRIBUTED_ENGINES}")

    # A rank whose engine raised skips that engine's remaining collectives; the timeout turns the other rank's wait
    # into an error (recorded like any other) instead of a hang.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    torch.manual_seed(0)
    results = {}
    for name in engines:
        start = time.perf_counter()
        try:
            tensors, scalars = run_engine(name, folders, args.out)
            results[name] = {"ok": True, "error": None, **scalars}
            if dist.get_rank() == 0:
                torch.save(tensors, args.out / f"{name}.pt")
        except Exception:  # recorded for the table and the test's failure message; the next engine still runs
            results[name] = {"ok": False, "error": traceback.format_exc()[-3000:]}
            print(f"[rank {dist.get_rank()}] {name} failed:\n{results[name]['error']}", file=sys.stderr)
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
        if dist.get_rank() == 0:  # after every engine: if a later one takes the launch down, these results remain
            (args.out / "results.json").write_text(json.dumps(results, indent=2))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
