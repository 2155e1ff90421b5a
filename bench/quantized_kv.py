"""Decode over an int8 / int4 KV cache without dequantizing it (issue 12): step time, bytes per step, perplexity.

Compared, one layer of SmolLM2-135M's attention shapes (9 query / 3 key-value heads of 64, batch 1), a cache already
holding `context` tokens, then `steps` decode steps (update the cache with the new token's K/V, attend):
    fp32 `DynamicCache` + sdpa    transformers' default: `torch.cat` of the whole cache each step, sdpa over it;
    HQQ int8 / int4 + sdpa        transformers' `QuantizedCache` (HQQ, a group per head and token, residual window
                                  of `steps` tokens, as in bench/kv_table.py): every step dequantizes the whole cache
                                  and concatenates it with the window; the window is re-quantized into the cache once
                                  every `steps` tokens (one flush per timed run);
    ours int8 / int4 [g32]        `kernels.quantized_kv.QuantizedKVLayer` + the `"agillm_qkv"` attention: the new
                                  token is quantized into a preallocated buffer, attention reads the codes a tile
                                  (1 MiB of fp32 once cast, 1,365 tokens here) at a time, scales folded into the
                                  matmuls (groups of 32: the tile dequantized), inside an online softmax (PyTorch
                                  path; the Triton kernel needs a GPU); `refined`: HQQ's zero-point search on each
                                  appended token (`refine_zero_points=True`).

Reported per context length: median time per decode step of the layer (and x30, SmolLM2's layer count), bytes
touched per step (every tensor each torch operation reads and writes during one step, counted by a dispatch mode:
the cache update, dequantization, temporaries and attention, averaged over the `steps` steps so HQQ's flush is
amortised), and the bytes the cache stores per token. Implementations are interleaved within each repeat (the
machine is shared, so timings are noisy); ratios are against fp32.

Optionally (`--perplexity`), held-out perplexity of the converted SmolLM2-135M read through our caches with
bench/kv_table.py's harness (same windows, prefix, chunks: its HQQ rows are the comparison).

Writes `bench/quantized_kv.md` and `.json`.
Usage: `python -m bench quantized_kv [--quick] [--threads 1] [--perplexity]`.
"""

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers.cache_utils import Cache, DynamicLayer, HQQQuantizedLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kernels import quantized_kv
from kernels.quantized_kv import QuantizedKVCache, QuantizedKVLayer, quantized_kv_attention

from .cli import add_repeats_option, bench_parser, parse_bench_args, write_report
from .compare_llama import machine_info
from .kv_cache import cache_bytes


HEADS, KV_HEADS, HEAD_DIM, LAYERS = 9, 3, 64, 30  # SmolLM2-135M
FP32_BYTES_PER_TOKEN = 2 * KV_HEADS * HEAD_DIM * 4  # keys and values of one layer


@dataclass
class Plan:
    contexts: tuple[int, ...] = (512, 2048, 8192)
    steps: int = 32  # decode steps per timed run (= HQQ's residual window: one flush per run)
    repeats: int = 3
    perplexity: bool = False

    @classmethod
    def quick(cls) -> "Plan":
        return cls(contexts=(256,), steps=8, repeats=2)


@dataclass(frozen=True)
class Implementation:
    name: str
    make_layer: callable = field(repr=False)
    attention: callable = field(repr=False)


def implementations(steps: int) -> list[Implementation]:
    hqq = {"axis_key": 1, "axis_value": 1, "q_group_size": HEAD_DIM, "residual_length": steps}
    sdpa = sdpa_attention_forward
    return [
        Implementation("fp32 DynamicCache + sdpa", DynamicLayer, sdpa),
        Implementation("HQQ int8 QuantizedCache + sdpa", lambda: HQQQuantizedLayer(nbits=8, **hqq), sdpa),
        Implementation("HQQ int4 QuantizedCache + sdpa", lambda: HQQQuantizedLayer(nbits=4, **hqq), sdpa),
        Implementation("ours int8 + agillm_qkv", lambda: QuantizedKVLayer(8), quantized_kv_attention),
        Implementation("ours int4 + agillm_qkv", lambda: QuantizedKVLayer(4), quantized_kv_attention),
        Implementation("ours int4 g32 + agillm_qkv", lambda: QuantizedKVLayer(4, 32), quantized_kv_attention),
        Implementation("ours int4 g32 refined + agillm_qkv", lambda: QuantizedKVLayer(4, 32, refine_zero_points=True),
                       quantized_kv_attention),
    ]


