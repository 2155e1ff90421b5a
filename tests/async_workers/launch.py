"""Launch `worker.py` under `torch.distributed.run --nproc_per_node 2` (CPU, gloo) and collect what it wrote."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.scale_out.common import clean_env


REPO = Path(__file__).resolve().parents[2]
WORLD_SIZE = 2


def run_worker(runs: list[dict], out_dir: Path, timeout: int = 900) -> dict:
    """Run `runs` (see `worker.py`) in one 2-process launch; returns `{name: result}` (a training history, or the
    pp_generate timings with `"tokens"` added) and keeps the launch's output in `out_dir / "worker.log"`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_file = out_dir / "runs.json"
    runs_file.write_text(json.dumps(runs, indent=2))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD_SIZE),
               "-m", "tests.async_workers.worker", "--runs", str(runs_file), "--out", str(out_dir)]
    completed = subprocess.run(command, cwd=REPO, env=clean_env(out_dir / "hf_modules"), capture_output=True,
                               text=True, timeout=timeout)
    (out_dir / "worker.log").write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0:
        errors = [line for line in completed.stderr.splitlines() if "torchft::" not in line]
        raise RuntimeError(f"torchrun worker failed (exit {completed.returncode}), log in {out_dir / 'worker.log'}:\n"
                           + "\n".join(errors[-80:]))
    results = {}
    for run in runs:
        results[run["name"]] = json.loads((out_dir / f"{run['name']}.json").read_text())
        if run["kind"] == "pp_generate":
            results[run["name"]]["tokens"] = torch.load(out_dir / f"{run['name']}.pt")
        if run["kind"] == "pipeline_train":
            results[run["name"]]["ranks"] = [torch.load(out_dir / f"{run['name']}_rank{rank}.pt")
                                             for rank in range(WORLD_SIZE)]
    return results
