"""Scale-out engines on AGILLM: does each one run, and does it reproduce the single-process model?

Runs `tests/scale_out/suite.py` (what `tests/test_scale_out.py` asserts on): tiny AGILLM models (a dense one and a
4-expert MoE one, fp32) under tensor, expert and pipeline parallelism, FSDP2 and DeepSpeed ZeRO-2/3 in one
`torch.distributed.run --nproc_per_node 2` launch on CPU (gloo), and `device_map` disk offload in this process.
Each engine's logits and greedy tokens on a fixed batch are compared with the single-process model's; the training
engines run 3 SGD steps (data-parallel engines on half the batch per rank) and their losses are compared with
single-process SGD on the whole batch; the folders they save are reloaded as remote code in a fresh process.

Usage: `python -m bench scale_out [--output PATH]` (writes `bench/scale_out.md` + `bench/scale_out.json`, about
30 s on 2 cores).
"""

import argparse
import importlib.metadata
import os
import tempfile
from pathlib import Path

import accelerate

from tests.scale_out import common
from tests.scale_out.suite import run_suite

from .cli import BENCH_DIR, write_report
from .compare_llama import machine_info


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench scale_out", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "scale_out.md",
                        help="markdown path; the JSON goes next to it (default: bench/scale_out.md)")
    return parser.parse_args(argv)


def figure(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}e}" if value else "0"


def table_rows(engines: dict) -> list[str]:
    rows = [
        "| engine | how configured | works | max abs logits diff vs single process | loss diff (training) "
        "| saved folder reloads (max abs logits diff) | rank 0 holds |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, row in engines.items():
        if not row["ok"]:
            error = row["error"].strip().splitlines()[-1] if row["error"] else "failed"
            rows.append(f"| {name} | {row['configured']} | no: {error} | - | - | - | - |")
            continue
        works = "yes" if row.get("tokens_equal", True) else "yes, but greedy tokens differ"
        loss = figure(row.get("loss_diff")) if row["trains"] else "inference only"
        reload = figure(row["reload_logits_diff"]) if "reload_logits_diff" in row else "-"
        held = f"{row['held_fraction']:.0%} of the weights" if "held_fraction" in row else "-"
        rows.append(
            f"| {name} | {row['configured']} | {works} | {figure(row['logits_diff'])} | {loss} | {reload} | {held} |"
        )
    return rows


def machine_line(machine: dict) -> str:
    return (f"{machine['cpu']} ({machine['logical_cpus']} logical CPUs), Python {machine['python']}, torch "
            f"{machine['torch']}, transformers {machine['transformers']}, accelerate {machine['accelerate']}, "
            f"DeepSpeed {machine['deepspeed']}, {machine['date']}")


def markdown_report(result: dict, machine: dict) -> str:
    engines = result["engines"]
    lines = [
        "# Scale-out engines (`python -m bench scale_out`)",
        "",
        __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        f"Machine: {machine_line(machine)}. Whole run: {result['seconds']['total']:.0f} s, of which the 2-process "
        f"launch (all six distributed engines, start-up included) {result['seconds']['distributed_launch']:.0f} s.",
        "",
        *table_rows(engines),
        "",
        "- Logits: a `[4, 16]` batch, max abs difference over all `[4, 16, 128]` logits; every engine that generates "
        f"also produced the single-process model's {common.GENERATE_TOKENS} greedy tokens (else the row says so).",
        f"- Loss diff: max over {common.TRAIN_STEPS} SGD steps (lr {common.LEARNING_RATE}) of |engine loss - single-"
        "process loss|; data-parallel engines report the mean of the two ranks' losses (equal halves of the batch).",
        "- Saved folder: `save_pretrained` after training (every rank for the native engines; accelerate's "
        "`get_state_dict` + `save_pretrained` for DeepSpeed), loaded in a fresh interpreter with "
        "`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`; compared with the engine's own "
        "logits after training.",
        "- Rank 0 holds: parameter elements on rank 0 right after loading (DTensor shards, ZeRO-3 partitions, a "
        "pipeline stage's own layers) over the single-process model's; ZeRO-2 shards gradients and optimizer state, "
        "not weights.",
        "",
    ]
    def rounded(values):
        return ", ".join(f"{value:.6f}" for value in values)

    losses = [f"- {name}: {rounded(row['losses'])} (single process {rounded(row['reference_losses'])})"
              for name, row in engines.items() if row.get("ok") and row["trains"]]
    return "\n".join([*lines, "Losses per step:", "", *losses, ""])


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="agillm-scale-out-") as workdir:
        result = run_suite(Path(workdir))
    machine = machine_info(len(os.sched_getaffinity(0)))
    machine.update(accelerate=accelerate.__version__, deepspeed=importlib.metadata.version("deepspeed"))
    raw = {"machine": machine, **result}
    write_report(args.output, markdown_report(result, machine), raw, json_default=str)
    return raw


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
