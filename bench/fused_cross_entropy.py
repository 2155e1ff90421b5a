"""Chunked ("fused") linear cross-entropy (`config.cross_entropy_chunk_size`, losses_agillm.py) vs the stock loss:
training-step peak memory, loss and step time, on CPU.

Two setups:

- **shakespeare**: the demo's model (`demo/pretrain_shakespeare.py`: the shipped 8,192-id vocabulary, hidden 128,
  4 layers, AR + SAT + NAT heads tied to the embedding, objective weights 1 / 0.25 / 0.25) at the demo's batch,
  4 x 256 tokens;
- **logits-dominated**: SmolLM2's 49,152-id vocabulary over a small trunk (hidden 256, 2 layers, AR head tied to the
  embedding, as SmolLM2), batch 8 x 512: one copy of the fp32 logits is 768 MiB.

Per setup, stock (`cross_entropy_chunk_size=None`) and fused are measured three ways:

- peak memory with `bench/memory.py`'s method: each variant alone in a fresh subprocess, the peak RSS during the
  training steps (forward + backward + AdamW) minus the RSS before them; runs alternate stock / fused;
- loss and gradients: one model, one batch, the same NAT masks; one training forward + backward per variant;
- step time (forward + backward): the same model switching `config.cross_entropy_chunk_size` between runs, which
  alternate (`bench.timing.interleaved`); medians.

A chunk-size sweep on the logits-dominated setup adds peak memory (one subprocess run each) and step time.

Usage: `python -m bench fused_cross_entropy [--quick] [--threads N] [--output PATH]`
(writes `bench/fused_cross_entropy.md` + `.json`).
"""

import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from configuration_agillm import AgillmConfig
from demo.pretrain_shakespeare import BLOCK_SIZE, TrainingPlan, small_agillm_config
from modeling_agillm import AgillmForCausalLM
from tokenizer import TOKENIZER_DIR

from . import memory
from .cli import bench_parser, parse_bench_args, write_report
from .compare_llama import machine_info
from .timing import interleaved, timed


SMOLLM2_VOCAB_SIZE = 49152
TARGET_RATIO = 0.6  # issue 12: fused peak <= 0.6 x stock at equal loss, on the logits-dominated setup


@dataclass
class Plan:
    chunk_size: int = 256  # of the main comparison
    sweep_chunk_sizes: tuple[int, ...] = (64, 256, 1024, 4096)
    logits_batch: int = 8
    logits_seq_len: int = 512
    memory_steps: int = 2  # the second step runs with AdamW's state allocated: the steady-state peak
    memory_repeats: int = 1  # the RSS method repeats to 0.1 MiB (bench/memory.py)
    warmup: int = 0  # the loss/gradient comparison has just run both variants once
    repeats: int = 5
    sweep_repeats: int = 2

    @classmethod
    def quick(cls) -> "Plan":
        return cls(sweep_chunk_sizes=(256, 1024), logits_batch=2, repeats=2, sweep_repeats=1)


@dataclass
class Setup:
    name: str
    description: str
    config: AgillmConfig
    batch: int
    seq_len: int


def build_setups(plan: Plan) -> list[Setup]:
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    demo_plan = TrainingPlan()
    shakespeare = small_agillm_config(tokenizer, demo_plan.objective_weights)
    logits_dominated = AgillmConfig(
        vocab_size=SMOLLM2_VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=plan.logits_seq_len,
        tie_word_embeddings=True,
    )
    return [
        Setup("shakespeare", "the demo's model: vocab 8,192, hidden 128, 4 layers, AR + SAT + NAT (tied)", shakespeare,
              demo_plan.batch_size, BLOCK_SIZE),
        Setup("logits-dominated", f"vocab {SMOLLM2_VOCAB_SIZE:,} (SmolLM2), hidden 256, 2 layers, AR (tied)",
              logits_dominated, plan.logits_batch, plan.logits_seq_len),
    ]  # fmt: skip


def with_chunk_size(config: AgillmConfig, chunk_size: int | None) -> AgillmConfig:
    return AgillmConfig.from_dict({**config.to_dict(), "cross_entropy_chunk_size": chunk_size})


def label(chunk_size: int | None) -> str:
    return "stock" if chunk_size is None else f"fused (chunk {chunk_size})"


# --------------------------------------------------------------------------------------------------- measurements


def peak_memory(setup: Setup, chunk_sizes: list[int | None], plan: Plan, threads: int, repeats: int) -> dict:
    """`bench/memory.py` subprocess runs, alternating variants: `{variant: {"peak_mib": [...], "loss": [...]}}`."""
    runs = {label(chunk): {"peak_mib": [], "loss": []} for chunk in chunk_sizes}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for chunk in chunk_sizes:
            paths[chunk] = Path(tmp, f"config-{chunk}.json")
            with_chunk_size(setup.config, chunk).to_json_file(paths[chunk])
        for _ in range(repeats):
            for chunk in chunk_sizes:
                result = memory.measure_in_subprocess(
                    "agillm", paths[chunk], setup.batch, setup.seq_len, plan.memory_steps, threads
                )
                runs[label(chunk)]["peak_mib"].append(result["step_peak_mib"])
                runs[label(chunk)]["loss"].append(result["loss"])
                print(f"[{setup.name}] {label(chunk)}: peak {result['step_peak_mib']:,.1f} MiB", flush=True)
    return runs


