"""MoE training throughput: AGILLM vs transformers' Mixtral and Qwen3-MoE on identical configs and weights.

For each family a seeded random reference (`MixtralForCausalLM` / `Qwen3MoeForCausalLM`) is converted in memory to
AGILLM (`convert.converter.build_agillm_model`), so both models hold the same tensors; their logits must agree
within 1e-4 before anything is timed. Then, for each experts implementation (`eager`, `batched_mm`, `grouped_mm`,
set on both models with `set_experts_implementation`), two workloads are timed, forward + backward:

- **MoE layer**: layer 0's sparse MoE block (router + experts) on fixed random hidden states;
- **model**: the whole causal LM with `labels` (cross-entropy loss), all parameters trainable.

Runs alternate reference / AGILLM (`bench.timing.interleaved`), so both see the same machine state; the table
gives the medians in tokens/s and the ratio AGILLM / reference (> 1: AGILLM faster).

Usage: `python -m bench moe [--quick] [--threads N] [--output PATH]` (writes `bench/moe.md` + `bench/moe.json`).
"""

import argparse
import os
import time
from dataclasses import asdict, dataclass

import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from convert.converter import build_agillm_model, read_source

from .cli import bench_parser, parse_bench_args, write_report
from .compare_llama import machine_info
from .timing import interleaved, timed


EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
LOGITS_ATOL = 1e-4  # same-function check before timing

# Shared by both families; only the field names differ (Mixtral's expert width is its `intermediate_size`).
SHAPE = dict(
    vocab_size=4096,
    hidden_size=256,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=512,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
)
NUM_EXPERTS, EXPERT_WIDTH = 8, 256
FAMILIES = {
    "mixtral": (
        MixtralForCausalLM,
        MixtralConfig(**SHAPE, intermediate_size=EXPERT_WIDTH, num_local_experts=NUM_EXPERTS),
    ),
    "qwen3_moe": (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig(**SHAPE, intermediate_size=4 * SHAPE["hidden_size"], moe_intermediate_size=EXPERT_WIDTH,
                       num_experts=NUM_EXPERTS, norm_topk_prob=True),
    ),
}


@dataclass
class Plan:
    batch_size: int = 4
    seq_len: int = 128
    warmup: int = 1
    repeats: int = 5

    @classmethod
    def quick(cls) -> "Plan":
        return cls(batch_size=2, seq_len=64, warmup=1, repeats=2)

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


def build_pair(family: str, seed: int = 0):
    """The seeded reference and its AGILLM conversion, both fp32 in train mode (dropout is 0 in both configs)."""
    model_class, config = FAMILIES[family]
    torch.manual_seed(seed)
    reference = model_class(config)
    agillm = build_agillm_model(read_source(reference), torch.float32)
    return reference.train(), agillm.train()


@torch.no_grad()
def max_logit_difference(reference, agillm, input_ids) -> float:
    reference.eval(), agillm.eval()
    try:
        return (reference(input_ids).logits - agillm(input_ids).logits).abs().max().item()
    finally:
        reference.train(), agillm.train()


def moe_layer_workload(model, hidden_states: torch.Tensor, tokens: int):
    """Forward + backward of layer 0's MoE block; gradients reach the router, the experts and the input."""
    block = model.model.layers[0].mlp

    def run():
        inputs = hidden_states.detach().requires_grad_(True)
        block(inputs).sum().backward()
        block.zero_grad(set_to_none=True)

    return timed(run, tokens)


def model_workload(model, input_ids: torch.Tensor, tokens: int):
    """Forward + backward of the whole causal LM on its next-token loss."""

    def run():
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        model.zero_grad(set_to_none=True)

    return timed(run, tokens)


