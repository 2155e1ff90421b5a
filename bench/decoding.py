"""Parallel decoding (SAT, NAT, staged) against AR greedy on the demo's Shakespeare model, every forward counted.

The model is the one `python -m demo` pre-trains (`outputs/agillm-shakespeare/`: AR, SAT and NAT heads; trained here
with the demo's default budget if the folder is missing or has no SAT/NAT head). Prompts are fixed windows of the
held-out plays (hamlet, the-tempest), which the model never trained on: `--prompts` windows of `--prompt-tokens`
tokens, each starting at a line start found at evenly spaced points of its play (half the prompts per play).

Every decoder runs greedily (`do_sample=False`) through `model.generate(..., generation_mode=...)` on the same
prompts, one prompt at a time, and is measured on:
    forwards         every trunk forward (`model.model` call: prefill, denoising step, verification, cache
                     re-encode), counted by a forward pre-hook; for the parallel modes the hook count must equal the
                     `num_forward_passes` that `generate` returns (a mismatch stops the bench);
    tokens/forward   new tokens / forwards, over all prompts;
    agreement        fraction of the positions of AR greedy's continuation where the decoder emitted the same token
                     (position by position, no alignment), and how many continuations are identical to AR's;
    tokens/s         new tokens / wall-clock seconds of the whole generate calls (prefill included), median of
                     `--repeats` timed rounds after one warm-up round, decoders interleaved round by round
                     (`bench.timing.interleaved`) in one process, `torch.set_num_threads(--threads)`.
Writes `bench/decoding.md` (table + setup) and `bench/decoding.json`. Usage: `python -m bench decoding [--quick]`.
"""

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, GenerationConfig

from corpus.shakespeare import HELD_OUT_PLAYS, load_plays
from modeling_agillm import AgillmForCausalLM

from .cli import REPO_ROOT, add_repeats_option, bench_parser, parse_bench_args, write_report
from .compare_llama import machine_info
from .timing import interleaved


MODEL_DIR_TEXT = "outputs/agillm-shakespeare"  # where `python -m demo` saves its Shakespeare model
AR = "AR greedy"


@dataclass(frozen=True)
class Decoder:
    """One row of the table: a `generate` call with `generation_mode` and its options (`None` = plain AR)."""

    name: str
    generation_mode: str | None = None
    options: dict = field(default_factory=dict)

    @property
    def settings(self) -> str:
        mode = f"`generation_mode={self.generation_mode!r}`" if self.generation_mode else "`generate` (KV cache)"
        return ", ".join([mode] + [f"`{key}={value!r}`" for key, value in self.options.items()])


DECODERS = [
    Decoder(AR),
    Decoder("SAT, fixed stride", "sat", {"sat_stride": "fixed"}),
    Decoder("SAT, gated stride", "sat", {"sat_stride": "gate"}),
    Decoder("NAT mask-predict, 4 passes", "nat_mask_predict", {"nat_passes": 4}),
    Decoder("NAT mask-predict, 16 passes", "nat_mask_predict", {"nat_passes": 16}),
    Decoder("NAT block, threshold 0.5", "nat_block", {"nat_threshold": 0.5}),
    Decoder("NAT block, threshold 0.7", "nat_block", {"nat_threshold": 0.7}),
    Decoder("NAT block, threshold 0.8", "nat_block", {"nat_threshold": 0.8}),
    Decoder("NAT block, threshold 0.9", "nat_block", {"nat_threshold": 0.9}),
    Decoder("staged, NAT draft", "staged", {"draft": "nat"}),
    Decoder("staged, SAT draft", "staged", {"draft": "sat"}),
]


@dataclass
class Plan:
    """Workload sizes and run counts; `--quick` shrinks them to check that the bench runs end to end."""

    prompts: int = 8
    prompt_tokens: int = 32
    new_tokens: int = 64
    repeats: int = 5
    warmup: int = 1
    diagnostic_windows: int = 256  # held-out windows of `nat_block_diagnostics`

    @classmethod
    def quick(cls) -> "Plan":
        return cls(prompts=2, prompt_tokens=16, new_tokens=16, repeats=1, warmup=1, diagnostic_windows=8)


# --------------------------------------------------------------------------------------------------- model and prompts


def has_parallel_heads(folder: Path) -> bool:
    config_file = folder / "config.json"
    if not config_file.is_file():
        return False
    heads = json.loads(config_file.read_text()).get("heads") or ["ar"]
    return {"sat", "nat"} <= set(heads)


