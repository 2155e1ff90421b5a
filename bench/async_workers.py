"""Async side workers and staged inference / training across processes: DiLoCo / Streaming DiLoCo (torchft) vs
synchronous data parallelism (torch DDP) at equal compute; pipeline-parallel generation and training vs one process.

Training: a tiny AGILLM (`scale_out.diloco.TINY_FIELDS`, saved once and loaded by every run as remote code) on the
shipped Shakespeare corpus, 2 processes (`torch.distributed.run --nproc_per_node 2`, CPU, gloo), each running the
same number of inner AdamW steps on the same rows of the same global batches (same seed, same data order):
synchronous DDP all-reduces gradients every step; DiLoCo all-reduces pseudo-gradients every H steps and applies
them with an outer Nesterov SGD (lr 0.7, momentum 0.9, as in the DiLoCo paper); Streaming DiLoCo syncs AGILLM's 2
layer groups (fragments) at alternating times, H/2 steps apart. Held-out loss of the global model at equal steps,
training wall-clock (timed steps only, medians over repeats interleaved run by run), and what each process handed
to all-reduce.

Staged inference: greedy generation with `from_pretrained(..., distributed_config=DistributedConfig(pp_size=2))` (each
process holds half the decoder layers; hidden states pass between the processes every token) against the same
folder in one process, interleaved repeat by repeat in the same launch. Staged training: the same model split
into 2 pipeline stages by `scale_out/pipeline.py` (torch.distributed.pipelining, 1F1B) vs the whole model training
in one process.

Usage: `python -m bench async_workers [--quick] [--repeats N] [--output PATH]` (writes `bench/async_workers.md` +
`.json`; about 4 minutes on 2 cores, `--quick` about 1).
"""

import importlib.metadata
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from configuration_agillm import AgillmConfig
from modeling_agillm import AgillmForCausalLM
from scale_out import diloco
from tests.async_workers.launch import run_worker

from .cli import add_repeats_option, bench_parser, parse_bench_args, write_report
from .compare_llama import machine_info


TRAINING = {"steps": 128, "batch_per_process": 8, "block_size": 64, "inner_lr": 3e-3, "eval_every": 32}
# name -> (label, plan fields on top of TRAINING)
SETUPS = {
    "ddp": ("synchronous DDP (all-reduce gradients every step)", {"mode": "sync"}),
    "diloco_h8": ("DiLoCo, H=8", {"mode": "diloco", "sync_every": 8}),
    "diloco_h32": ("DiLoCo, H=32", {"mode": "diloco", "sync_every": 32}),
    "streaming_h8": ("Streaming DiLoCo, H=8, 2 layer groups", {"mode": "diloco", "sync_every": 8, "fragments": 2}),
}
# A larger model than the training one for generation, so per-token work is not all overhead.
GENERATE_FIELDS = {**diloco.TINY_FIELDS, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 8,
                   "num_attention_heads": 8, "num_key_value_heads": 4}
GENERATE = {"prompt_tokens": 32, "new_tokens": 32}
# Staged training of the generation model: 2 pipeline stages (1F1B) vs the whole model in one process.
PIPELINE = {"batch": 8, "block_size": 64, "microbatches": 4, "steps": 8, "lr": 1e-3}


def parse_args(argv=None):
    parser = bench_parser("async_workers", __doc__.splitlines()[0],
                          "32 training steps, 1 repeat: checks the pipeline, not the figures")
    add_repeats_option(parser, "training repeats per setup and generation repeats (default 3 and 5)")
    return parse_bench_args(parser, "async_workers", argv)


def save_models(root: Path) -> dict[str, str]:
    folders = {}
    for name, fields in (("train", diloco.TINY_FIELDS), ("generate", GENERATE_FIELDS)):
        torch.manual_seed(0)
        AgillmForCausalLM(AgillmConfig(**fields)).save_pretrained(root / name)
        folders[name] = str(root / name)
    return folders


def plan_runs(folders: dict, steps: int, repeats: int, generate_repeats: int) -> list[dict]:
    """Training runs interleaved setup by setup within each repeat, then the generation timing."""
    runs = []
    for repeat in range(repeats):
        for name, (_, fields) in SETUPS.items():
            plan = {**TRAINING, **fields, "steps": steps, "eval_every": min(TRAINING["eval_every"], steps)}
            runs.append({"name": f"{name}_{repeat}", "kind": "train", "model": folders["train"],
                         "data": "shakespeare", "plan": plan})
    runs.append({"name": "pp_generate", "kind": "pp_generate", "model": folders["generate"], **GENERATE,
                 "repeats": generate_repeats})
    runs.append({"name": "pipeline_speed", "kind": "pipeline_speed", "model": folders["generate"], **PIPELINE,
                 "repeats": generate_repeats})
    return runs