def bench_family(family: str, plan: Plan) -> tuple[list[dict], float]:
    reference, agillm = build_pair(family)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, SHAPE["vocab_size"], (plan.batch_size, plan.seq_len), generator=generator)
    hidden_states = torch.randn(plan.batch_size, plan.seq_len, SHAPE["hidden_size"], generator=generator)
    parity = max_logit_difference(reference, agillm, input_ids)
    if parity > LOGITS_ATOL:
        raise RuntimeError(f"{family}: AGILLM and the reference differ by {parity:.2e} > {LOGITS_ATOL}; not timing.")

    rows = []
    for implementation in EXPERTS_IMPLEMENTATIONS:
        for model in (reference, agillm):
            model.set_experts_implementation(implementation)
        workloads = {
            "moe layer": lambda model: moe_layer_workload(model, hidden_states, plan.tokens),
            "model": lambda model: model_workload(model, input_ids, plan.tokens),
        }
        for workload_name, make in workloads.items():
            measured = interleaved(
                {"reference": make(reference), "agillm": make(agillm)}, warmup=plan.warmup, repeats=plan.repeats
            )
            row = {
                "family": family,
                "experts_implementation": implementation,
                "workload": workload_name,
                "reference_tokens_per_s": measured["reference"].median,
                "agillm_tokens_per_s": measured["agillm"].median,
                "reference_runs": measured["reference"].tokens_per_second,
                "agillm_runs": measured["agillm"].tokens_per_second,
            }
            row["ratio"] = row["agillm_tokens_per_s"] / row["reference_tokens_per_s"]
            print(
                f"{family:10s} {implementation:10s} {workload_name:9s} reference {row['reference_tokens_per_s']:9,.0f} "
                f"agillm {row['agillm_tokens_per_s']:9,.0f} tok/s  ratio {row['ratio']:.3f}"
            )
            rows.append(row)
    return rows, parity


def markdown_report(rows: list[dict], parity: dict, machine: dict, plan: Plan, seconds: float) -> str:
    lines = [
        "# MoE training throughput: AGILLM vs transformers Mixtral / Qwen3-MoE",
        "",
        "Forward + backward tokens/s, median of the timed runs (reference and AGILLM alternating). Ratio = AGILLM / "
        "reference; above 1 AGILLM is faster.",
        "",
        "| family | experts implementation | workload | reference tok/s | AGILLM tok/s | ratio |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['family']} | {row['experts_implementation']} | {row['workload']} | "
            f"{row['reference_tokens_per_s']:,.0f} | {row['agillm_tokens_per_s']:,.0f} | {row['ratio']:.3f} |"
        )
    shape = ", ".join(f"{key}={value}" for key, value in SHAPE.items())
    lines += [
        "",
        "## Setup",
        "",
        f"- Identical configs ({shape}; {NUM_EXPERTS} experts of width {EXPERT_WIDTH}, top-"
        f"{SHAPE['num_experts_per_tok']}, Qwen3-MoE renormalising its top-k as Mixtral), seeded random weights; "
        "AGILLM is the in-memory conversion of the reference (`convert.converter.build_agillm_model`).",
        "- Same function before timing: max abs fp32 logit difference "
        + ", ".join(f"{family} {value:.1e}" for family, value in parity.items())
        + f" (limit {LOGITS_ATOL}).",
        f"- Batch {plan.batch_size} x {plan.seq_len} tokens; {plan.warmup} warm-up round, {plan.repeats} timed rounds "
        "per workload; train mode, fp32, all parameters trainable.",
        "- MoE layer: layer 0's MoE block (router + experts) on fixed random hidden states, backward of the output "
        "sum. Model: causal LM with `labels=input_ids`, backward of the loss.",
        "- The experts implementation is set on both models with `set_experts_implementation` before each group.",
        f"- Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, `torch.get_num_threads()` = "
        f"{machine['torch_threads']}; Python {machine['python']}, torch {machine['torch']}, transformers "
        f"{machine['transformers']}; {machine['date']}. Whole run: {seconds:.0f} s.",
        "",
        "Raw runs: `bench/moe.json`.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = bench_parser("moe", __doc__.split("\n\n")[0], quick_help="smaller batch, 2 timed rounds (a smoke run)")
    return parse_bench_args(parser, "moe", argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows, parity = [], {}
    for family in FAMILIES:
        family_rows, parity[family] = bench_family(family, plan)
        rows += family_rows
    seconds = time.perf_counter() - start
    machine = machine_info(torch.get_num_threads())
    raw = {"plan": asdict(plan), "shape": SHAPE, "num_experts": NUM_EXPERTS, "expert_width": EXPERT_WIDTH,
           "parity_max_abs_logit_difference": parity, "machine": machine, "seconds": seconds, "rows": rows}
    write_report(args.output, markdown_report(rows, parity, machine, plan, seconds), raw)
    return raw


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