def ensure_model(folder: Path) -> None:
    """Train the demo's model into `folder`'s parent (the demo's output folder) unless it is already there."""
    if has_parallel_heads(folder):
        return
    from demo import pretrain_shakespeare

    if folder.name != pretrain_shakespeare.MODEL_FOLDER:
        raise ValueError(f"{folder} is not a model with SAT and NAT heads (config.json 'heads'); pass such a folder.")
    print(f"{folder} is missing or has no SAT/NAT head: pre-training it with the demo's default budget.", flush=True)
    pretrain_shakespeare.run(folder.parent)


def held_out_prompts(tokenizer, count: int, length: int) -> list[dict]:
    """`count` prompts of `length` tokens from the held-out plays, starting at line starts spread evenly over each play."""
    plays = load_plays()
    prompts = []
    for index, slug in enumerate(HELD_OUT_PLAYS):
        share = count // len(HELD_OUT_PLAYS) + (index < count % len(HELD_OUT_PLAYS))
        text = plays[slug]
        for fraction in (np.arange(share) + 0.5) / share:
            line_start = text.index("\n", int(fraction * len(text))) + 1
            ids = tokenizer(text[line_start:], add_special_tokens=False, verbose=False)["input_ids"][:length]
            prompts.append({"play": slug, "char_offset": line_start, "ids": ids, "text": tokenizer.decode(ids)})
    return prompts


# --------------------------------------------------------------------------------------------------- measuring


class ForwardCounter:
    """Counts calls of the trunk (`model.model`) with a forward pre-hook: every forward of every decoder."""

    def __init__(self, model):
        self.count = 0
        self._handle = model.model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count += 1

    def remove(self) -> None:
        self._handle.remove()


@dataclass
class Result:
    """What one decoder produced on every prompt (identical in every round, which `run_decoder` checks)."""

    tokens: list[list[int]] = field(default_factory=list)
    forwards: list[int] = field(default_factory=list)
    reported_forwards: list[int | None] = field(default_factory=list)


def run_decoder(model, decoder: Decoder, prompts: list[torch.LongTensor], generation_config, counter) -> Result:
    result = Result()
    for prompt in prompts:
        before = counter.count
        output = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            generation_config=generation_config,
            generation_mode=decoder.generation_mode,
            **decoder.options,
        )
        forwards = counter.count - before
        reported = getattr(output, "num_forward_passes", None)
        if decoder.generation_mode is not None and reported != forwards:
            raise RuntimeError(f"{decoder.name}: generate reported {reported} forwards, the trunk hook counted {forwards}")
        result.tokens.append(output.sequences[0, prompt.shape[1] :].tolist())
        result.forwards.append(forwards)
        result.reported_forwards.append(reported)
    return result


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> tuple[float, int]:
    """(share of the reference's positions with the same token at the same position, identical continuations)."""
    same = sum(sum(a == b for a, b in zip(row, ref)) for row, ref in zip(tokens, reference))
    total = sum(len(ref) for ref in reference)
    identical = sum(row == ref for row, ref in zip(tokens, reference))
    return same / total, identical


def supported(model, decoder: Decoder) -> str | None:
    """Why `decoder` cannot run on this model (its check in `generation_agillm`), or None."""
    config = model.config
    if decoder.generation_mode == "nat_block" and config.nat_block_size is None:
        return "needs a block-causal NAT head (`nat_block_size`); this model's NAT is bidirectional"
    return None


