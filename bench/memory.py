"""Peak memory of a training step on CPU, measured as the process's peak resident set size (RSS).

Neither `tracemalloc` (Python objects only) nor a CUDA-style allocator counter exists for torch's CPU tensors, so
each measurement runs in a fresh subprocess (`python -m bench.memory ...`) that holds one model and nothing else:
    0. the subprocess runs with glibc's `MALLOC_MMAP_THRESHOLD_=65536`: a fixed threshold (glibc otherwise raises it
       after each large free) makes every tensor buffer above 64 KiB its own mapping, returned to the OS when freed,
       so RSS follows the bytes actually live instead of what the heap happened to keep; repeated runs then agree
       to 0.1 MiB, where the default allocator scattered them over about 5%;
    1. build the model from its config (weights are random: memory does not depend on their values), the AdamW
       optimizer and the batch; run the garbage collector and `malloc_trim(0)`, so freed heap pages go back to the
       OS and cannot hide later allocations;
    2. reset the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`) and read the baseline `VmRSS`;
    3. run the training steps (the first one also allocates gradients and AdamW's two moment buffers);
    4. read the peak `VmHWM`. The result is `VmHWM - baseline`: what the steps added on top of the loaded model.
Linux only (reads /proc).
"""

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parent.parent
MMAP_THRESHOLD_BYTES = 64 * 1024


def read_status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status, e.g. VmRSS (current RSS) or VmHWM (peak RSS since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # "5": reset VmHWM to the current RSS (Linux >= 4.0)


def release_free_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed pages may stay resident, which only lowers the delta
        pass


def build_model(kind: str, config_path: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from configuration_agillm import AgillmConfig
    from modeling_agillm import AgillmForCausalLM

    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "agillm": (AgillmConfig, AgillmForCausalLM),
    }[kind]
    torch.manual_seed(0)
    return model_class(config_class.from_json_file(config_path)).to(torch.float32)


def measure_in_this_process(kind: str, config_path: str, batch: int, seq_len: int, steps: int) -> dict:
    model = build_model(kind, config_path).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    input_ids = torch.randint(3, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    release_free_heap()
    reset_peak_rss()
    baseline_kib = read_status_kib("VmRSS")
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak_kib = read_status_kib("VmHWM")
    return {
        "model": kind,
        "baseline_rss_mib": baseline_kib / 1024,
        "peak_rss_mib": peak_kib / 1024,
        "step_peak_mib": (peak_kib - baseline_kib) / 1024,
        "loss": loss.item(),
    }


def measure_in_subprocess(kind: str, config_path: Path, batch: int, seq_len: int, steps: int, threads: int) -> dict:
    """Run `measure_in_this_process` in a fresh interpreter and return its result."""
    command = [sys.executable, "-m", "bench.memory", "--model", kind, "--config", str(config_path)]
    command += ["--batch", str(batch), "--seq-len", str(seq_len), "--steps", str(steps), "--threads", str(threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)}
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"memory measurement of {kind} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["llama", "agillm"], required=True)
    parser.add_argument("--config", required=True, help="config.json of the model")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = measure_in_this_process(args.model, args.config, args.batch, args.seq_len, args.steps)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
