"""CPU decode of SmolLM2-135M near the memory roofline: fp32, bf16, weight-only int8 / int4; eager, compiled, AOT.

Batch-1 greedy decode reads every weight once per token, so its ceiling is memory bandwidth / bytes per token. For
each variant, one process, runs interleaved round by round (warm-up round discarded, median of the timed rounds):
    variant          weights (fp32, bf16 = `model.to(bfloat16)`, int8 / int4 = `kernels.quantize_weights`, packed
                     ATen kernels with bf16 activations) x decode path: eager `generate` (dynamic cache),
                     `generate(cache_implementation="static", compile_config=...)` (inductor compiles the decode step),
                     or `generate(custom_generate=ExportedDecoder)` (`kernels/exported_decoder.py`: the model
                     exported and compiled ahead of time by AOTInductor, static cache inside; no Python per step but
                     the sampling loop);
    tokens/s         greedy `generate` of `new_tokens` after a `prompt_tokens` random prompt, counting only the
                     single-token decode steps (`bench.timing.DecodeClock`, prefill excluded);
    bandwidth        read bandwidth measured in every round, between the decode runs: `torch.sum` over a 256 MiB
                     fp32 array (8x the L3 cache) with the same thread count; the roofline uses the highest median
                     read rate of the run, this one's or a decode's (bytes per step x tokens/s), whichever is higher;
    roofline         that bandwidth / bytes read per decode step; the bytes are those of every weight the step reads in
                     the format used (an untied or quantized head reads its own matrix, the embedding one row) plus
                     the KV cache at the step's context length (the whole static cache for compiled / AOT runs);
    greedy tokens    compared with fp32 eager: "same" or the first new-token position that differs.
llama.cpp (optional, `--llama-cpp-python PATH`: a Python with llama-cpp-python, e.g. its own venv): the same GGUF
file the fp32 weights come from, converted by llama.cpp's quantizer to F32 / BF16 / Q8_0 (Q4_1 is the shipped file),
runs the same prompt in a worker process (`bench/cpu_decode_llama_worker.py`) interleaved with the rest.
Writes `bench/cpu_decode.md` / `.json`. Usage: `python -m bench cpu_decode [--quick] [--threads N]`.
"""

import json
import os
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import CompileConfig, LogitsProcessorList

from kernels.exported_decoder import ExportedDecoder
from kernels.quantized_linear import _WeightOnlyLinear, quantize_weights
from modeling_agillm import AgillmForCausalLM

from .cli import BENCH_DIR, REPO_ROOT, add_repeats_option, bench_parser, parse_bench_args, write_report
from .compare_llama import machine_info
from .setups import SETUPS, build_model
from .timing import DecodeClock


BANDWIDTH_ARRAY_BYTES = 256 * 2**20
LLAMA_WORKER = BENCH_DIR / "cpu_decode_llama_worker.py"
LLAMA_DIR = REPO_ROOT / "outputs/bench/llama_cpp"  # llama.cpp's converted GGUF files (ignored by git)
AOT_DIR = REPO_ROOT / "outputs/bench/aot"  # AOTInductor packages (ignored by git)


@dataclass
class Plan:
    setup: str = "smollm2"
    prompt_tokens: int = 32
    new_tokens: int = 64
    int4_group_size: int = 32  # 4 bits + a bf16 scale and zero per 32 weights = 5 bits/weight, as llama.cpp's Q4_1
    repeats: int = 5
    compile_mode: str | None = None  # CompileConfig's mode; None = its default

    @classmethod
    def quick(cls) -> "Plan":
        return cls(setup="small", new_tokens=16, repeats=2)


@dataclass
class Variant:
    """One row: a weight format and a decode path; `llama_format` marks a llama.cpp row."""

    name: str
    weights: str  # fp32 / bf16 / int8 / int4
    path: str = "eager"  # eager / compile (static cache + torch.compile) / aot (ExportedDecoder)
    llama_format: str | None = None
    tokens_per_second: list[float] = field(default_factory=list)
    bytes_per_step: float = 0.0
    greedy: list[int] = field(default_factory=list)


