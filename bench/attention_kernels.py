"""`attn_implementation="agillm"` vs transformers' stock attention backends, CPU (`python -m bench attention_kernels`).

Each case calls the registered attention functions exactly as `AgillmAttention` does (q `[B, 9, S, 64]`, k/v
`[B, 3, S, 64]`: SmolLM2-135M's heads), with the inputs the model gives each backend: the `sdpa_mask` boolean mask
(None where sdpa's `is_causal` suffices), and for ALiBi the stock backends' folded float bias (built once per
forward by the model, so not timed) vs agillm's slopes + positions (its per-forward bias is cached, so not timed
either after the first layer). Backends are interleaved round by round; medians over rounds (one thread unless
`--threads N`); ratio = best stock median / agillm median (> 1: agillm faster). Forward runs under `no_grad`;
forward+backward sums the output.
`flex_attention` is timed forward only (PyTorch has no flex backward on CPU) and not for ALiBi (the model refuses it).

The Triton kernel is not timed here: no GPU in this environment (on CPU it only runs in triton's interpreter,
which is for testing). GPU timing is a later step.
"""

import json
import statistics
import time

import torch
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import kernels
from kernels.attention import ATTN_IMPLEMENTATION
from attention_agillm import eager_attention_forward
from layers_agillm import alibi_bias, alibi_slopes

from .cli import bench_parser, parse_bench_args, write_report
from .compare_llama import machine_info
from .timing import keep_freed_memory


HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
SHAPES = [(1, 512), (4, 128)]
WINDOW = 128


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.num_key_value_groups = HEADS // KV_HEADS
        self.is_causal = True
        self.layer_idx = 0


def _mask_function(pattern: str):
    return sliding_window_causal_mask_function(WINDOW) if pattern == "sliding" else causal_mask_function


def _case_inputs(pattern: str, batch: int, seq: int):
    """(sdpa's mask, eager's float mask, agillm's mask, agillm's ALiBi kwargs), as the model builds them."""
    no_skip = pattern == "alibi"  # the model never lets sdpa skip the mask under ALiBi (the bias is added to it)
    arguments = dict(mask_function=_mask_function(pattern), allow_is_causal_skip=not no_skip)
    if pattern == "sliding":  # as `create_sliding_window_causal_mask` passes it: the window must not be skipped
        arguments["local_size"] = WINDOW
    mask = sdpa_mask(batch, seq, seq, **arguments)
    agillm_mask = ALL_MASK_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION](batch, seq, seq, **arguments)
    allowed = mask if mask is not None else torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]
    eager_mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    if pattern != "alibi":
        return mask, eager_mask, agillm_mask, {}
    positions = torch.arange(seq)[None].expand(batch, -1)
    slopes = alibi_slopes(HEADS)
    stock_mask = alibi_bias(slopes, positions, positions, "alibi").masked_fill(~mask, torch.finfo(torch.float32).min)
    alibi_kwargs = dict(alibi_slopes=slopes, alibi_query_positions=positions, alibi_key_positions=positions,
                        alibi_kind="alibi")
    return stock_mask, stock_mask, agillm_mask, alibi_kwargs


def _backends(pattern: str, batch: int, seq: int, with_flex: bool):
    stock_mask, eager_mask, agillm_mask, alibi_kwargs = _case_inputs(pattern, batch, seq)
    layer = _Layer()
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    agillm = ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION]
    backends = {
        "eager": lambda q, k, v: eager_attention_forward(layer, q, k, v, eager_mask, scaling=HEAD_DIM**-0.5)[0],
        "sdpa": lambda q, k, v: sdpa(layer, q, k, v, stock_mask, scaling=HEAD_DIM**-0.5)[0],
        "agillm": lambda q, k, v: agillm(layer, q, k, v, agillm_mask, scaling=HEAD_DIM**-0.5, **alibi_kwargs)[0],
    }
    if with_flex and pattern != "alibi":
        from transformers.integrations.flex_attention import flex_attention_forward
        from transformers.masking_utils import flex_attention_mask

        block_mask = flex_attention_mask(batch, seq, seq, mask_function=_mask_function(pattern))
        backends["flex_attention"] = lambda q, k, v: flex_attention_forward(
            layer, q, k, v, block_mask, scaling=HEAD_DIM**-0.5)[0]
    return backends


