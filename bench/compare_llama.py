"""AGILLM vs transformers' `LlamaForCausalLM` on the same weights, same process, interleaved runs.

For each setup (converted SmolLM2-135M, a small random config) both models load one state dict and must agree on
logits before anything is timed. Then, alternating Llama and AGILLM run by run, with warm-up runs discarded:
    prefill          forward over the prompt with a fresh dynamic cache, logits of the last position only (as the
                     first step of `generate`); tokens/s = batch * prompt tokens / time;
    decode           greedy `generate` with `min_new_tokens == max_new_tokens`, so both produce the same count;
                     tokens/s over the single-token decode steps only (see `timing.DecodeClock`), with the default
                     dynamic cache, and with a static cache + `torch.compile` (compilation in the warm-up run);
    train            forward + backward + AdamW step on `labels = input_ids`; tokens/s = batch * seq / time;
    train memory     peak RSS a training step adds on top of the loaded model, in a fresh subprocess per run
                     (see `bench.memory`).
Writes a markdown table (also printed) and the raw numbers as JSON. Usage: `python -m bench [--quick]`.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from transformers import CompileConfig, LogitsProcessorList

from . import memory
from .setups import SETUPS, BenchSetup, check_same_function
from .timing import DecodeClock, Measurement, interleaved, timed


BENCH_DIR = Path(__file__).resolve().parent
MODEL_NAMES = ("Llama", "AGILLM")


@dataclass
class Plan:
    """Workload sizes and run counts; `--quick` shrinks everything to check that the bench runs end to end."""

    prefill_shapes: list[tuple[int, int]]  # (batch, prompt tokens)
    decode_batch: int
    decode_prompt_len: int
    decode_new_tokens: int
    compile_setups: list[str]  # setups whose static-cache decode is compiled (inductor on CPU is slow to compile)
    train_batch: int
    train_seq_len: int
    warmup: int
    repeats: int
    memory_repeats: int
    memory_steps: int = 2

    @classmethod
    def full(cls) -> "Plan":
        return cls(
            prefill_shapes=[(1, 512), (4, 128)],
            decode_batch=1,
            decode_prompt_len=32,
            decode_new_tokens=64,
            compile_setups=["small", "smollm2"],
            train_batch=4,
            train_seq_len=256,
            warmup=1,
            repeats=5,
            memory_repeats=2,  # the RSS measurement repeats to ~0.1 MiB (see bench.memory), 2 runs only guard it
        )

    @classmethod
    def quick(cls) -> "Plan":
        return cls(
            prefill_shapes=[(1, 128)],
            decode_batch=1,
            decode_prompt_len=16,
            decode_new_tokens=16,
            compile_setups=["small"],
            train_batch=2,
            train_seq_len=64,
            warmup=1,
            repeats=3,
            memory_repeats=1,
        )


@dataclass
class Row:
    """One line of the table: a metric on one setup, one value per model (tokens/s, or MiB for memory)."""

    metric: str
    setup: str
    unit: str
    values: dict[str, float]
    runs: dict[str, list[float]] = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """> 1 means AGILLM is better: AGILLM/Llama for throughput, Llama/AGILLM for memory (lower is better)."""
        if self.unit == "MiB":
            return self.values["Llama"] / self.values["AGILLM"]
        return self.values["AGILLM"] / self.values["Llama"]


def random_ids(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> torch.LongTensor:
    # ids 0-2 are pad/bos/eos in both setups; ordinary tokens keep the workloads free of special-token paths
    return torch.randint(3, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def row_from(metric: str, setup: BenchSetup, measurements: dict[str, Measurement], **notes) -> Row:
    return Row(
        metric=metric,
        setup=setup.name,
        unit="tokens/s",
        values={name: measurements[name].median for name in MODEL_NAMES},
        runs={name: measurements[name].tokens_per_second for name in MODEL_NAMES},
        notes=notes,
    )


# --------------------------------------------------------------------------------------------------- metrics


def bench_prefill(setup: BenchSetup, models: dict, plan: Plan) -> list[Row]:
    rows = []
    for batch, seq_len in plan.prefill_shapes:
        input_ids = random_ids(setup.llama_config.vocab_size, batch, seq_len)

        def prefill(model):
            with torch.inference_mode():
                model(input_ids=input_ids, use_cache=True, logits_to_keep=1)

        workloads = {name: timed(lambda m=model: prefill(m), batch * seq_len) for name, model in models.items()}
        measurements = interleaved(workloads, plan.warmup, plan.repeats)
        rows.append(row_from(f"prefill {batch}x{seq_len}", setup, measurements))
    return rows


def bench_decode(setup: BenchSetup, models: dict, plan: Plan, compiled: bool) -> Row:
    """Greedy decode speed; `compiled` switches to a static cache with `generate`'s automatic `torch.compile`."""
    input_ids = random_ids(setup.llama_config.vocab_size, plan.decode_batch, plan.decode_prompt_len, seed=1)
    generate_kwargs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "do_sample": False,
        "max_new_tokens": plan.decode_new_tokens,
        "min_new_tokens": plan.decode_new_tokens,
        "pad_token_id": setup.llama_config.pad_token_id,
    }
    if compiled:
        compile_config = CompileConfig(fullgraph=True)
        compile_config._compile_all_devices = True  # `generate` compiles only on accelerators unless told to
        generate_kwargs.update(cache_implementation="static", compile_config=compile_config)

    clock = DecodeClock()
    outputs: dict[str, torch.Tensor] = {}

    def decode(name, model) -> tuple[int, float]:
        clock.reset()
        with torch.inference_mode():
            outputs[name] = model.generate(**generate_kwargs, logits_processor=LogitsProcessorList([clock]))
        steps, seconds = clock.decode_span()
        return steps * plan.decode_batch, seconds

    # The first call of a compiled model compiles; time it separately so the table can say what it cost.
    compile_seconds = {}
    for name, model in models.items():
        start = time.perf_counter()
        decode(name, model)
        compile_seconds[name] = time.perf_counter() - start
    same_tokens = torch.equal(outputs["Llama"], outputs["AGILLM"])

    workloads = {name: (lambda n=name, m=model: decode(n, m)) for name, model in models.items()}
    measurements = interleaved(workloads, max(plan.warmup - 1, 0), plan.repeats)
    label = "decode, static cache + compile" if compiled else "decode, dynamic cache"
    notes = {"same_greedy_tokens": same_tokens}
    if compiled:
        notes["first_call_seconds"] = compile_seconds
    return row_from(f"{label} (batch {plan.decode_batch})", setup, measurements, **notes)


