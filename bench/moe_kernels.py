"""MoE experts kernels on CPU: `agillm_grouped` (`kernels/moe.py`) vs transformers' eager / batched_mm / grouped_mm.

One experts module per shape (seeded random weights, fp32), router-like top-k routing from random logits. For each
number of tokens per call (1 = a decode step, 128, 2048) and each pass (forward under `torch.no_grad`, forward +
backward of a fixed random projection of the output with gradients for the hidden states, the routing weights and
all expert weights), the four implementations run in turn in one process (`bench.timing.interleaved`), each round
calling its implementation enough times to last about `ROUND_SECONDS`; the table gives the median time per call
and the ratio best stock time / agillm_grouped time (> 1: agillm_grouped faster). Before timing, every
implementation's output is checked against eager.

`batched_mm` gathers one full copy of the expert weights per (token, expert) pair; where that copy would exceed
`BATCHED_MM_LIMIT_BYTES` it is not run (marked "skipped").

Usage: `python -m bench moe_kernels [--quick] [--threads N] [--output PATH]` (writes `bench/moe_kernels.md` + `.json`).
On a shared machine run it with `--threads 1`: with more threads than free cores, OpenMP's waiting makes the
timings swing by large factors.
"""

import math
import os
import time
from dataclasses import asdict, dataclass

import torch

from .cli import bench_parser, parse_bench_args, write_report
from .compare_llama import machine_info
from .timing import interleaved, keep_freed_memory


STOCK = ("eager", "batched_mm", "grouped_mm")
KERNEL = "agillm_grouped"
BATCHED_MM_LIMIT_BYTES = 512 * 2**20
OUTPUT_ATOL = 1e-4  # fp32 agreement with eager before timing
ROUND_SECONDS = 0.05  # each timed round calls an implementation for about this long


@dataclass(frozen=True)
class Shape:
    name: str
    num_experts: int
    hidden_size: int
    expert_width: int
    top_k: int
    mlp_type: str = "gated"

    @property
    def description(self) -> str:
        kind = "SwiGLU, no bias" if self.mlp_type == "gated" else "ReLU with biases"
        return (f"{self.num_experts} experts, hidden {self.hidden_size}, expert width {self.expert_width}, "
                f"top-{self.top_k}, {kind}")


SHAPES = (
    Shape("bench/moe.py layer (Mixtral / Qwen3-MoE tiny)", 8, 256, 256, 2),
    Shape("Qwen3-MoE-like: many narrow experts", 64, 256, 128, 8),
    Shape("AGILLM 4.x plain experts", 8, 256, 512, 1, mlp_type="plain"),
)


@dataclass
class Plan:
    tokens: tuple[int, ...] = (1, 128, 2048)
    warmup: int = 1
    repeats: int = 11

    @classmethod
    def quick(cls) -> "Plan":
        return cls(tokens=(1, 128), warmup=1, repeats=3)


def build_experts(shape: Shape):
    from configuration_agillm import AgillmConfig
    from moe_agillm import AgillmExperts, AgillmPlainExperts

    config = AgillmConfig(
        vocab_size=64, hidden_size=shape.hidden_size, intermediate_size=shape.expert_width, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, num_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k, mlp_type=shape.mlp_type, mlp_bias=shape.mlp_type == "plain",
        hidden_act="silu" if shape.mlp_type == "gated" else "relu",
    )
    torch.manual_seed(0)
    experts = (AgillmExperts if shape.mlp_type == "gated" else AgillmPlainExperts)(config)
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.normal_(0.0, 0.02)
    return experts


def routed_inputs(shape: Shape, tokens: int):
    """Hidden states, top-k ids and softmax weights from random router logits, and a fixed output gradient."""
    generator = torch.Generator().manual_seed(tokens)
    hidden_states = torch.randn(tokens, shape.hidden_size, generator=generator)
    logits = torch.randn(tokens, shape.num_experts, generator=generator)
    top_k_weights, top_k_index = logits.softmax(-1).topk(shape.top_k, dim=-1)
    output_grad = torch.randn(tokens, shape.hidden_size, generator=generator)
    return hidden_states, top_k_index, top_k_weights, output_grad