def bench(model, tokenizer, plan: Plan, decoders: list[Decoder]) -> tuple[list[dict], list[dict]]:
    """Run every decoder on every prompt; returns (table rows, prompts)."""
    prompts = held_out_prompts(tokenizer, plan.prompts, plan.prompt_tokens)
    prompt_ids = [torch.tensor([prompt["ids"]]) for prompt in prompts]
    generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=plan.new_tokens,
        return_dict_in_generate=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    # `generate` fills unset fields from the model's own generation config; the demo saves sampling defaults there.
    model.generation_config = generation_config
    runnable = [decoder for decoder in decoders if supported(model, decoder) is None]
    counter = ForwardCounter(model)
    results: dict[str, list[Result]] = {decoder.name: [] for decoder in runnable}

    def workload(decoder: Decoder):
        def run() -> tuple[int, float]:  # (new tokens, seconds) of one round over every prompt
            started = time.perf_counter()
            result = run_decoder(model, decoder, prompt_ids, generation_config, counter)
            seconds = time.perf_counter() - started
            results[decoder.name].append(result)
            return sum(len(tokens) for tokens in result.tokens), seconds

        return run

    try:
        with torch.inference_mode():
            measurements = interleaved(
                {decoder.name: workload(decoder) for decoder in runnable}, plan.warmup, plan.repeats
            )
    finally:
        counter.remove()

    reference = results[AR][0].tokens
    ar_speed = measurements[AR].median
    rows = []
    for decoder in decoders:
        row = {"decoder": decoder.name, "settings": decoder.settings, "generation_mode": decoder.generation_mode,
               "options": decoder.options}  # fmt: skip
        if (reason := supported(model, decoder)) is not None:
            rows.append({**row, "not_run": reason})
            continue
        runs = results[decoder.name]
        if any(run.tokens != runs[0].tokens or run.forwards != runs[0].forwards for run in runs):
            raise RuntimeError(f"{decoder.name}: greedy decoding gave different tokens or forward counts across rounds")
        first = runs[0]
        new_tokens = sum(len(tokens) for tokens in first.tokens)
        share, identical = agreement(first.tokens, reference)
        speed = measurements[decoder.name]
        rows.append({
            **row,
            "new_tokens": new_tokens,
            "forwards": sum(first.forwards),
            "forwards_per_prompt": first.forwards,
            "reported_forwards_per_prompt": first.reported_forwards,
            "tokens_per_forward": new_tokens / sum(first.forwards),
            "agreement_with_ar": share,
            "identical_continuations": identical,
            "tokens_per_second_runs": speed.tokens_per_second,
            "tokens_per_second": speed.median,
            "speed_vs_ar": speed.median / ar_speed,
            "continuations": [tokenizer.decode(tokens) for tokens in first.tokens],
        })  # fmt: skip
    return rows, prompts


@torch.inference_mode()
def nat_block_diagnostics(model, tokenizer, windows: int, prefix_blocks: int = 7) -> dict:
    """How NAT's first denoising step compares with AR, teacher-forced on held-out text (no decoding involved).

    `windows` windows of the held-out plays, evenly spaced: `prefix_blocks` clean NAT blocks, then one block fully
    masked, as at the start of a `nat_block` step or a staged NAT draft. Per position of that block: how often the
    NAT argmax equals AR's argmax at the same position (AR sees the true text before it), how often each is the
    true token, and how often the NAT confidence (max probability, mask id banned) reaches 0.5 / 0.7 / 0.9.
    """
    config = model.config
    block = config.nat_block_size
    if block is None:
        return {}
    length = (prefix_blocks + 1) * block
    streams = [tokenizer(load_plays()[slug], add_special_tokens=False, verbose=False)["input_ids"] for slug in HELD_OUT_PLAYS]
    per_play = windows // len(streams)
    starts = [(ids, int(start)) for ids in streams for start in np.linspace(0, len(ids) - length, per_play)]
    text = torch.tensor([ids[start : start + length] for ids, start in starts])
    masked = text.clone()
    masked[:, -block:] = config.nat_mask_token_id
    ar_guess = model(input_ids=text).logits[:, -block - 1 : -1].argmax(-1)
    nat_logits = model.nat_head(model.model(input_ids=masked, objective="nat").last_hidden_state[:, -block:]).float()
    nat_logits[..., config.nat_mask_token_id] = -torch.inf
    confidence, nat_guess = nat_logits.softmax(-1).max(-1)
    truth = text[:, -block:]
    rates = {
        "nat_equals_ar": (nat_guess == ar_guess).float().mean(0),
        "nat_correct": (nat_guess == truth).float().mean(0),
        "ar_correct": (ar_guess == truth).float().mean(0),
        **{f"nat_confidence_at_least_{t}": (confidence >= t).float().mean(0) for t in (0.5, 0.7, 0.9)},
    }
    return {"windows": len(starts), "prefix_tokens": prefix_blocks * block,
            **{name: [round(v, 3) for v in values.tolist()] for name, values in rates.items()}}  # fmt: skip