AGILLM_VARIANTS = [
    ("fp32 eager", "fp32", "eager"),
    ("fp32 static + compile", "fp32", "compile"),
    ("fp32 AOTInductor", "fp32", "aot"),
    ("bf16 eager", "bf16", "eager"),
    ("bf16 static + compile", "bf16", "compile"),
    ("bf16 AOTInductor", "bf16", "aot"),
    ("int8 eager", "int8", "eager"),
    ("int8 static + compile", "int8", "compile"),
    ("int8 AOTInductor", "int8", "aot"),
    ("int8 AOTInductor + max_autotune", "int8", "aot-tuned"),  # inductor's C++ GEMM template, when it times faster
    ("int4 eager", "int4", "eager"),
    ("int4 static + compile", "int4", "compile"),
    ("int4 AOTInductor", "int4", "aot"),
    ("int4 group 64 static + compile", "int4-g64", "compile"),  # 4.5 bits/weight: fewer scales than group 32
    ("int4 group 64 AOTInductor", "int4-g64", "aot"),
]
LLAMA_FORMATS = {"fp32": "F32", "bf16": "BF16", "int8": "Q8_0", "int4": "Q4_1"}  # same weight precision


# --------------------------------------------------------------------------------------------------- models


def build_variant_models(setup, plan: Plan) -> dict[str, AgillmForCausalLM]:
    """One model per weight format (a model serves its eager and compiled rows: `generate` keeps the compiled
    forward apart from the eager one)."""
    models = {}
    for weights in ("fp32", "bf16", "int8", "int4", "int4-g64"):
        model = build_model(AgillmForCausalLM, setup.agillm_config, setup.state_dict)
        if weights == "bf16":
            model = model.to(torch.bfloat16)
        elif weights == "int8":
            quantize_weights(model, bits=8)
        elif weights == "int4":
            quantize_weights(model, bits=4, group_size=plan.int4_group_size)
        elif weights == "int4-g64":
            quantize_weights(model, bits=4, group_size=64)
        # llama.cpp's worker writes exactly `new_tokens` tokens with no end-of-sequence check; so does `generate`
        # without an EOS id (forcing the length with `min_new_tokens` instead would add a vocabulary-wide `isin`
        # per step, ~1.5 ms of a 5 ms int4 step)
        model.generation_config.eos_token_id = None
        models[weights] = model.eval()
    return models