def _time(fn, tensors, backward: bool) -> float:
    start = time.perf_counter()
    if backward:
        fn(*tensors).sum().backward()
    else:
        with torch.no_grad():
            fn(*tensors)
    return time.perf_counter() - start


def run_case(pattern: str, batch: int, seq: int, backward: bool, rounds: int) -> dict:
    torch.manual_seed(0)
    tensors = [torch.randn(batch, heads, seq, HEAD_DIM, requires_grad=backward)
               for heads in (HEADS, KV_HEADS, KV_HEADS)]
    backends = _backends(pattern, batch, seq, with_flex=not backward)
    for fn in backends.values():  # warm-up (flex compiles here)
        _time(fn, tensors, backward)
    times = {name: [] for name in backends}
    for _ in range(rounds):
        for name, fn in backends.items():
            times[name].append(_time(fn, tensors, backward))
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    stock = {name: value for name, value in medians.items() if name != "agillm"}
    best = min(stock, key=stock.get)
    # per round (same moment, same machine load) and then the median: steadier than a ratio of medians
    paired = statistics.median(b / a for b, a in zip(times[best], times["agillm"]))
    return {"pattern": pattern, "batch": batch, "seq": seq, "mode": "fwd+bwd" if backward else "fwd",
            "median_ms": medians, "best_stock": best, "ratio_vs_best_stock": stock[best] / medians["agillm"],
            "paired_ratio_vs_best_stock": paired}


def parse_args(argv=None):
    parser = bench_parser("attention_kernels", __doc__.splitlines()[0], quick_help="7 rounds instead of 21")
    # One thread by default: on a machine shared with other jobs, a multi-threaded op waits for its slowest thread
    # and the medians wander by tens of percent; `--threads N` measures N threads instead.
    parser.set_defaults(threads=1)
    return parse_bench_args(parser, "attention_kernels", argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    rounds = 7 if args.quick else 21
    torch.set_num_threads(args.threads)
    allocator_steady = keep_freed_memory()
    kernels.enable()
    results = []
    for pattern in ("causal", "sliding", "alibi"):
        for batch, seq in SHAPES:
            for backward in (False, True):
                result = run_case(pattern, batch, seq, backward, rounds)
                results.append(result)
                print(json.dumps(result), flush=True)
    machine = {**machine_info(torch.get_num_threads()), "allocator_keeps_freed_memory": allocator_steady}
    raw = {"rounds": rounds, "machine": machine, "results": results}
    write_report(args.output, markdown_report(results, rounds, machine), raw)
    return raw


def markdown_report(results, rounds, machine) -> str:
    header = (
        "# `attn_implementation=\"agillm\"` vs stock backends, CPU\n\n"
        f"Generated by `python -m bench attention_kernels` (bench/attention_kernels.py). Machine: "
        f"{machine['cpu']} ({machine['logical_cpus']} cores), {machine['torch_threads']} torch thread(s), shared with "
        f"other jobs (timings are noisy: backends interleaved, {rounds} rounds, medians). torch {machine['torch']}, "
        f"transformers {machine['transformers']}. Shapes: SmolLM2-135M heads (9 q / 3 kv, head_dim 64), "
        f"sliding window {WINDOW}. ratio = best stock median / agillm median (> 1: agillm faster); paired ratio = "
        "median over rounds of (best stock / agillm) within the round. "
        "The Triton kernel is not timed: no GPU here (GPU timing is a later step). Allocator: "
        + ("glibc told to keep freed memory (`bench.timing.keep_freed_memory`), so backward buffers are not "
           "page-faulted back in on every call." if machine.get("allocator_keeps_freed_memory") else "glibc defaults.")
        + "\n\n"
    )
    lines = ["| pattern | B x S | mode | eager ms | sdpa ms | flex ms | agillm ms | best stock | ratio | paired |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["median_ms"]
        flex = f"{m['flex_attention']:.2f}" if "flex_attention" in m else "n/a"
        lines.append(f"| {r['pattern']} | {r['batch']}x{r['seq']} | {r['mode']} | {m['eager']:.2f} | {m['sdpa']:.2f} "
                     f"| {flex} | {m['agillm']:.2f} | {r['best_stock']} | {r['ratio_vs_best_stock']:.2f}x "
                     f"| {r['paired_ratio_vs_best_stock']:.2f}x |")
    return header + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
