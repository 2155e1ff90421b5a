"""What the scale-out workers and their drivers (`tests/test_scale_out.py`, `bench/scale_out.py`) share.

The drivers save tiny AGILLM folders, launch `worker.py` once under `torch.distributed.run` (2 CPU processes, gloo)
for every multi-process engine, compute the single-process reference from the same folders, and compare. Workers
and reference load the folders as remote code, so every engine runs the code a Hub user would get.

This module imports nothing from the repository: `worker.py` and `reload.py` import it by file location, in
processes that must not see the repository.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


HERE = Path(__file__).resolve().parent
WORLD_SIZE = 2
BATCH, SEQ_LEN = 4, 16  # rows split evenly over the data-parallel ranks, so each rank's mean loss has equal weight
TRAIN_STEPS = 3
LEARNING_RATE = 0.5  # plain SGD: no optimizer state, so every engine runs the same update rule
GENERATE_TOKENS = 6

# Folder name -> `AgillmConfig` fields (the drivers build the models; workers only load the saved folders).
# Dense: GQA, a sliding and a full layer, tied embeddings. MoE: 4 gated experts top-2 in both layers (expert parallel
# splits them 2 per rank).
TINY_FIELDS = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "layer_types": ["sliding_attention", "full_attention"],
    "sliding_window": 8,
}
MODEL_FIELDS = {
    "dense": TINY_FIELDS,
    "moe": {**TINY_FIELDS, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
}

# Engine -> (model folder, how it is configured, whether it trains). The worker implements each one.
NATIVE = "from_pretrained(distributed_config=DistributedConfig({})), torchrun x2"
ENGINES = {
    "tensor_parallel": ("dense", NATIVE.format('tp_plan="auto"'), True),
    "expert_parallel": ("moe", NATIVE.format("tp_size=2, ep_size=2"), True),
    "pipeline_parallel": ("dense", NATIVE.format("pp_size=2"), False),  # transformers' PP runs forward only
    "fsdp2": ("dense", NATIVE.format("fsdp_size=2"), True),
    "deepspeed_zero2": ("dense", "accelerate DeepSpeedPlugin, ZeRO stage 2, CPU accelerator (gloo), torchrun x2",
                        True),
    "deepspeed_zero3": (
        "dense",
        "accelerate DeepSpeedPlugin, ZeRO stage 3 (zero.Init load), CPU accelerator (gloo), torchrun x2",
        True,
    ),
    "disk_offload": ("dense", 'from_pretrained(device_map="auto", max_memory=..., offload_folder=...), 1 process',
                     False),
}
DISTRIBUTED_ENGINES = [name for name in ENGINES if name != "disk_offload"]


def batch_ids() -> torch.Tensor:
    """The fixed `[BATCH, SEQ_LEN]` batch every engine sees (ids from 32 up: past the reserved special tokens)."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(32, TINY_FIELDS["vocab_size"], (BATCH, SEQ_LEN), generator=generator)


def rank_rows(rank: int, world_size: int = WORLD_SIZE) -> slice:
    """The rows a data-parallel rank trains on."""
    per_rank = BATCH // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def load_remote(folder, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` in fp32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32, **kwargs)


def sgd_steps(model, optimizer_step, rows: slice | None = None) -> list[float]:
    """`TRAIN_STEPS` SGD steps on the fixed batch (or its `rows`); returns the loss of each step before its update.

    `optimizer_step(loss)` runs backward and the update the engine's way (plain, accelerate, DeepSpeed).
    """
    ids = batch_ids()
    if rows is not None:
        ids = ids[rows]
    model.train()
    losses = []
    for _ in range(TRAIN_STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss)
        optimizer_step(loss)
    return losses