def bytes_per_decode_step(model: AgillmForCausalLM, context: float) -> float:
    """Bytes of every tensor one decode step reads: all weights once, except the embedding's single row (unless the
    head multiplies by the same tensor), plus K and V of `context` cached positions."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()] if t.numel()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if getattr(head, "weight", None) is not embedding:  # quantized or untied head: the lookup reads one row
        total -= embedding.numel() * embedding.element_size()
        total += embedding.shape[1] * embedding.element_size()
    config = model.config
    kv_width = 2 * config.num_key_value_heads * config.head_dim
    kv_bytes = config.num_hidden_layers * kv_width * context * model.model.embed_tokens.weight.element_size()
    return float(total + kv_bytes)


# --------------------------------------------------------------------------------------------------- timing


def matmuls_alone(model: AgillmForCausalLM) -> float:
    """Decode steps/s of the packed-int matmuls alone: every quantized linear of the model once, in model order, on
    one bf16 row (a decode step's matmuls with nothing else: no norms, attention, cache or Python model code). The
    ceiling the torch kernel puts on a whole decode step."""
    layers = [module for module in model.modules() if isinstance(module, _WeightOnlyLinear)]
    rows = [torch.randn(1, layer.in_features, dtype=layer.compute_dtype) for layer in layers]
    with torch.inference_mode():
        start = time.perf_counter()
        for layer, row in zip(layers, rows):
            layer._matmul(row)
        return 1.0 / (time.perf_counter() - start)


def read_bandwidth(buffer: torch.Tensor) -> float:
    """Bytes/s of one pass of `torch.sum` over `buffer` (uses torch's current thread count)."""
    start = time.perf_counter()
    buffer.sum()
    return buffer.numel() * buffer.element_size() / (time.perf_counter() - start)


def generate_kwargs(input_ids: torch.Tensor, plan: Plan, path: str, decoder: ExportedDecoder | None = None) -> dict:
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "do_sample": False,
        "max_new_tokens": plan.new_tokens,
        "pad_token_id": 0,
    }
    if path.startswith("aot"):
        kwargs["custom_generate"] = decoder
    elif path == "compile":
        compile_config = CompileConfig(fullgraph=True) if plan.compile_mode is None else CompileConfig(
            fullgraph=True, mode=plan.compile_mode)
        compile_config._compile_all_devices = True  # `generate` compiles only on accelerators unless told to
        kwargs.update(cache_implementation="static", compile_config=compile_config)
    return kwargs


def decode_once(model, kwargs: dict) -> tuple[float, list[int]]:
    """(tokens/s over the decode steps, the new tokens) of one greedy `generate`."""
    clock = DecodeClock()
    with torch.inference_mode():
        output = model.generate(**kwargs, logits_processor=LogitsProcessorList([clock]))
    steps, seconds = clock.decode_span()
    return steps / seconds, output[0, kwargs["input_ids"].shape[1]:].tolist()


class LlamaCppWorker:
    """A llama.cpp process holding one GGUF file, asked for one greedy decode per call."""

    def __init__(self, python: str, gguf: Path, threads: int):
        self.process = subprocess.Popen(
            [python, str(LLAMA_WORKER), "serve", str(gguf), str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        if json.loads(self.process.stdout.readline()).get("ready") is not True:
            raise RuntimeError(f"llama.cpp worker for {gguf} did not start")

    def decode(self, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
        self.process.stdin.write(json.dumps({"prompt": prompt, "new_tokens": new_tokens}) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        return answer["decode_steps"] / answer["seconds"], answer["tokens"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def llama_cpp_available(python: str | None) -> bool:
    if not python:
        return False
    probe = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True)
    return probe.returncode == 0


def llama_cpp_file(python: str, source: Path, ftype: str) -> Path:
    """`source` converted to `ftype` by llama.cpp's own quantizer (cached in outputs/bench/llama_cpp)."""
    if source.name.endswith(f".{ftype}.gguf"):
        return source
    target = LLAMA_DIR / f"{source.stem.rsplit('.', 1)[0]}.{ftype}.gguf"
    if not target.is_file():
        LLAMA_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run([python, str(LLAMA_WORKER), "quantize", str(source), str(target), ftype], check=True,
                       capture_output=True)
    return target


def gguf_bytes_per_step(gguf: Path, model: AgillmForCausalLM, context: float) -> float:
    """llama.cpp's tied SmolLM2 reads every tensor of the file once per step (its head is the embedding matrix):
    the file size (metadata included, < 1%), plus the KV cache as AGILLM's fp32 model holds it."""
    return gguf.stat().st_size + bytes_per_decode_step(model, context) - bytes_per_decode_step(model, 0.0)


# --------------------------------------------------------------------------------------------------- bench


def run(plan: Plan, threads: int, llama_python: str | None) -> tuple[list[Variant], list[float], dict, dict]:
    setup = SETUPS[plan.setup]()
    models = build_variant_models(setup, plan)
    prompt = torch.randint(3, setup.agillm_config.vocab_size, (1, plan.prompt_tokens),
                           generator=torch.Generator().manual_seed(1))
    dynamic_context = plan.prompt_tokens + plan.new_tokens / 2  # mean context of the decode steps
    static_context = plan.prompt_tokens + plan.new_tokens  # generate's static cache length: SDPA reads all of it

    variants = [Variant(name, weights, path) for name, weights, path in AGILLM_VARIANTS]
    for variant in variants:
        variant.bytes_per_step = bytes_per_decode_step(
            models[variant.weights], dynamic_context if variant.path == "eager" else static_context)
    decoders, first_call_seconds = compile_decoders(models, plan.setup, static_context)
    workers = {}
    if plan.setup == "smollm2" and llama_cpp_available(llama_python):
        from convert.smollm2 import smollm2_gguf_path

        for weights, ftype in LLAMA_FORMATS.items():
            gguf = llama_cpp_file(llama_python, smollm2_gguf_path(), ftype)
            workers[ftype] = LlamaCppWorker(llama_python, gguf, threads)
            variant = Variant(f"llama.cpp {ftype}", weights, llama_format=ftype)
            variant.bytes_per_step = gguf_bytes_per_step(gguf, models["fp32"], dynamic_context)
            variants.append(variant)

    for variant in variants:  # warm-up round: compiles, fills caches; not timed
        start = time.perf_counter()
        decode_variant(variant, models, decoders, workers, prompt, plan, record=True)
        first_call_seconds[variant.name] = first_call_seconds.get(variant.name, 0.0) + time.perf_counter() - start
        print(f"[warm-up] {variant.name}: {first_call_seconds[variant.name]:.1f} s", flush=True)

    buffer = torch.ones(BANDWIDTH_ARRAY_BYTES // 4)
    bandwidths = []
    matmul_floor = {weights: [] for weights in ("int8", "int4")}
    for round_index in range(plan.repeats):
        bandwidths.append(statistics.median(read_bandwidth(buffer) for _ in range(3)))
        for weights, speeds in matmul_floor.items():
            speeds.append(statistics.median(matmuls_alone(models[weights]) for _ in range(5)))
        for variant in variants:
            decode_variant(variant, models, decoders, workers, prompt, plan)
        print(f"[round {round_index + 1}/{plan.repeats}] bandwidth {bandwidths[-1] / 1e9:.1f} GB/s; "
              + ", ".join(f"{v.name} {v.tokens_per_second[-1]:.1f}" for v in variants), flush=True)
    for worker in workers.values():
        worker.close()
    return variants, bandwidths, first_call_seconds, matmul_floor


def compile_decoders(models, setup_name: str, max_cache_len: int) -> tuple[dict, dict]:
    """An `ExportedDecoder` per AOTInductor row (by row name), and the seconds each took to compile."""
    decoders, seconds = {}, {}
    for name, weights, path in AGILLM_VARIANTS:
        if path.startswith("aot"):
            start = time.perf_counter()
            decoders[name] = ExportedDecoder.compile(
                models[weights], max_cache_len, AOT_DIR / f"{setup_name}-{weights}-{path}.pt2",
                max_autotune=path == "aot-tuned")
            seconds[name] = time.perf_counter() - start
            print(f"[compile] {name}: {seconds[name]:.1f} s", flush=True)
    return decoders, seconds


def decode_variant(variant: Variant, models, decoders, workers, prompt, plan: Plan, record: bool = False) -> None:
    if variant.llama_format is not None:
        speed, tokens = workers[variant.llama_format].decode(prompt[0].tolist(), plan.new_tokens)
    else:
        kwargs = generate_kwargs(prompt, plan, variant.path, decoders.get(variant.name))
        speed, tokens = decode_once(models[variant.weights], kwargs)
    if record:
        variant.greedy = tokens
    else:
        variant.tokens_per_second.append(speed)


# --------------------------------------------------------------------------------------------------- report


def first_divergence(tokens: list[int], reference: list[int]) -> str:
    for position, (token, expected) in enumerate(zip(tokens, reference)):
        if token != expected:
            return f"differs from token {position}"
    return "same"


def streaming_bandwidth(variants: list[Variant], bandwidths: list[float], pick=statistics.median) -> tuple[float, str]:
    """(bytes/s, who reached it): the highest read rate of the run, `torch.sum`'s or a decode's (bytes per step x
    tokens/s), `pick` = median or max over the rounds. `torch.sum` alone does not reach the peak (llama.cpp's F32
    decode streams faster), and a roofline below what real code reaches would overstate every percentage."""
    rates = [(pick(bandwidths), "torch.sum")]
    rates += [(pick(v.tokens_per_second) * v.bytes_per_step, v.name) for v in variants]
    return max(rates)


def table_rows(variants: list[Variant], bandwidths: list[float]) -> list[dict]:
    """Medians (the reference figures) and bests (each variant's fastest round against the highest bandwidth seen:
    what a quiet machine allows, since other processes can only slow a run down)."""
    baseline = variants[0]  # fp32 eager
    reference = baseline.greedy
    llama = {v.weights: v for v in variants if v.llama_format}
    median_bandwidth, best_bandwidth = (streaming_bandwidth(variants, bandwidths, pick)[0]
                                        for pick in (statistics.median, max))
    rows = []
    for variant in variants:
        speed, best = statistics.median(variant.tokens_per_second), max(variant.tokens_per_second)
        roofline = median_bandwidth / variant.bytes_per_step
        same_precision = llama.get(variant.weights) if not variant.llama_format else None
        rows.append({
            "variant": variant.name,
            "tokens_per_second": speed,
            "best_tokens_per_second": best,
            "runs": variant.tokens_per_second,
            "vs_fp32_eager": speed / statistics.median(baseline.tokens_per_second),
            "mib_per_step": variant.bytes_per_step / 2**20,
            "roofline_tokens_per_second": roofline,
            "fraction_of_roofline": speed / roofline,
            "best_fraction_of_roofline": best / (best_bandwidth / variant.bytes_per_step),
            "vs_llama_cpp_same_precision": (
                speed / statistics.median(same_precision.tokens_per_second) if same_precision else None),
            "best_vs_llama_cpp_same_precision": (
                best / max(same_precision.tokens_per_second) if same_precision else None),
            "greedy_vs_fp32": first_divergence(variant.greedy, reference),
        })
    return rows


def ratio_cell(ratio: float | None) -> str:
    return f" {ratio:.2f}x |" if ratio is not None else " |"


def markdown_report(rows, bandwidths, streaming: tuple[float, str], first_calls, plan: Plan, machine: dict,
                    quick: bool, seconds: float) -> str:
    command = "python -m bench cpu_decode" + (" --quick" if quick else "")
    caveat = " (**quick run: small random model, reduced runs; not reference numbers**)" if quick else ""
    has_llama = any(row["vs_llama_cpp_same_precision"] is not None for row in rows)
    header = "| variant | tok/s | vs fp32 eager | MiB read / step | roofline tok/s | % of roofline |"
    header += " vs llama.cpp (same precision) |" if has_llama else ""
    header += " best tok/s | best % of roofline |" + (" best vs llama.cpp |" if has_llama else "")
    header += " greedy vs fp32 eager |"
    lines = [
        f"# CPU decode, {plan.setup}: fp32 / bf16 / int8 / int4, eager and static cache + compile",
        "",
        f"Generated by `{command}`{caveat} in {seconds / 60:.1f} min.",
        "",
        header,
        "| --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if has_llama else "") + " ---: | ---: |"
        + (" ---: |" if has_llama else "") + " --- |",
    ]
    for row in rows:
        line = (f"| {row['variant']} | {row['tokens_per_second']:.1f} | {row['vs_fp32_eager']:.2f}x "
                f"| {row['mib_per_step']:.1f} | {row['roofline_tokens_per_second']:.0f} "
                f"| {100 * row['fraction_of_roofline']:.0f}% |")
        if has_llama:
            line += ratio_cell(row["vs_llama_cpp_same_precision"])
        line += f" {row['best_tokens_per_second']:.1f} | {100 * row['best_fraction_of_roofline']:.0f}% |"
        if has_llama:
            line += ratio_cell(row["best_vs_llama_cpp_same_precision"])
        lines.append(line + f" {row['greedy_vs_fp32']} |")
    bandwidth = statistics.median(bandwidths)
    lines += [
        "",
        f"Roofline bandwidth: **{streaming[0] / 1e9:.1f} GB/s**, the highest median read rate of the run "
        f"({streaming[1]}). Read bandwidth of `torch.sum` over {BANDWIDTH_ARRAY_BYTES // 2**20} MiB "
        f"({machine['torch_threads']} threads): median {bandwidth / 1e9:.1f} GB/s over the rounds (min "
        f"{min(bandwidths) / 1e9:.1f}, max {max(bandwidths) / 1e9:.1f}).",
        "",
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, `torch.set_num_threads"
        f"({machine['torch_threads']})`; Python {machine['python']}, torch {machine['torch']}, transformers "
        f"{machine['transformers']}; {machine['date']}.",
        "",
        "Method:",
        f"- batch 1, greedy, {plan.new_tokens} new tokens after a {plan.prompt_tokens}-token random prompt; tok/s "
        f"over the single-token decode steps only; one warm-up round (compilation included), then the median of "
        f"{plan.repeats} rounds, every variant once per round in the order of the table.",
        "- int8: `kernels.quantize_weights(model, bits=8)`: symmetric per-output-channel int8, "
        "`aten._weight_int8pack_mm`. int4: `bits=4, group_size="
        f"{plan.int4_group_size}` (64 in the \"group 64\" row): asymmetric group-wise, "
        "`aten._weight_int4pack_mm_for_cpu`. Both quantize every linear layer including the tied head (the "
        "embedding lookup stays fp32) and run the kernels with bf16 activations; norms, attention and the residual "
        "stream stay fp32.",
        "- static + compile: `generate(cache_implementation=\"static\", compile_config=CompileConfig(fullgraph=True"
        + ("" if plan.compile_mode is None else f", mode={plan.compile_mode!r}")
        + "))` with `_compile_all_devices = True` (inductor, CPU). First calls (compilation): "
        + ", ".join(f"{name} {s:.0f} s" for name, s in first_calls.items() if "compile" in name) + ".",
        "- AOTInductor: `ExportedDecoder.compile(model, max_cache_len=prompt + new tokens)` (`torch.export` of "
        "transformers' static-cache export recipe, compiled by AOTInductor into a .pt2 package), then "
        "`generate(custom_generate=decoder)`: the same processors, stopping criteria and greedy choice as `generate`, "
        "every forward one call into the compiled library; `+ max_autotune`: `compile(..., max_autotune=True)`, "
        "inductor times its C++ GEMM template against the ATen kernel per matmul and keeps the faster. "
        "Export + compile + first call: "
        + ", ".join(f"{name} {s:.0f} s" for name, s in first_calls.items() if "AOT" in name) + ".",
        "- roofline = roofline bandwidth / bytes per decode step (weights in the format used, the embedding as one "
        "row when the head has its own matrix, KV cache). fp32 and bf16 models keep the head tied to the embedding, "
        "so their head reads the embedding matrix. The roofline bandwidth is the highest read rate anything reached "
        "in the run: `torch.sum`'s, or a decode's bytes per step x tokens/s (llama.cpp's F32 decode streams faster "
        "than `torch.sum`). The machine's true peak can only be higher, so every percentage is an upper bound.",
        "- best: each variant's fastest round, its roofline from the highest bandwidth of the run, and its ratio to "
        "llama.cpp's fastest round. The machine is shared (2 cores, other jobs running): other processes only ever "
        "slow a run down, so the medians mix quiet and crowded rounds while the bests show what the code does on a "
        "quiet machine. Compare the two only within one column.",
        "- greedy tokens: int8 / int4 change the weights, so their continuations may leave fp32's at some "
        "position (reported); bf16 rounds activations too.",
    ]
    if has_llama:
        lines.append(
            "- llama.cpp: llama-cpp-python built from source (not in requirements), the shipped "
            "`SmolLM2-135M-Instruct.Q4_1.gguf` (the file the fp32 weights are dequantized from) and llama.cpp's own "
            "conversions of it to F32, BF16 and Q8_0 (`llama_model_quantize`, `allow_requantize`); same prompt ids, "
            "greedy argmax over the logits, same thread count, decode steps only; its bytes per step are the GGUF "
            "file size plus the KV cache. The ratio column compares each AGILLM row with llama.cpp at the same "
            "weight precision (fp32 - F32, bf16 - BF16, int8 - Q8_0, int4 group 32 - Q4_1)."
        )
    return "\n".join(lines) + "\n"


def matmul_floor_rows(matmul_floor: dict, variants: list[Variant]) -> list[dict]:
    """The matmuls-alone ceiling of each int format next to the whole compiled step and llama.cpp's whole step."""
    by_name = {variant.name: variant for variant in variants}
    llama = {variant.weights: variant for variant in variants if variant.llama_format}
    rows = []
    for weights, speeds in matmul_floor.items():
        compiled, aot = by_name[f"{weights} static + compile"], by_name[f"{weights} AOTInductor"]
        row = {"weights": weights, "matmuls_alone_steps_per_second": statistics.median(speeds),
               "compiled_tokens_per_second": statistics.median(compiled.tokens_per_second),
               "aot_tokens_per_second": statistics.median(aot.tokens_per_second)}  # fmt: skip
        if weights in llama:
            row["llama_cpp_format"] = llama[weights].llama_format
            row["llama_cpp_tokens_per_second"] = statistics.median(llama[weights].tokens_per_second)
        rows.append(row)
    return rows


def matmul_floor_report(rows: list[dict]) -> str:
    lines = ["", "What the torch kernels allow: the packed-int matmuls of one decode step alone (every quantized "
             "linear once, in model order, on one bf16 row; `matmuls_alone`), median over the rounds, next to the "
             "whole compiled steps and llama.cpp's whole step at the same precision:", "",
             "| weights | matmuls alone (steps/s) | whole step, static + compile (tok/s) | whole step, AOTInductor (tok/s) "
             "| llama.cpp whole step (tok/s) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        llama = (f"{row['llama_cpp_tokens_per_second']:.1f} ({row['llama_cpp_format']})"
                 if "llama_cpp_tokens_per_second" in row else "")
        lines.append(f"| {row['weights']} | {row['matmuls_alone_steps_per_second']:.1f} | "
                     f"{row['compiled_tokens_per_second']:.1f} | {row['aot_tokens_per_second']:.1f} | {llama} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = bench_parser("cpu_decode", __doc__.splitlines()[0], "small random model, 16 tokens, 2 rounds")
    add_repeats_option(parser, "timed rounds (default 5, 2 with --quick)")
    parser.add_argument("--compile-mode", default=None, help="CompileConfig mode (default: CompileConfig's own)")
    parser.add_argument(
        "--llama-cpp-python", default=os.environ.get("LLAMA_CPP_PYTHON"),
        help="a Python interpreter with llama-cpp-python installed (default: $LLAMA_CPP_PYTHON); without it the "
        "llama.cpp rows are skipped",
    )
    return parse_bench_args(parser, "cpu_decode", argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = Plan.quick() if args.quick else Plan()
    if args.repeats is not None:
        plan.repeats = args.repeats
    plan.compile_mode = args.compile_mode
    start = time.perf_counter()
    variants, bandwidths, first_calls, matmul_floor = run(plan, args.threads, args.llama_cpp_python)
    rows = table_rows(variants, bandwidths)
    streaming = streaming_bandwidth(variants, bandwidths)
    floor = matmul_floor_rows(matmul_floor, variants)
    machine = machine_info(args.threads)
    report = markdown_report(rows, bandwidths, streaming, first_calls, plan, machine, args.quick,
                             time.perf_counter() - start)
    report += matmul_floor_report(floor)
    raw = {"machine": machine, "plan": asdict(plan), "bandwidth_bytes_per_second": bandwidths,
           "roofline_bandwidth": {"bytes_per_second": streaming[0], "reached_by": streaming[1]},
           "first_call_seconds": first_calls, "rows": rows, "matmuls_alone": floor}
    write_report(args.output, report, raw, echo_report=True)
    return raw