class AttentionShapes(nn.Module):
    """What the attention functions read from the attention module: GQA groups, causality, training flag."""

    num_key_value_groups = HEADS // KV_HEADS
    is_causal = True
    layer_idx = 0


def decode_inputs(steps: int, generator: torch.Generator) -> list[tuple[torch.Tensor, ...]]:
    """`steps` (query, key, value) triples of one new token each."""
    return [(torch.randn(1, HEADS, 1, HEAD_DIM, generator=generator),
             torch.randn(1, KV_HEADS, 1, HEAD_DIM, generator=generator),
             torch.randn(1, KV_HEADS, 1, HEAD_DIM, generator=generator)) for _ in range(steps)]  # fmt: skip


def filled_layer(implementation: Implementation, context: int, warmup: tuple[torch.Tensor, ...], seed: int):
    """A layer holding `context` random tokens (a prefill), plus one untimed decode step (our buffer's one-time
    growth past the prefill's size happens there, amortised over the next `context` tokens in real use)."""
    generator = torch.Generator().manual_seed(seed)
    layer = implementation.make_layer()
    layer.update(torch.randn(1, KV_HEADS, context, HEAD_DIM, generator=generator),
                 torch.randn(1, KV_HEADS, context, HEAD_DIM, generator=generator))  # fmt: skip
    run_steps(layer, implementation, [warmup])
    return layer


@torch.inference_mode()
def run_steps(layer, implementation: Implementation, inputs) -> None:
    module = AttentionShapes().eval()
    for query, key, value in inputs:
        keys, values = layer.update(key, value)
        implementation.attention(module, query, keys, values, None, scaling=HEAD_DIM**-0.5)


class BytesTouched(TorchDispatchMode):
    """Sums the bytes of every tensor each torch operation reads (inputs) and writes (outputs); view operations
    move no data and are not counted. An upper bound on traffic: an operation may read a tensor argument in part."""

    def __init__(self):
        super().__init__()
        self.read = self.written = self.largest_float = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        inputs, outputs = tree_flatten((args, kwargs))[0], tree_flatten(result)[0]
        if func.is_view and _storages(outputs) <= _storages(inputs):  # slicing, reshaping: no data moves
            return result
        self.read += sum(_nbytes(tensor) for tensor in inputs)
        self.written += sum(_nbytes(tensor) for tensor in outputs)
        floats = [_nbytes(tensor) for tensor in outputs if isinstance(tensor, torch.Tensor)
                  and tensor.is_floating_point()]  # fmt: skip
        self.largest_float = max([self.largest_float, *floats])
        return result


def _storages(values) -> set[int]:
    return {value.untyped_storage().data_ptr() for value in values if isinstance(value, torch.Tensor)}


def _nbytes(value) -> int:
    if not isinstance(value, torch.Tensor) or type(value) is not torch.Tensor:
        return 0  # wrapper subclasses are counted through the plain tensors their own operations touch
    return value.numel() * value.element_size()


def stored_bytes_per_token(layer, tokens: int) -> float:
    if isinstance(layer, QuantizedKVLayer):
        return layer.nbytes() / tokens
    return cache_bytes(Cache(layers=[layer])) / tokens