def single_process_reference(folders: dict[str, Path]) -> dict:
    """Logits, greedy tokens and training losses of each model folder in this (single, plain) process."""
    reference = {}
    ids = batch_ids()
    for name, folder in folders.items():
        model = load_remote(folder).eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        tokens = model.generate(ids[:1, :8], max_new_tokens=GENERATE_TOKENS, do_sample=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)

        def step(loss):
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        losses = [loss.item() for loss in sgd_steps(model, step)]
        model.eval()
        with torch.no_grad():
            trained_logits = model(input_ids=ids).logits
        reference[name] = {"logits": logits, "tokens": tokens, "losses": losses, "trained_logits": trained_logits,
                           "parameter_elements": sum(parameter.numel() for parameter in model.parameters())}
    return reference


def disk_offload(folder, offload_dir: Path) -> tuple[dict, dict]:
    """Single process, weights beyond `max_memory` on disk: `from_pretrained(device_map="auto", max_memory=...,
    offload_folder=...)` with a CPU budget of 3/4 of the checkpoint: accelerate keeps the embedding and head in
    memory and puts the decoder layers on disk, loading each one for its forward (from the checkpoint's safetensors
    when it can map them, else from copies in `offload_folder`)."""
    checkpoint_bytes = sum(file.stat().st_size for file in Path(folder).glob("*.safetensors"))
    model = load_remote(folder, device_map="auto", max_memory={"cpu": checkpoint_bytes * 3 // 4},
                        offload_folder=str(offload_dir)).eval()
    ids = batch_ids()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    tokens = model.generate(ids[:1, :8], max_new_tokens=GENERATE_TOKENS, do_sample=False)
    return {"logits": logits, "tokens": tokens}, {"device_map": dict(getattr(model, "hf_device_map", {}))}


def clean_env(modules_cache: Path) -> dict[str, str]:
    """The environment of a child process: offline, its own remote-code module cache, no PYTHON* overrides (the
    children must load AGILLM from the saved folders, never from this repository)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", HF_MODULES_CACHE=str(modules_cache))
    return env


def run_distributed_worker(folders: dict[str, Path], engines: list[str], out_dir: Path, timeout: int = 900) -> dict:
    """Run `engines` in one `torch.distributed.run --nproc_per_node 2` launch; returns the worker's results.

    Returns `{engine: {"ok": bool, "error": str | None, "seconds": float, ...}}`; tensors (logits, tokens) are in
    `out_dir / f"{engine}.pt"`, written by rank 0.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD_SIZE),
        str(HERE / "worker.py"), "--folders", json.dumps({name: str(path) for name, path in folders.items()}),
        "--engines", ",".join(engines), "--out", str(out_dir),
    ]
    completed = subprocess.run(command, cwd=out_dir, env=clean_env(out_dir / "hf_modules"), capture_output=True,
                               text=True, timeout=timeout)
    (out_dir / "worker.log").write_text(completed.stdout + completed.stderr)
    results_path = out_dir / "results.json"
    if completed.returncode != 0 or not results_path.exists():
        raise RuntimeError(f"torchrun worker failed (exit {completed.returncode}), log in {out_dir / 'worker.log'}:\n"
                           f"{completed.stderr[-6000:]}")
    return json.loads(results_path.read_text())


def reload_in_fresh_process(saved: dict[str, Path], out_dir: Path, timeout: int = 300) -> dict:
    """Load each saved folder with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` in a fresh
    interpreter that cannot see the repository; returns `{name: {"class": qualified name, "logits": tensor}}`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / "reloaded.pt"
    command = [sys.executable, "-I", str(HERE / "reload.py"),
               json.dumps({name: str(path) for name, path in saved.items()}), str(output)]
    completed = subprocess.run(command, cwd=out_dir, env=clean_env(out_dir / "hf_modules"), capture_output=True,
                               text=True, timeout=timeout)
    if completed.returncode != 0:
        raise RuntimeError(f"fresh-process reload failed:\n{completed.stderr[-6000:]}")
    return torch.load(output)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.float() - b.float()).abs().max().item()