def summarize(results: dict, repeats: int) -> dict:
    """Per setup: held-out losses (deterministic: repeat 0's, checked equal across repeats), median seconds."""
    setups = {}
    for name, (label, _) in SETUPS.items():
        histories = [results[f"{name}_{repeat}"] for repeat in range(repeats)]
        first = histories[0]
        setups[name] = {
            "label": label,
            "eval_steps": first["eval_steps"],
            "held_out_loss": first["held_out_loss"],
            "losses_equal_across_repeats": all(h["held_out_loss"] == first["held_out_loss"] for h in histories),
            "train_seconds": [h["train_seconds"] for h in histories],
            "median_train_seconds": statistics.median(h["train_seconds"] for h in histories),
            "sync_rounds": len(first["sync_steps"]),
            "allreduce_calls": first["allreduce_calls"],
            "allreduce_bytes": first["allreduce_bytes"],
            "fragment_elements": first["fragment_elements"],
        }
    generate = results["pp_generate"]
    tokens = generate.pop("tokens")
    generate["tokens_equal"] = torch.equal(tokens["pp_size_2"], tokens["one_process"])
    for name in ("pp_size_2", "one_process"):
        generate[f"median_{name}_tokens_per_s"] = generate["new_tokens"] / statistics.median(generate[name])
    staged = results["pipeline_speed"]
    tokens_per_block = staged["steps"] * staged["batch"] * staged["block_size"]
    for name in ("pipelined", "whole"):
        staged[f"median_{name}_tokens_per_s"] = tokens_per_block / statistics.median(staged[name])
    staged["max_loss_diff"] = max(abs(a - b) for a, b in zip(staged["pipelined_losses"], staged["whole_losses"],
                                                               strict=True))
    return {"training": setups, "generate": generate, "staged_training": staged}


def training_table(setups: dict, steps: int) -> list[str]:
    eval_steps = setups["ddp"]["eval_steps"]
    reference = setups["ddp"]
    rows = [
        "| setup | " + " | ".join(f"held-out loss @ {step}" for step in eval_steps)
        + " | training s (median) | speed vs DDP | sync rounds | all-reduce calls | MiB all-reduced / process "
        "| bytes vs DDP |",
        "|---|" + "---:|" * len(eval_steps) + "---:|---:|---:|---:|---:|---:|",
    ]
    for row in setups.values():
        losses = " | ".join(f"{loss:.3f}" for loss in row["held_out_loss"])
        speed = reference["median_train_seconds"] / row["median_train_seconds"]
        data = row["allreduce_bytes"] / reference["allreduce_bytes"]
        rows.append(f"| {row['label']} | {losses} | {row['median_train_seconds']:.1f} | {speed:.2f}x | "
                    f"{row['sync_rounds']} | {row['allreduce_calls']} | {row['allreduce_bytes'] / 2**20:.1f} | "
                    f"{data:.3f}x |")
    return rows


def generate_table(generate: dict) -> list[str]:
    pp, one = generate["median_pp_size_2_tokens_per_s"], generate["median_one_process_tokens_per_s"]
    return [
        "| generation | processes | rank 0 holds | tokens/s (median) | vs one process | greedy tokens equal |",
        "|---|---:|---:|---:|---:|---|",
        f"| `DistributedConfig(pp_size=2)` | 2 | {generate['rank0_held_fraction']:.0%} of the weights | {pp:.1f} | "
        f"{pp / one:.2f}x | {'yes' if generate['tokens_equal'] else 'NO'} |",
        f"| plain `from_pretrained` | 1 | 100% | {one:.1f} | 1.00x | - |",
    ]


def staged_training_table(staged: dict) -> list[str]:
    pipelined, whole = staged["median_pipelined_tokens_per_s"], staged["median_whole_tokens_per_s"]
    return [
        "| training | processes | training tokens/s (median) | vs one process | max abs loss diff vs one process |",
        "|---|---:|---:|---:|---:|",
        f"| `scale_out.pipeline`: 2 stages, torch.distributed.pipelining 1F1B, {staged['microbatches']} micro-batches "
        f"| 2 | {pipelined:,.0f} | {pipelined / whole:.2f}x | {staged['max_loss_diff']:.2e} |",
        f"| the whole model, plain training step | 1 | {whole:,.0f} | 1.00x | - |",
    ]