def measure_context(context: int, plan: Plan, chosen: list[Implementation]) -> list[dict]:
    generator = torch.Generator().manual_seed(context)
    warmup, *_ = decode_inputs(1, generator)
    inputs = decode_inputs(plan.steps, generator)
    seconds = {impl.name: [] for impl in chosen}
    for repeat in range(plan.repeats):
        for impl in chosen:  # interleaved: each repeat runs every implementation once
            layer = filled_layer(impl, context, warmup, seed=repeat)
            start = time.perf_counter()
            run_steps(layer, impl, inputs)
            seconds[impl.name].append((time.perf_counter() - start) / plan.steps)
    rows = []
    for impl in chosen:
        layer = filled_layer(impl, context, warmup, seed=0)
        counter = BytesTouched()
        with counter:
            run_steps(layer, impl, inputs)
        step = statistics.median(seconds[impl.name])
        rows.append({
            "context": context, "implementation": impl.name,
            "step_ms": 1e3 * step, "model_step_ms": 1e3 * step * LAYERS,
            "step_ms_runs": [round(1e3 * value, 4) for value in seconds[impl.name]],
            "bytes_read_per_step": counter.read / plan.steps, "bytes_written_per_step": counter.written / plan.steps,
            "largest_float_tensor_bytes": counter.largest_float,
            "stored_bytes_per_token": stored_bytes_per_token(layer, context + 1 + plan.steps),
        })  # fmt: skip
        # What the attention must read of the cache: ours its codes, scales and offsets; the others a full-precision
        # cache (DynamicCache's own, HQQ's freshly dequantized copy).
        ours = impl.attention is quantized_kv_attention
        stored = rows[-1]["stored_bytes_per_token"] if ours else FP32_BYTES_PER_TOKEN
        rows[-1]["attention_cache_read_bytes"] = stored * (context + plan.steps // 2)
        touched = (counter.read + counter.written) / plan.steps / 2**20
        print(f"  {context:>6} {impl.name:<32} {rows[-1]['step_ms']:8.3f} ms/step/layer  "
              f"{touched:8.2f} MiB touched/step", flush=True)  # fmt: skip
    baseline = rows[0]
    for row in rows:
        row["time_vs_fp32"] = row["step_ms"] / baseline["step_ms"]
        row["bytes_vs_fp32"] = ((row["bytes_read_per_step"] + row["bytes_written_per_step"])
                                / (baseline["bytes_read_per_step"] + baseline["bytes_written_per_step"]))  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------------- perplexity


PERPLEXITY_CACHES = {
    "ours int8": {"nbits": 8},
    "ours int4": {"nbits": 4},
    "ours int4 g32": {"nbits": 4, "group_size": 32},
    "ours int4 g16": {"nbits": 4, "group_size": 16},
    "ours int4 refined": {"nbits": 4, "refine_zero_points": True},
    "ours int4 g32 refined": {"nbits": 4, "group_size": 32, "refine_zero_points": True},
    "ours int4 g16 refined": {"nbits": 4, "group_size": 16, "refine_zero_points": True},
}


def smollm2_perplexity(scratch: Path) -> tuple[list[dict], dict]:
    """Held-out perplexity of SmolLM2-135M through our caches, with bench/kv_table.py's harness and plan."""
    from convert.smollm2 import convert_smollm2
    from transformers import AutoTokenizer

    from modeling_agillm import AgillmForCausalLM

    from .kv_table import Plan as TablePlan
    from .kv_table import exact_prefix_cache, held_out_windows, replay_prefix, score_continuation

    quantized_kv.register()
    table = TablePlan()
    folder = convert_smollm2(scratch / "smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AgillmForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    windows = held_out_windows(tokenizer, table.smollm2_windows, table.window_tokens)
    exact_prefix = exact_prefix_cache(model, windows, table.prefix_tokens)
    rows = []
    for name, settings in {"fp32": None, **PERPLEXITY_CACHES}.items():
        model.set_attn_implementation("sdpa" if settings is None else quantized_kv.ATTENTION_NAME)
        if settings is None:
            empty = Cache(layers=[DynamicLayer() for _ in range(model.config.num_hidden_layers)])
        else:
            empty = QuantizedKVCache(model.config, **settings)
        cache = replay_prefix(exact_prefix, empty)
        result = score_continuation(model, windows, cache, table.prefix_tokens, table.chunk_tokens)
        if settings is not None:  # our buffers' filled part (kv_table's count walks plain tensors only)
            result["bytes_per_token"] = cache.nbytes() / (windows.shape[0] * windows.shape[1])
        rows.append({"cache": name, **result})
        print(f"  SmolLM2 {name}: perplexity {result['perplexity']:.3f}, {result['bytes_per_token']:,.0f} bytes/token",
              flush=True)  # fmt: skip
    for row in rows:
        row["perplexity_change_percent"] = 100 * (row["perplexity"] / rows[0]["perplexity"] - 1)
    return rows, asdict(table)


def hqq_reference_rows() -> list[dict]:
    """bench/kv_table.json's SmolLM2 rows of transformers' HQQ `QuantizedCache` (the same harness and windows)."""
    from .kv_table import CACHE_DESCRIPTIONS, HQQ_SETTINGS

    path = Path(__file__).with_name("kv_table.json")
    if not path.exists():
        return []
    rows = json.loads(path.read_text())["rows"]
    return [{**row, "description": CACHE_DESCRIPTIONS[row["cache"]]} for row in rows
            if row["model"] == "SmolLM2-135M (GQA 9/3)" and row["cache"] in HQQ_SETTINGS]  # fmt: skip


# --------------------------------------------------------------------------------------------------- report


def speed_against(row: dict, other: dict) -> str:
    ratio = other["step_ms"] / row["step_ms"]
    return f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"


def summary(rows: list[dict], perplexity_rows: list[dict]) -> list[str]:
    """Ratios at the longest context, and which of our caches meet issue 4's bytes / perplexity target."""
    longest = max(row["context"] for row in rows)
    at_longest = {row["implementation"]: row for row in rows if row["context"] == longest}
    fp32 = at_longest["fp32 DynamicCache + sdpa"]
    lines = []
    for name, row in at_longest.items():
        if name.startswith("ours"):
            bits = "int8" if "int8" in name else "int4"
            hqq = at_longest[f"HQQ {bits} QuantizedCache + sdpa"]
            lines.append(f"- {longest:,} cached tokens, {name}: {row['step_ms']:.2f} ms per step and layer, "
                         f"{speed_against(row, fp32)} than fp32 `DynamicCache` + sdpa and "
                         f"{speed_against(row, hqq)} than HQQ {bits} `QuantizedCache`; its attention reads "
                         f"{row['attention_cache_read_bytes'] / fp32['attention_cache_read_bytes']:.2f}x the bytes of "
                         "the fp32 cache.")  # fmt: skip
    if perplexity_rows:
        baseline = perplexity_rows[0]["bytes_per_token"]
        for row in perplexity_rows[1:]:
            ratio = baseline / row["bytes_per_token"]
            meets = ratio >= 4 and row["perplexity_change_percent"] <= 2
            lines.append(f"- SmolLM2 through {row['cache']}: {ratio:.2f}x fewer bytes than fp32, perplexity "
                         f"{row['perplexity_change_percent']:+.2f}%: {'meets' if meets else 'misses'} issue 4's "
                         "target (>= 4x fewer bytes at <= 2% more perplexity).")  # fmt: skip
    return lines


def markdown_report(rows, perplexity_rows, machine, plan: Plan, seconds: float, quick: bool) -> str:
    lines = ["# Decode over an int8 / int4 KV cache without dequantizing it", ""]
    if quick:
        lines += ["**Quick run**: checks that the bench runs; the numbers mean little.", ""]
    lines += ["## Decode step, one layer of SmolLM2-135M (9 query / 3 key-value heads of 64, batch 1)", "",
              "| cached tokens | cache + attention | ms / step / layer | x30 layers | vs fp32 | cache MiB read by "
              "attention / step | all tensor MiB touched / step | vs fp32 | largest fp tensor made (KiB) | "
              "stored bytes / token |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in rows:
        touched = (row["bytes_read_per_step"] + row["bytes_written_per_step"]) / 2**20
        lines.append(f"| {row['context']:,} | {row['implementation']} | {row['step_ms']:.3f} | "
                     f"{row['model_step_ms']:.1f} | {row['time_vs_fp32']:.2f}x | "
                     f"{row['attention_cache_read_bytes'] / 2**20:.2f} | {touched:.2f} | "
                     f"{row['bytes_vs_fp32']:.2f}x | {row['largest_float_tensor_bytes'] / 2**10:,.0f} | "
                     f"{row['stored_bytes_per_token']:,.0f} |")  # fmt: skip
    if perplexity_rows:
        lines += ["", "## Held-out perplexity of SmolLM2-135M read through the cache", "",
                  "| cache | bytes / token (30 layers) | held-out ppl | ppl change | source |",
                  "|---|---:|---:|---:|---|"]  # fmt: skip
        for row in perplexity_rows:
            lines.append(f"| {row['cache']} | {row['bytes_per_token']:,.0f} | {row['perplexity']:.3f} | "
                         f"{row['perplexity_change_percent']:+.2f}% | this run |")  # fmt: skip
        for row in hqq_reference_rows():
            lines.append(f"| {row['description']} | {row['bytes_per_token']:,.0f} | "
                         f"{row['perplexity']:.3f} | {row['perplexity_change_percent']:+.2f}% | "
                         "bench/kv_table.md |")  # fmt: skip
    lines += ["", "## Summary", "", *summary(rows, perplexity_rows)]
    lines += [
        "", "## Method", "",
        f"- One attention layer, a cache prefilled with `context` random tokens, one untimed decode step, then "
        f"{plan.steps} timed decode steps (cache `update` with the new token + attention of its query). "
        f"{plan.repeats} repeats, implementations interleaved within each repeat, median per step reported "
        "(all runs in the JSON). x30 layers: the single layer's time times SmolLM2's 30 layers (attention and cache "
        "only; the model's matmuls are the same for every cache).",
        "- cache MiB read by attention / step: what the attention has to read of the cache (mid-run length): ours "
        "its stored codes, scales and offsets; fp32 and HQQ a full-precision cache (HQQ's dequantized copy).",
        "- largest fp tensor made: the largest floating-point tensor any operation of a step returns (ours: a tile "
        "of codes cast to fp32 at most, never the cache; fp32 and HQQ: the whole cache).",
        "- all tensor MiB touched / step: the bytes of every tensor each torch operation reads and writes (a "
        "`TorchDispatchMode` over the same steps, averaged per step): it counts the cache update (fp32: `torch.cat` "
        "copies the whole "
        "cache; HQQ: dequantizes the whole cache, concatenates it with the residual window, re-quantizes at the "
        "flush; ours: quantizes one token into a preallocated buffer) and the attention (fp32 / HQQ: sdpa over the "
        "full-precision cache; ours: the int8/int4 codes and fp32 scales and offsets, plus the fp32 tile temporaries "
        "each tile of codes is cast into for the matmuls, counted as traffic although they stay in a core's cache).",
        "- stored bytes / token: the cache's storage per token and layer (fp32 K+V: 2 x 3 x 64 x 4 = 1,536; "
        "int8 with an fp32 scale and offset per head and token: 2 x 3 x (64 + 8) = 432; int4: 2 x 3 x (32 + 8) = 240; "
        "int4 g32: 2 x 3 x (32 + 16) = 288). HQQ's figure includes its residual window at the end of the run.",
        "- Ours: asymmetric min-max rounding per token, head and group (`x ~ code * scale + offset`); appending "
        "quantizes only the new token; the buffer doubles when full (amortised one token copy per token). "
        "`refined`: each group's offset then refined by HQQ's zero-point search (`refine_zero_points=True`, 20 "
        "iterations on every appended token).",
    ]
    if perplexity_rows:
        lines.append("- Perplexity: bench/kv_table.py's harness (`exact_prefix_cache`, `replay_prefix`, "
                     "`score_continuation`, same 8 held-out windows of 256 tokens, 128-token prefix, then 64-token "
                     "chunks): each chunk reads the earlier chunks from the quantized cache and its own tokens "
                     "exact, like the HQQ rows there (residual window = chunk). Our rows use the `agillm_qkv` "
                     "attention (chunks of 64 queries go through the same tile path).")  # fmt: skip
    lines.append(f"- Machine: {machine['cpu']}, {machine['torch_threads']} torch threads (a 2-core machine shared "
                 f"with other jobs: timings are noisy), torch {machine['torch']}, "
                 f"transformers {machine['transformers']}, "
                 f"{machine['date']}. Whole bench: {seconds / 60:.1f} min.")  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = bench_parser("quantized_kv", __doc__.splitlines()[0], quick_help="one short context, 8 steps, 2 repeats")
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="cached tokens (default 512 2048 8192)")
    add_repeats_option(parser, "timed runs per implementation (default 3)")
    parser.add_argument("--perplexity", action="store_true", help="add SmolLM2's held-out perplexity (converts it)")
    return parse_bench_args(parser, "quantized_kv", argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = Plan.quick() if args.quick else Plan()
    if args.contexts:
        plan.contexts = tuple(args.contexts)
    if args.repeats is not None:
        plan.repeats = args.repeats
    plan.perplexity = args.perplexity
    start = time.perf_counter()
    chosen = implementations(plan.steps)
    rows = []
    for context in plan.contexts:
        rows += measure_context(context, plan, chosen)
    perplexity_rows, table_plan = [], None
    if plan.perplexity:
        with tempfile.TemporaryDirectory(prefix="agillm-quantized-kv-") as scratch:
            perplexity_rows, table_plan = smollm2_perplexity(Path(scratch))
    machine = machine_info(args.threads)
    report = markdown_report(rows, perplexity_rows, machine, plan, time.perf_counter() - start, args.quick)
    raw = {"machine": machine, "plan": asdict(plan), "kv_table_plan": table_plan, "decode": rows,
           "perplexity": perplexity_rows}  # fmt: skip
    write_report(args.output, report, raw, echo_report=True)
    return raw


if __name__ == "__main__":
    main()