def bench_train(setup: BenchSetup, models: dict, plan: Plan) -> Row:
    """Forward + backward + AdamW step. Runs last: it changes the weights."""
    input_ids = random_ids(setup.llama_config.vocab_size, plan.train_batch, plan.train_seq_len, seed=2)
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}

    def train_step(name, model):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    for model in models.values():
        model.train()
    tokens = plan.train_batch * plan.train_seq_len
    workloads = {name: timed(lambda n=name, m=model: train_step(n, m), tokens) for name, model in models.items()}
    measurements = interleaved(workloads, plan.warmup, plan.repeats)
    for model in models.values():
        model.eval()
    return row_from(f"train step {plan.train_batch}x{plan.train_seq_len}", setup, measurements)


def bench_train_memory(setup: BenchSetup, plan: Plan, threads: int) -> Row:
    """Peak RSS added by training steps, each model alone in a fresh subprocess, runs interleaved."""
    with tempfile.TemporaryDirectory() as tmp:
        config_paths = {"Llama": Path(tmp, "llama.json"), "AGILLM": Path(tmp, "agillm.json")}
        setup.llama_config.to_json_file(config_paths["Llama"])
        setup.agillm_config.to_json_file(config_paths["AGILLM"])
        runs: dict[str, list[float]] = {name: [] for name in MODEL_NAMES}
        for _ in range(plan.memory_repeats):
            for name in MODEL_NAMES:
                result = memory.measure_in_subprocess(
                    name.lower(), config_paths[name], plan.train_batch, plan.train_seq_len, plan.memory_steps, threads
                )
                runs[name].append(result["step_peak_mib"])
    return Row(
        metric=f"train step {plan.train_batch}x{plan.train_seq_len} peak memory",
        setup=setup.name,
        unit="MiB",
        values={name: statistics.median(runs[name]) for name in MODEL_NAMES},
        runs=runs,
    )