def build_model(setup: Setup) -> tuple[AgillmForCausalLM, torch.Tensor]:
    torch.manual_seed(0)
    model = AgillmForCausalLM(setup.config).train()
    input_ids = torch.randint(3, setup.config.vocab_size, (setup.batch, setup.seq_len),
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
    return model, input_ids


def training_step(model: AgillmForCausalLM, input_ids: torch.Tensor, chunk_size: int | None):
    """Forward + backward with `chunk_size`; returns the output (the NAT masks come from the same seed each time)."""
    model.config.cross_entropy_chunk_size = chunk_size
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    output = model(input_ids=input_ids, labels=input_ids)
    output.loss.backward()
    return output


def loss_and_gradient_differences(model, input_ids, chunk_size: int) -> dict:
    stock = training_step(model, input_ids, None)
    stock_grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    fused = training_step(model, input_ids, chunk_size)
    grad_difference = max((param.grad - stock_grads[name]).abs().max().item()
                          for name, param in model.named_parameters() if param.grad is not None)  # fmt: skip
    grad_scale = max(grad.abs().max().item() for grad in stock_grads.values())
    return {
        "stock_loss": stock.loss.item(),
        "fused_loss": fused.loss.item(),
        "abs_loss_difference": abs(fused.loss.item() - stock.loss.item()),
        "objective_losses": {name: [value.item(), fused.objective_losses[name].item()]
                             for name, value in (stock.objective_losses or {}).items()},  # fmt: skip
        "max_abs_grad_difference": grad_difference,
        "max_abs_grad": grad_scale,
    }


def step_seconds(model, input_ids, chunk_sizes: list[int | None], warmup: int, repeats: int) -> dict:
    """Seconds of each timed forward + backward, per variant (runs alternate between the variants)."""
    workloads = {
        label(chunk): timed(lambda chunk=chunk: training_step(model, input_ids, chunk), input_ids.numel())
        for chunk in chunk_sizes
    }
    measurements = interleaved(workloads, warmup, repeats)
    model.zero_grad(set_to_none=True)
    tokens = input_ids.numel()
    return {name: [tokens / speed for speed in result.tokens_per_second] for name, result in measurements.items()}


def bench_setup(setup: Setup, plan: Plan, threads: int) -> dict:
    chunk_sizes = [None, plan.chunk_size]
    memory_runs = peak_memory(setup, chunk_sizes, plan, threads, plan.memory_repeats)
    model, input_ids = build_model(setup)
    parity = loss_and_gradient_differences(model, input_ids, plan.chunk_size)
    print(f"[{setup.name}] |loss difference| {parity['abs_loss_difference']:.2e}, max |grad difference| "
          f"{parity['max_abs_grad_difference']:.2e}", flush=True)  # fmt: skip
    seconds = step_seconds(model, input_ids, chunk_sizes, plan.warmup, plan.repeats)
    result = {"setup": setup.name, "description": setup.description, "batch": setup.batch,
              "seq_len": setup.seq_len, "memory": memory_runs, "parity": parity, "step_seconds": seconds}  # fmt: skip
    if setup.name == "logits-dominated":
        extra = [chunk for chunk in plan.sweep_chunk_sizes if chunk != plan.chunk_size]
        sweep_memory = peak_memory(setup, extra, plan, threads, repeats=1)
        sweep_memory.update({label(chunk): memory_runs[label(chunk)] for chunk in chunk_sizes})
        sweep_seconds = step_seconds(model, input_ids, [None, *plan.sweep_chunk_sizes], 0, plan.sweep_repeats)
        result["sweep"] = {"memory": sweep_memory, "step_seconds": sweep_seconds}
    return result


# --------------------------------------------------------------------------------------------------- report


def median(values: list[float]) -> float:
    return statistics.median(values)


def main_table(results: list[dict], plan: Plan) -> list[str]:
    lines = [
        "| setup | batch x seq | stock peak | fused peak | fused / stock | stock loss | loss difference | "
        "max grad difference | stock step: median (fastest) | fused step | fused / stock time |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fused = label(plan.chunk_size)
    for result in results:
        peak = {name: median(runs["peak_mib"]) for name, runs in result["memory"].items()}
        step = {name: median(values) for name, values in result["step_seconds"].items()}
        fastest = {name: min(values) for name, values in result["step_seconds"].items()}
        parity = result["parity"]
        lines.append(
            f"| {result['setup']} | {result['batch']} x {result['seq_len']} | {peak['stock']:,.1f} MiB | "
            f"{peak[fused]:,.1f} MiB | **{peak[fused] / peak['stock']:.2f}** | {parity['stock_loss']:.6f} | "
            f"{parity['abs_loss_difference']:.1e} | {parity['max_abs_grad_difference']:.1e} "
            f"(of {parity['max_abs_grad']:.1e}) | {step['stock']:.2f} s ({fastest['stock']:.2f} s) | "
            f"{step[fused]:.2f} s ({fastest[fused]:.2f} s) | {step[fused] / step['stock']:.2f} "
            f"({fastest[fused] / fastest['stock']:.2f}) |"
        )
    return lines


def sweep_table(result: dict, plan: Plan) -> list[str]:
    sweep = result["sweep"]
    stock_peak = median(sweep["memory"]["stock"]["peak_mib"])
    stock_step = min(sweep["step_seconds"]["stock"])
    lines = [
        "| chunk size | chunk x vocab fp32 | peak | / stock | fastest step | / stock |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for chunk in [None, *plan.sweep_chunk_sizes]:
        peak, step = median(sweep["memory"][label(chunk)]["peak_mib"]), min(sweep["step_seconds"][label(chunk)])
        buffer = "-" if chunk is None else f"{chunk * SMOLLM2_VOCAB_SIZE * 4 / 2**20:,.0f} MiB"
        lines.append(f"| {chunk or 'stock'} | {buffer} | {peak:,.1f} MiB | {peak / stock_peak:.2f} | {step:.2f} s | "
                     f"{step / stock_step:.2f} |")  # fmt: skip
    return lines


def markdown_report(results: list[dict], machine: dict, plan: Plan, quick: bool, seconds: float, json_name: str):
    command = "python -m bench fused_cross_entropy" + (" --quick" if quick else "")
    caveat = " (**quick run: reduced sizes and run counts, not reference numbers**)" if quick else ""
    logits = next(result for result in results if result["setup"] == "logits-dominated")
    peaks = {name: median(runs["peak_mib"]) for name, runs in logits["memory"].items()}
    ratio = peaks[label(plan.chunk_size)] / peaks["stock"]
    verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
    lines = [
        "# Chunked (fused) linear cross-entropy vs the stock loss (CPU, fp32)",
        "",
        f"Generated by `{command}`{caveat}. Stock: `cross_entropy_chunk_size=None` (full logits, fp32 "
        f"cross-entropy); fused: `cross_entropy_chunk_size={plan.chunk_size}` (`losses_agillm.py`).",
        f"Target (issue 12): fused peak <= {TARGET_RATIO} x stock at equal loss on the logits-dominated setup: "
        f"**{verdict}** ({ratio:.2f}).",
        "",
        *main_table(results, plan),
        "",
        f"## Chunk size sweep (logits-dominated, {logits['batch']} x {logits['seq_len']})",
        "",
        *sweep_table(logits, plan),
        "",
        "## Method",
        "",
    ]
    for result in results:
        lines.append(f"- **{result['setup']}**: {result['description']}, batch {result['batch']} x "
                     f"{result['seq_len']}.")  # fmt: skip
    lines += [
        "- peak: `bench/memory.py` (each variant alone in a fresh subprocess with `MALLOC_MMAP_THRESHOLD_=65536`; "
        "heap trimmed and the kernel's peak-RSS counter reset after building model, AdamW and batch; the value is "
        f"the peak RSS during {plan.memory_steps} training steps (forward + backward + AdamW step) minus the RSS "
        f"before them). {plan.memory_repeats} run(s) per variant, alternating (median); repeated runs agree to "
        "0.1 MiB (`bench/memory.py`).",
        "- loss / gradient difference: one model and batch, the same NAT masks; one forward + backward per variant; "
        "max |difference| over every parameter's gradient (in parentheses: the largest gradient entry).",
        f"- step: forward + backward, the same model switching `config.cross_entropy_chunk_size`; runs alternate "
        f"stock / fused, right after the loss comparison ran each variant once (warm-up); median (and fastest, in "
        f"parentheses) of {plan.repeats} timed rounds; the sweep gives the fastest of {plan.sweep_repeats} round(s) "
        "over every chunk size. The 2-core CPU was shared with other jobs, which made the same step take anywhere "
        "from 1x to 20x its quiet time: the fastest run is the better estimate of the cost; the memory figures are "
        "not affected.",
        "- the fused loss recomputes each chunk's logits in backward (4 matmuls per chunk instead of 3), and reads "
        "and writes far less memory than the stock log-softmax over the full logits.",
        f"- Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, `torch.get_num_threads()` = "
        f"{machine['torch_threads']}; Python {machine['python']}, torch {machine['torch']}, transformers "
        f"{machine['transformers']}; {machine['date']}. Whole run: {seconds:.0f} s.",
        "",
        f"Raw runs: `{json_name}`.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    quick_help = "batch 2 x 512 for the logits-dominated setup, fewer runs (a smoke run)"
    parser = bench_parser("fused_cross_entropy", __doc__.split("\n\n")[0], quick_help=quick_help)
    return parse_bench_args(parser, "fused_cross_entropy", argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = [bench_setup(setup, plan, args.threads) for setup in build_setups(plan)]
    seconds = time.perf_counter() - start
    machine = machine_info(torch.get_num_threads())
    raw = {"plan": asdict(plan), "machine": machine, "seconds": seconds, "results": results}
    report = markdown_report(results, machine, plan, args.quick, seconds, args.output.with_suffix(".json").name)
    write_report(args.output, report, raw)
    return raw


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