def batched_mm_bytes(shape: Shape, tokens: int) -> int:
    width = 2 * shape.expert_width if shape.mlp_type == "gated" else shape.expert_width
    per_pair = (width + shape.expert_width) * shape.hidden_size * 4
    return tokens * shape.top_k * per_pair


def make_call(experts, implementation: str, inputs, backward: bool):
    hidden_states, top_k_index, top_k_weights, output_grad = inputs

    def forward():
        experts.config._experts_implementation = implementation
        with torch.no_grad():
            experts(hidden_states, top_k_index, top_k_weights)

    def forward_backward():
        experts.config._experts_implementation = implementation
        hidden = hidden_states.detach().requires_grad_(True)
        weights = top_k_weights.detach().requires_grad_(True)
        (experts(hidden, top_k_index, weights) * output_grad).sum().backward()
        experts.zero_grad(set_to_none=True)

    return forward_backward if backward else forward


def repeated(call, tokens: int):
    """A `bench.timing` workload running `call` enough times (measured once, after a first call) to last about
    `ROUND_SECONDS`."""
    call()
    start = time.perf_counter()
    call()
    calls = max(1, math.ceil(ROUND_SECONDS / max(time.perf_counter() - start, 1e-6)))

    def workload() -> tuple[int, float]:
        start = time.perf_counter()
        for _ in range(calls):
            call()
        return calls * tokens, time.perf_counter() - start

    return workload


@torch.no_grad()
def max_difference_from_eager(experts, implementations, inputs) -> dict:
    hidden_states, top_k_index, top_k_weights, _ = inputs
    experts.config._experts_implementation = "eager"
    expected = experts(hidden_states, top_k_index, top_k_weights)
    differences = {}
    for implementation in implementations:
        experts.config._experts_implementation = implementation
        difference = (experts(hidden_states, top_k_index, top_k_weights) - expected).abs().max().item()
        if difference > OUTPUT_ATOL:
            raise RuntimeError(f"{implementation} differs from eager by {difference:.2e}; not timing.")
        differences[implementation] = difference
    return differences


def bench_shape(shape: Shape, plan: Plan) -> list[dict]:
    experts = build_experts(shape)
    rows = []
    for tokens in plan.tokens:
        inputs = routed_inputs(shape, tokens)
        skipped = () if batched_mm_bytes(shape, tokens) <= BATCHED_MM_LIMIT_BYTES else ("batched_mm",)
        implementations = [name for name in (*STOCK, KERNEL) if name not in skipped]
        differences = max_difference_from_eager(experts, implementations, inputs)
        for backward in (False, True):
            workloads = {
                name: repeated(make_call(experts, name, inputs, backward), tokens) for name in implementations
            }
            measured = interleaved(workloads, warmup=plan.warmup, repeats=plan.repeats)
            # ms per call from the median tokens/s
            milliseconds = {name: 1e3 * tokens / measured[name].median for name in implementations}
            best_stock = min((name for name in STOCK if name in milliseconds), key=milliseconds.get)
            row = {
                "shape": shape.name, "tokens": tokens, "pass": "forward+backward" if backward else "forward",
                "ms_per_call": milliseconds, "skipped": list(skipped), "best_stock": best_stock,
                "ratio": milliseconds[best_stock] / milliseconds[KERNEL],
                "max_abs_difference_from_eager": differences,
                "tokens_per_s_runs": {name: measured[name].tokens_per_second for name in implementations},
            }
            rows.append(row)
            print(
                f"{shape.name[:28]:28s} T={tokens:5d} {row['pass']:16s} "
                + " ".join(f"{name} {value:8.3f}ms" for name, value in milliseconds.items())
                + f"  ratio vs {best_stock} {row['ratio']:.2f}",
                flush=True,
            )
    return rows