def bench_setup(setup_key: str, plan: Plan, threads: int, skip_memory: bool) -> tuple[list[Row], dict]:
    setup = SETUPS[setup_key]()
    llama, agillm = setup.build_pair()
    models = {"Llama": llama, "AGILLM": agillm}
    difference = check_same_function(setup, llama, agillm)
    print(f"[{setup.name}] same weights: max |logits difference| = {difference:.2e}", flush=True)

    rows = bench_prefill(setup, models, plan)
    rows.append(bench_decode(setup, models, plan, compiled=False))
    if setup_key in plan.compile_setups:
        rows.append(bench_decode(setup, models, plan, compiled=True))
    rows.append(bench_train(setup, models, plan))
    if not skip_memory:
        rows.append(bench_train_memory(setup, plan, threads))
    info = {
        "description": setup.description,
        "parameters": sum(p.numel() for p in llama.parameters()),
        "max_abs_logits_difference": difference,
        "attn_implementation": {name: model.config._attn_implementation for name, model in models.items()},
    }
    return rows, info


# --------------------------------------------------------------------------------------------------- report


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int) -> dict:
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def format_value(value: float, unit: str) -> str:
    return f"{value:,.1f} MiB" if unit == "MiB" else f"{value:,.1f}"


def method_notes(rows: list[Row], plan: Plan) -> list[str]:
    """The footer's bullet list: how each row was measured, with the settings this run used."""
    notes = [
        "- Both models live in one process and are built alike (constructor, then `load_state_dict` of one state "
        "dict); fp32, eval mode, `torch.inference_mode()` for inference. Runs alternate Llama, AGILLM, Llama, ...; "
        f"{plan.warmup} warm-up round(s) discarded, then the **median of {plan.repeats} runs** per model.",
        "- ratio > 1 means AGILLM is better: AGILLM/Llama for tokens/s, Llama/AGILLM for memory.",
        "- prefill: one forward over random prompt ids with a fresh dynamic cache and `logits_to_keep=1` (what "
        "`generate`'s first step does); tokens/s = batch x prompt length / time.",
        f"- decode: greedy `generate` of {plan.decode_new_tokens} new tokens after a {plan.decode_prompt_len}-token "
        "prompt, `min_new_tokens = max_new_tokens` so both models produce the same count; tokens/s counts only the "
        "single-token decode steps, timed from the first to the last call of a pass-through logits processor "
        "(prefill excluded).",
    ]
    compiled_rows = [row for row in rows if "first_call_seconds" in row.notes]
    if compiled_rows:
        first_calls = "; ".join(
            f"{row.setup}: Llama {row.notes['first_call_seconds']['Llama']:.0f} s, "
            f"AGILLM {row.notes['first_call_seconds']['AGILLM']:.0f} s"
            for row in compiled_rows
        )
        notes.append(
            '- static cache + compile: `generate(cache_implementation="static", '
            "compile_config=CompileConfig(fullgraph=True))` with `compile_config._compile_all_devices = True` "
            "(inductor on CPU; the prefill stays eager, as `generate` compiles only the decode step). The first "
            f"call of each model, which compiles, is not timed ({first_calls}); the second model compiles faster "
            "because inductor reuses kernels it has already built."
        )
    not_compiled = sorted({row.setup for row in rows} - {row.setup for row in compiled_rows})
    if not_compiled:
        notes.append(
            f"- static cache + compile was not run for {', '.join(not_compiled)} (`--compile-setups`): inductor "
            "needs minutes to compile a 30-layer model on a small CPU."
        )
    notes.append(
        "- train step: forward + backward (`labels = input_ids`) + `AdamW.step()` + `zero_grad(set_to_none=True)`; "
        "tokens/s = batch x sequence length / time."
    )
    if any(row.unit == "MiB" for row in rows):
        notes.append(
            "- peak memory: each model alone in a fresh subprocess (`bench/memory.py`) with "
            "`MALLOC_MMAP_THRESHOLD_=65536`, so freed tensor buffers leave the RSS at once: after building the "
            "model, optimizer and batch, the heap is trimmed (`malloc_trim`) and the kernel's peak-RSS counter reset "
            f"(`/proc/self/clear_refs`); the value is the peak RSS (`VmHWM`) during {plan.memory_steps} training "
            "steps minus the RSS before them, i.e. gradients + AdamW state + activations. Median of "
            f"{plan.memory_repeats} subprocess run(s) per model, alternating. The subprocess initialises the "
            "setup's config with random weights (memory does not depend on their values). `tracemalloc` is not "
            "used: it does not see torch's allocations."
        )
    mismatches = [row for row in rows if row.notes.get("same_greedy_tokens") is False]
    notes.append(
        "- greedy tokens: identical for both models in every decode row."
        if not mismatches
        else "- greedy tokens differed in: " + ", ".join(f"{row.metric} / {row.setup}" for row in mismatches) + "."
    )
    return notes