# --------------------------------------------------------------------------------------------------- targets and report


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each with the row(s) it was judged on and whether it was met."""
    ran = {row["decoder"]: row for row in rows if "not_run" not in row}

    def best(prefix: str, key: str) -> dict | None:
        candidates = [row for name, row in ran.items() if name.startswith(prefix)]
        return max(candidates, key=lambda row: row[key]) if candidates else None

    checks = []
    for name in ("staged, NAT draft", "staged, SAT draft"):
        if (row := ran.get(name)) is not None:
            identical = row["identical_continuations"] == len(row["continuations"])
            checks.append({
                "target": f"{name}: lossless (identical to AR greedy) and faster than AR in wall-clock",
                "decoder": name,
                "value": f"{row['identical_continuations']}/{len(row['continuations'])} identical, "
                         f"{row['speed_vs_ar']:.2f}x AR tokens/s",
                "met": identical and row["speed_vs_ar"] > 1.0,
            })  # fmt: skip
    nat_rows = [row for name, row in ran.items() if name.startswith("NAT block")]
    if nat_rows:
        passing = [row for row in nat_rows if row["tokens_per_forward"] >= 2 and row["agreement_with_ar"] >= 0.9]
        shown = max(passing or nat_rows, key=lambda row: (row["agreement_with_ar"] >= 0.9, row["tokens_per_forward"]))
        checks.append({
            "target": "NAT block-threshold: >= 2 tokens per forward with >= 90% agreement with AR greedy (any threshold)",
            "decoder": shown["decoder"],
            "value": "; ".join(f"{row['decoder'].split(', ')[-1]}: {row['tokens_per_forward']:.2f} tok/fwd, "
                               f"{100 * row['agreement_with_ar']:.1f}%" for row in nat_rows),
            "met": bool(passing),
        })  # fmt: skip
    if (row := best("SAT", "tokens_per_forward")) is not None:
        sat_rows = [row for name, row in ran.items() if name.startswith("SAT")]
        checks.append({
            "target": "SAT: >= 1.5 tokens per forward",
            "decoder": row["decoder"],
            "value": "; ".join(f"{r['decoder']}: {r['tokens_per_forward']:.2f}" for r in sat_rows),
            "met": row["tokens_per_forward"] >= 1.5,
        })
    return checks


def setup_text(model_dir: str, training: dict | None, model, plan: Plan, prompts: list[dict], machine: dict) -> list[str]:
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    lines = [
        f"- Model: `{model_dir}` ({parameters / 1e6:.2f}M parameters: hidden {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, {config.num_attention_heads}/{config.num_key_value_heads} heads, tied "
        f"embeddings), heads {config.heads}, objective weights {config.objective_weights}, "
        f"`sat_block_size={config.sat_block_size}`, `nat_block_size={config.nat_block_size}`.",
    ]
    if training and "held_out_losses_after" in training:
        losses = ", ".join(f"{head.upper()} {loss:.3f}" for head, loss in training["held_out_losses_after"].items())
        lines.append(
            f"- Training (`python -m demo`): {training['steps']} steps in {training['train_seconds'] / 60:.1f} min on "
            f"CPU, {training['tokens_seen']:,} tokens; held-out AR perplexity "
            f"**{training['perplexity_after']:.1f}**, held-out loss per head {losses}."
        )
    if config.nat_block_size is not None:
        lines.append(
            "- NAT mask-predict on this block-NAT model runs its passes under the block-causal mask it was trained "
            "with, so early passes show a block earlier blocks that are still partly hidden, which training never "
            "does (`generation_agillm.py`); `nat_block` is the sampler this model is built for."
        )
    per_play = {play: sum(p["play"] == play for p in prompts) for play in HELD_OUT_PLAYS}
    lines += [
        f"- Prompts: {len(prompts)} windows of {plan.prompt_tokens} tokens of the held-out plays "
        f"({', '.join(f'{play} {n}' for play, n in per_play.items())}), each starting at the first line start after "
        f"an evenly spaced point of its play; {plan.new_tokens} new tokens each, greedy, batch 1, EOS allowed.",
        f"- Timing: one process, same model and prompts, decoders interleaved round by round, {plan.warmup} warm-up "
        f"round discarded, median of {plan.repeats} rounds; tokens/s = new tokens / seconds of the `generate` calls "
        f"(prefill included). Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, "
        f"`torch.set_num_threads({machine['torch_threads']})`; torch {machine['torch']}, transformers "
        f"{machine['transformers']}; {machine['date']}.",
        "- Forwards: every call of the trunk (`model.model`), counted by a forward pre-hook: prefill, each "
        "denoising / SAT / verification step, cache re-encodes. For every parallel decoder it equals the "
        "`num_forward_passes` that `generate(..., return_dict_in_generate=True)` reports (checked per prompt).",
        "- Agreement: share of AR greedy's new-token positions where the decoder has the same token at the same "
        "position; identical = whole continuation equal to AR greedy's.",
    ]
    return lines



def diagnostics_table(diagnostics: dict) -> list[str]:
    if not diagnostics:
        return []
    block = len(diagnostics["nat_equals_ar"])
    lines = [
        f"Why (no decoding, teacher-forced): NAT's first step on {diagnostics['windows']} held-out windows, "
        f"{diagnostics['prefix_tokens']} clean tokens then one fully masked block of {block}; per position of that "
        "block:",
        "",
        "| | " + " | ".join(str(i) for i in range(block)) + " |",
        "| --- |" + " ---: |" * block,
    ]
    labels = {
        "nat_equals_ar": "NAT argmax = AR argmax",
        "nat_correct": "NAT argmax = true token",
        "ar_correct": "AR argmax = true token",
        "nat_confidence_at_least_0.5": "NAT confidence >= 0.5",
        "nat_confidence_at_least_0.7": "NAT confidence >= 0.7",
        "nat_confidence_at_least_0.9": "NAT confidence >= 0.9",
    }
    for key, label in labels.items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * v:.0f}%" for v in diagnostics[key]) + " |")
    return lines


def markdown_report(rows, checks, diagnostics, setup_lines, prompts, quick: bool, seconds: float) -> str:
    command = "python -m bench decoding --quick" if quick else "python -m bench decoding"
    caveat = " (**quick run: reduced sizes and run counts, not reference numbers**)" if quick else ""
    lines = [
        "# Parallel decoding vs AR greedy (AGILLM Shakespeare model, CPU)",
        "",
        f"Generated by `{command}`{caveat} in {seconds / 60:.1f} min.",
        "",
        "| decoder | forwards / prompt | new tokens / forward | agreement with AR greedy | identical to AR | "
        "tokens/s | vs AR |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        if "not_run" in row:
            lines.append(f"| {row['decoder']} | n/a | n/a | n/a | n/a | n/a | n/a |")
            continue
        count = len(row["continuations"])
        lines.append(
            f"| {row['decoder']} | {row['forwards'] / count:.1f} | {row['tokens_per_forward']:.2f} | "
            f"{100 * row['agreement_with_ar']:.1f}% | {row['identical_continuations']}/{count} | "
            f"{row['tokens_per_second']:,.0f} | {row['speed_vs_ar']:.2f}x |"
        )
    lines += ["", "Targets:"]
    lines += [f"- {'met' if c['met'] else '**not met**'}: {c['target']} ({c['value']})." for c in checks]
    if diagnostics:
        lines += ["", *diagnostics_table(diagnostics)]
    not_run = [row for row in rows if "not_run" in row]
    if not_run:
        lines += ["", "Not run:"] + [f"- {row['decoder']}: {row['not_run']}." for row in not_run]
    lines += ["", "Decoders:"] + [f"- {row['decoder']}: {row['settings']}." for row in rows]
    lines += ["", "Setup:", *setup_lines]
    reference = next(row for row in rows if row["decoder"] == AR)
    lines += ["", f"First prompt ({prompts[0]['play']}) and AR greedy's continuation:", "", "```",
              prompts[0]["text"] + reference["continuations"][0], "```"]  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = bench_parser("decoding", __doc__.splitlines()[0], quick_help="2 prompts, 16 new tokens, 1 timed round")
    parser.add_argument("--model", type=Path, default=REPO_ROOT / MODEL_DIR_TEXT, help=f"default: {MODEL_DIR_TEXT}")
    add_repeats_option(parser, "timed rounds (default: 5, 1 with --quick)")
    return parse_bench_args(parser, "decoding", argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = Plan.quick() if args.quick else Plan()
    if args.repeats is not None:
        plan.repeats = args.repeats
    start = time.perf_counter()
    ensure_model(args.model)
    model = AgillmForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)  # our own folder
    rows, prompts = bench(model, tokenizer, plan, DECODERS)
    checks = targets(rows)
    diagnostics = nat_block_diagnostics(model, tokenizer, plan.diagnostic_windows)
    metrics_file = args.model.parent / "pretrain_metrics.json"
    training = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    machine = machine_info(args.threads)
    model_dir = args.model.resolve()
    model_dir = str(model_dir.relative_to(REPO_ROOT) if model_dir.is_relative_to(REPO_ROOT) else model_dir)
    setup_lines = setup_text(model_dir, training, model, plan, prompts, machine)
    report = markdown_report(rows, checks, diagnostics, setup_lines, prompts, args.quick, time.perf_counter() - start)
    raw = {"machine": machine, "plan": asdict(plan), "model": str(args.model), "rows": rows, "targets": checks,
           "nat_block_diagnostics": diagnostics, "prompts": prompts}  # fmt: skip
    write_report(args.output, report, raw, echo_report=True)
    return raw