def markdown_report(rows: list[dict], machine: dict, plan: Plan, seconds: float) -> str:
    lines = [
        "# MoE experts kernels on CPU: agillm_grouped vs transformers' stock implementations",
        "",
        "Generated by `python -m bench moe_kernels` (`bench/moe_kernels.py`). Median milliseconds per call of one "
        "experts module (lower is better); ratio = best stock time / agillm_grouped time (> 1: agillm_grouped "
        "faster).",
        "",
        "| shape | tokens | pass | eager ms | batched_mm ms | grouped_mm ms | agillm_grouped ms | best stock "
        "| ratio |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        cells = [
            f"{row['ms_per_call'][name]:,.3f}" if name in row["ms_per_call"] else "skipped"
            for name in (*STOCK, KERNEL)
        ]
        lines.append(
            f"| {row['shape']} | {row['tokens']} | {row['pass']} | " + " | ".join(cells)
            + f" | {row['best_stock']} | **{row['ratio']:.2f}** |"
        )
    lines += [
        "",
        "## Setup",
        "",
        *(f"- {shape.name}: {shape.description}." for shape in SHAPES),
        "- fp32, seeded random weights (std 0.02); routing = top-k of softmax(random logits), so expert loads "
        "are uneven and some experts can get no token at small token counts.",
        "- forward: under `torch.no_grad()`. forward+backward: gradients of the hidden states, the routing "
        "weights and every expert weight/bias, from `(output * fixed random tensor).sum()`.",
        f"- Implementations alternate within each round (`bench.timing.interleaved`); {plan.warmup} warm-up "
        f"round(s), then the median of {plan.repeats} rounds; a round repeats one implementation for about "
        f"{ROUND_SECONDS * 1e3:.0f} ms (calls counted once beforehand).",
        "- Allocator: " + ("glibc told to keep freed memory (`bench.timing.keep_freed_memory`, as jemalloc or "
                           "tcmalloc do): otherwise the weight gradients of a 1-token backward are page-faulted "
                           "back in on every call and that, not the kernels, decides the row."
                           if machine.get("allocator_keeps_freed_memory") else "glibc defaults (not glibc here)."),
        f"- batched_mm is skipped where its per-pair copy of the expert weights would exceed "
        f"{BATCHED_MM_LIMIT_BYTES // 2**20} MiB.",
        f"- Outputs agree with eager before timing (max abs difference <= {OUTPUT_ATOL}; per row in the JSON).",
        "- CPU path only: agillm_grouped's Triton kernels (GPU) are not timed here; this machine has no GPU.",
        f"- Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, `torch.get_num_threads()` = "
        f"{machine['torch_threads']}; Python {machine['python']}, torch {machine['torch']}, transformers "
        f"{machine['transformers']}; {machine['date']}. Whole run: {seconds:.0f} s. The machine is shared, so "
        "single figures are noisy; the interleaving keeps the ratios comparable.",
        "",
        "Raw runs: `bench/moe_kernels.json`.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = bench_parser(
        "moe_kernels", __doc__.split("\n\n")[0], quick_help="tokens 1 and 128 only, 3 rounds"
    )
    return parse_bench_args(parser, "moe_kernels", argv)


def main(argv=None) -> dict:
    import kernels

    args = parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    torch.set_num_threads(args.threads)
    allocator_steady = keep_freed_memory()
    kernels.enable()
    try:
        start = time.perf_counter()
        rows = [row for shape in SHAPES for row in bench_shape(shape, plan)]
        seconds = time.perf_counter() - start
    finally:
        kernels.disable()
    machine = {**machine_info(torch.get_num_threads()), "allocator_keeps_freed_memory": allocator_steady}
    raw = {"plan": asdict(plan), "shapes": [asdict(shape) for shape in SHAPES], "machine": machine,
           "seconds": seconds, "rows": rows}
    write_report(args.output, markdown_report(rows, machine, plan, seconds), raw)
    return raw


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