def markdown_report(summary: dict, machine: dict, steps: int, repeats: int, seconds: float) -> str:
    setups, generate = summary["training"], summary["generate"]
    fragments = setups["streaming_h8"]["fragment_elements"]
    total = sum(setups["ddp"]["fragment_elements"])
    return "\n".join([
        "# Async side workers (DiLoCo on torchft) and staged inference / training (`python -m bench async_workers`)",
        "",
        __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        f"Machine: {machine['cpu']} ({machine['logical_cpus']} logical CPUs, shared with other jobs), Python "
        f"{machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, torchft "
        f"{machine['torchft']}, {machine['date']}. Whole launch: {seconds:.0f} s.",
        "",
        f"## Training: {steps} inner steps per process, 2 processes, {repeats} repeat(s) interleaved",
        "",
        *training_table(setups, steps),
        "",
        f"- Model: AGILLM {diloco.TINY_FIELDS['num_hidden_layers']} layers, hidden {diloco.TINY_FIELDS['hidden_size']}"
        f", vocab {diloco.TINY_FIELDS['vocab_size']} ({total:,} parameters; the embedding, tied with the head, is "
        f"{diloco.TINY_FIELDS['vocab_size'] * diloco.TINY_FIELDS['hidden_size']:,} of them). Streaming DiLoCo's "
        f"layer groups: embedding + layers 0-1 ({fragments[0]:,}) and layers 2-3 + final norm ({fragments[1]:,}).",
        f"- Equal compute: every process runs {steps} steps of {TRAINING['batch_per_process']} x "
        f"{TRAINING['block_size']} tokens with AdamW (lr {TRAINING['inner_lr']:g}, weight decay 0.1, betas 0.9/0.95);"
        " the processes train on the two halves of the same global batches in the same order in every setup.",
        "- Held-out loss: mean next-token loss on 64 evenly spaced 64-token blocks of the held-out plays (Hamlet, "
        "The Tempest), of the global model (DiLoCo: every fragment's outer weights as of its last sync), at equal "
        "inner steps. Deterministic: "
        + ("equal across repeats." if all(s["losses_equal_across_repeats"] for s in setups.values())
           else "NOT equal across repeats (see the JSON)."),
        "- Training s: the timed steps only (forward, backward, optimizer step and any sync it triggers; held-out "
        "evaluation excluded), on rank 0 (the processes wait for each other at every sync); speed vs DDP = DDP "
        "seconds / setup seconds.",
        "- All-reduce: payload each process hands to all-reduce (tensor bytes, fp32; with 2 processes a ring "
        "all-reduce sends about that much per process); DDP counted by a gradient comm hook (its buckets), DiLoCo "
        "by torchft's Manager (one call per parameter); sync rounds = steps at which any all-reduce happened.",
        "",
        "## Staged inference: layers on 2 processes vs one",
        "",
        *generate_table(generate),
        "",
        f"- Model: AGILLM {GENERATE_FIELDS['num_hidden_layers']} layers, hidden {GENERATE_FIELDS['hidden_size']} "
        f"({generate['parameters']:,} parameters); greedy `generate` of {generate['new_tokens']} new tokens after a "
        f"{generate['prompt_tokens']}-token prompt, batch 1; a warm-up repeat discarded, then the median of "
        f"{len(generate['pp_size_2'])} repeats, the two interleaved.",
        "- transformers' pipeline parallelism runs the stages one after the other for every token (no micro-batch "
        "overlap at batch 1): it spreads the weights (memory) over processes and hosts, it does not speed up a "
        "single stream; the ratio shows its per-token cost here.",
        "",
        "## Staged training: layers on 2 processes, forward and backward, vs one",
        "",
        *staged_training_table(summary["staged_training"]),
        "",
        f"- The same 8-layer model; AdamW (lr {PIPELINE['lr']:g}, weight decay 0.1) on Shakespeare batches of "
        f"{PIPELINE['batch']} x {PIPELINE['block_size']} tokens; blocks of {summary['staged_training']['steps']} "
        "steps timed, pipelined and whole interleaved block by block, a warm-up block discarded, median over "
        f"{len(summary['staged_training']['whole'])} blocks. Both train continuously from the same weights on the "
        "same batches: the loss diff is over every step (warm-up included), pipelined (last stage) vs whole.",
        "- Each process holds and computes half the layers (the tied embedding / head on both end stages, their "
        "gradient shares summed after backward); with 2 processes on 2 shared cores, the pipeline bubble and the "
        "activation sends are what the ratio measures against one process doing all the work.",
        "",
    ])


def main(argv=None) -> dict:
    args = parse_args(argv)
    steps, repeats = (32, 1) if args.quick else (TRAINING["steps"], args.repeats or 3)
    generate_repeats = 1 if args.quick else (args.repeats or 5)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="agillm-async-workers-") as workdir:
        root = Path(workdir)
        folders = save_models(root / "models")
        results = run_worker(plan_runs(folders, steps, repeats, generate_repeats), root / "out", timeout=1800)
    seconds = time.perf_counter() - start
    summary = summarize(results, repeats)
    machine = machine_info(len(os.sched_getaffinity(0)))
    machine["torchft"] = importlib.metadata.version("torchft")
    raw = {"machine": machine, "steps": steps, "repeats": repeats, "training_plan": TRAINING, **summary}
    write_report(args.output, markdown_report(summary, machine, steps, repeats, seconds), raw, echo_report=True)
    return raw


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
