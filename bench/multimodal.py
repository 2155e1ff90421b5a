"""The multimodal AGILLM on held-out items (issue 5): digit recognition from images, emoji category from images,
spoken digits in unseen voices, and text -> digit image judged by an independent classifier.

Runs `demo.multimodal.run` (data, splits, training and evaluation are described there; the VQ-VAE comes from
`outputs/agillm-vqvae`, trained first if missing) and tabulates its metrics. Needs `make data-multimodal` for the
emoji and speech tasks; a quick run trains 60 steps on the digit tasks only, into `outputs/bench/`.

Writes `bench/multimodal.md` and `bench/multimodal.json`.
Usage: `python -m bench multimodal [--quick] [--steps N] [--time-cap-minutes M]`.
"""

import time
from pathlib import Path

import torch

from demo import multimodal

from .cli import REPO_ROOT, bench_parser, parse_bench_args, write_report
from .compare_llama import machine_info


QUICK_STEPS = 60
TARGETS = {"digit_accuracy": 0.90, "spoken_digit_accuracy": 0.80, "drawn_digits_recognisable": 0.70}
ROWS = (  # metric, task whose test set it uses, what it measures
    ("digit_accuracy", "digit", "digit from an image (scikit-learn 8x8 digits, 20% held out)"),
    ("emoji_category_accuracy", "emoji", "emoji category from an image (Twemoji, every 5th held out)"),
    ("emoji_exact_caption", "emoji", "emoji caption exactly right (category and name)"),
    ("spoken_digit_accuracy", "speech", "spoken digit, voices never heard in training"),
    ("drawn_digits_recognisable", None, "text -> digit image, recognised as the asked digit by an SVC"),
)


def markdown_report(metrics: dict, machine: dict, seconds: float, quick: bool) -> str:
    lines = ["# Multimodal AGILLM: held-out accuracy", ""]
    if quick:
        lines += [f"**Quick run** (digit tasks, {QUICK_STEPS} training steps): checks that the bench runs; the "
                  "numbers mean little.", ""]
    if metrics.get("stopped_by_time_cap"):
        lines += [f"**WARNING: training {metrics['time_cap_note']}**: the model is undertrained.", ""]
    lines += ["| held-out task | accuracy | target | test items |", "|---|---:|---:|---:|"]
    for key, task, title in ROWS:
        if key not in metrics:
            continue
        items = metrics["counts"][task]["test"] if task else 10 * multimodal.DRAW_SAMPLES_PER_DIGIT
        target = f">= {TARGETS[key]:.0%}" if key in TARGETS else ""
        lines.append(f"| {title} | **{metrics[key]:.1%}** | {target} | {items} |")
    if "drawn_per_digit" in metrics:
        per_digit = ", ".join(f"{d}: {v:.0%}" for d, v in metrics["drawn_per_digit"].items())
        lines += ["", f"Drawn digits recognised, per digit: {per_digit}. Samples (row d = digit d): "
                      f"`{Path(metrics['drawn_grid']).relative_to(REPO_ROOT) if Path(metrics['drawn_grid']).is_relative_to(REPO_ROOT) else metrics['drawn_grid']}`."]
    if "emoji_examples" in metrics:
        lines += ["", "Emoji captions (held out; reference -> generated):", ""]
        lines += [f"- {e['caption']} -> {e['generated']}" for e in metrics["emoji_examples"][:6]]
    if "held_out_voices" in metrics:
        lines += ["", f"Held-out voices ({len(metrics['held_out_voices'])}): {', '.join(metrics['held_out_voices'])}."]
    counts = ", ".join(f"{task} {c['train']}" for task, c in metrics["counts"].items())
    lines += [
        "",
        "## Setup",
        "",
        f"- One `AgillmForConditionalGeneration`, {metrics['parameters'] / 1e6:.1f}M parameters (decoder, ViT and "
        "log-mel audio towers trained end to end; the VQ-VAE frozen), from scratch: "
        f"{metrics['train_steps']} AdamW steps in {metrics['train_seconds'] / 60:.1f} min, batches of "
        f"{multimodal.BATCH_SIZE} from one task each (odds {multimodal.TASK_WEIGHTS}). Training examples: {counts}.",
        "- Answers are greedy `generate` on left-padded batches built by `AgillmProcessor`; drawings are sampled "
        f"(`generate_images`, temperature {multimodal.DRAW_TEMPERATURE}, top-k {multimodal.DRAW_TOP_K}), decoded by the VQ-VAE, brought to 8x8 and classified by an "
        "SVC fitted on the training digits only.",
        f"- Machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}, "
        f"transformers {machine['transformers']}, {machine['date']}. Whole run: {seconds / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = bench_parser("multimodal", __doc__.splitlines()[0],
                          quick_help=f"{QUICK_STEPS} training steps on the digit tasks")
    parser.add_argument("--steps", type=int, default=multimodal.DEFAULT_TRAIN_STEPS,
                        help=f"training steps (default {multimodal.DEFAULT_TRAIN_STEPS})")
    parser.add_argument("--time-cap-minutes", type=float, default=None,
                        help="stop training after this many minutes even if steps remain, with a loud warning")
    args = parse_bench_args(parser, "multimodal", argv)
    if args.steps < 1 or (args.time_cap_minutes is not None and args.time_cap_minutes <= 0):
        parser.error("--steps must be >= 1 and --time-cap-minutes positive")
    torch.set_num_threads(args.threads)
    output_dir = REPO_ROOT / "outputs" / ("bench" if args.quick else "")
    start = time.perf_counter()
    if args.quick:
        metrics = multimodal.run(output_dir, steps=QUICK_STEPS, tasks=("digit", "draw"), vq_steps=20,
                                 images_dir=output_dir / "images", time_cap_minutes=args.time_cap_minutes)
    else:
        metrics = multimodal.run(output_dir, steps=args.steps, time_cap_minutes=args.time_cap_minutes)
    machine = machine_info(args.threads)
    report = markdown_report(metrics, machine, time.perf_counter() - start, args.quick)
    raw = {"machine": machine, **{k: v for k, v in metrics.items() if k != "train_log"}}
    write_report(args.output, report, raw, echo_report=True)
    return raw