def markdown_report(rows: list[Row], setups_info: dict, machine: dict, plan: Plan, quick: bool, seconds: float) -> str:
    command = "python -m bench --quick" if quick else "python -m bench"
    caveat = " (**quick run: reduced sizes and run counts, not reference numbers**)" if quick else ""
    lines = [
        "# AGILLM vs transformers `LlamaForCausalLM` (same weights, CPU, fp32)",
        "",
        f"Generated by `{command}`{caveat} in {seconds / 60:.1f} min.",
        "",
        "| metric | setup | Llama | AGILLM | ratio |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        unit = "" if row.unit == "MiB" else " tok/s"
        lines.append(
            f"| {row.metric} | {row.setup} | {format_value(row.values['Llama'], row.unit)}{unit} "
            f"| {format_value(row.values['AGILLM'], row.unit)}{unit} | {row.ratio:.3f} |"
        )
    lines += ["", "Setups:"]
    for name, info in setups_info.items():
        attention = info["attn_implementation"]
        attention_text = (
            f"`{attention['AGILLM']}` attention (both)"
            if attention["AGILLM"] == attention["Llama"]
            else f"attention: Llama `{attention['Llama']}`, AGILLM `{attention['AGILLM']}`"
        )
        lines.append(
            f"- **{name}**: {info['description']}; {info['parameters'] / 1e6:.1f}M parameters; "
            f"max |logits difference| before timing {info['max_abs_logits_difference']:.1e}; {attention_text}."
        )
    lines += [
        "",
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, "
        f"`torch.set_num_threads({machine['torch_threads']})`; Python {machine['python']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}; {machine['date']}.",
        "",
        "Method:",
        *method_notes(rows, plan),
    ]
    return "\n".join(lines) + "\n"


def write_results(report: str, rows: list[Row], setups_info: dict, machine: dict, plan: Plan, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    raw = {
        "machine": machine,
        "plan": plan.__dict__,
        "setups": setups_info,
        "rows": [{**row.__dict__, "ratio": row.ratio} for row in rows],
    }
    out.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")


def split_setups(parser: argparse.ArgumentParser, option: str, value: str) -> list[str]:
    keys = [key.strip() for key in value.split(",") if key.strip()]
    unknown = [key for key in keys if key not in SETUPS]
    if unknown:
        parser.error(f"{option}: unknown setup(s) {unknown}; choose from {sorted(SETUPS)}")
    return keys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few runs: checks the bench runs")
    parser.add_argument(
        "--setups", default="smollm2,small", help=f"comma-separated, from {sorted(SETUPS)} (default: both)"
    )
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: usable CPUs)"
    )
    parser.add_argument(
        "--compile-setups",
        default=None,
        help="comma-separated setups whose static-cache decode is compiled (default: all, only 'small' with --quick; "
        "'' for none): inductor takes minutes to compile SmolLM2-135M on a small CPU",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="markdown path; the JSON goes next to it (default: bench/results.md, or outputs/bench/results-quick.md "
        "with --quick so a quick run never overwrites the reference table)",
    )
    args = parser.parse_args(argv)
    args.setups = split_setups(parser, "--setups", args.setups)
    if not args.setups:
        parser.error("--setups is empty")
    if args.compile_setups is not None:
        args.compile_setups = split_setups(parser, "--compile-setups", args.compile_setups)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.output is None:
        args.output = BENCH_DIR.parent / "outputs/bench/results-quick.md" if args.quick else BENCH_DIR / "results.md"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = Plan.quick() if args.quick else Plan.full()
    if args.compile_setups is not None:
        plan.compile_setups = args.compile_setups
    start = time.perf_counter()
    rows, setups_info = [], {}
    for key in args.setups:
        setup_rows, info = bench_setup(key, plan, args.threads, args.no_memory)
        rows += setup_rows
        setups_info[setup_rows[0].setup] = info
        for row in setup_rows:
            print(f"[{row.setup}] {row.metric}: Llama {row.values['Llama']:.1f}, AGILLM {row.values['AGILLM']:.1f} "
                  f"{row.unit}, ratio {row.ratio:.3f}", flush=True)
    machine = machine_info(args.threads)
    report = markdown_report(rows, setups_info, machine, plan, args.quick, time.perf_counter() - start)
    write_results(report, rows, setups_info, machine, plan, args.output)
    print(report)
    print(f"Written: {args.output} and {args.output.with_suffix('.json')}")
