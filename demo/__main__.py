"""`python -m demo`: the AGILLM main job. See `demo/__init__.py` for what each part does; `--help` for options."""

import os


# Nothing here needs the network (weights and corpus come from installed packages). Set before any Hugging Face
# import, which reads it once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


# peft (imported by transformers' Trainer and loading code) imports bitsandbytes, which on some CPUs warns that it
# cannot fetch an optional Hub kernel. Nothing here uses bitsandbytes, so that warning is noise.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from demo import multimodal, pretrain, pretrain_shakespeare, smollm2_chat  # noqa: E402
from demo.time_cap import loud_warning  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parent.parent
SUMMARY_NAME = "demo_summary.md"  # the short results file the README quotes
TIMINGS_NAME = "demo_timings.json"
SMOLLM2_STEP = "SmolLM2: convert + chat in a fresh process"
PRETRAIN_STEP = "Shakespeare: data + train + eval + save + sample"
MULTIMODAL_STEP = "Multimodal: VQ-VAE + data + train + eval + images"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="The AGILLM main job: SmolLM2 as an AGILLM Hub folder + chat, Shakespeare pre-training, then a "
        "multimodal AGILLM (digits, emoji, spoken digits, text -> image).",
    )
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "outputs", help="default: outputs/")
    parser.add_argument("--skip-smollm2", action="store_true", help="skip the SmolLM2 conversion and chat")
    parser.add_argument(
        "--reuse-smollm2", action="store_true", help="chat with an already converted SmolLM2 folder if there is one"
    )
    parser.add_argument("--skip-pretrain", action="store_true", help="skip the Shakespeare pre-training")
    parser.add_argument(
        "--train-steps",
        type=int,
        default=pretrain_shakespeare.DEFAULT_TRAIN_STEPS,
        help=f"optimizer steps of the Shakespeare pre-training (default: {pretrain_shakespeare.DEFAULT_TRAIN_STEPS}, "
        f"about {pretrain_shakespeare.DEFAULT_TRAIN_STEPS_MINUTES} min on a quiet 2-core CPU; longer on a busy one)",
    )
    parser.add_argument(
        "--train-time-cap-minutes",
        type=float,
        default=None,
        help="stop the Shakespeare training after this many minutes even if steps remain; the run then warns loudly "
        "and its metrics and the summary say it was cut short (default: no cap)",
    )
    parser.add_argument(
        "--report-to",
        nargs="+",
        default=["none"],
        metavar="INTEGRATION",
        help="Trainer integrations the Shakespeare pre-training also logs to (e.g. tensorboard, trackio, where "
        "installed), in OUTPUT_DIR/logs (default: none)",
    )
    parser.add_argument("--skip-multimodal", action="store_true", help="skip the multimodal training")
    parser.add_argument(
        "--multimodal-steps",
        type=int,
        default=multimodal.DEFAULT_TRAIN_STEPS,
        help=f"optimizer steps of the multimodal training (default: {multimodal.DEFAULT_TRAIN_STEPS}, about "
        f"{multimodal.DEFAULT_TRAIN_STEPS_MINUTES} min on a quiet 2-core CPU; longer on a busy one)",
    )
    parser.add_argument(
        "--multimodal-time-cap-minutes",
        type=float,
        default=None,
        help="stop the multimodal training after this many minutes even if steps remain, likewise (default: no cap)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for option in ("train_steps", "multimodal_steps"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    for option in ("train_time_cap_minutes", "multimodal_time_cap_minutes"):
        if getattr(args, option) is not None and getattr(args, option) <= 0:
            parser.error(f"--{option.replace('_', '-')} must be positive, got {getattr(args, option)}")
    try:
        args.report_to = pretrain.reporting_integrations(args.report_to)
    except ValueError as error:
        parser.error(str(error))
    return args


def training_text(steps: int, time_cap_minutes: float | None) -> str:
    cap = "" if time_cap_minutes is None else f", capped at {time_cap_minutes:g} min"
    return f"{steps} steps of CPU training{cap}"


def banner(title: str) -> None:
    print(f"\n{'=' * 100}\n{title}\n{'=' * 100}", flush=True)


def chat_section(chat: dict) -> list[str]:
    lines = [f"## SmolLM2-135M-Instruct as AGILLM (`{Path(chat['folder']).name}/`, fresh process, greedy)", ""]
    for result in chat["results"]:
        lines += [f"**user:** {result['prompt'][-1]['content']}", "", f"**assistant:** {result['answer'].strip()}", ""]
    return lines


def pretrain_section(metrics: dict) -> list[str]:
    if "held_out_losses_before" not in metrics:  # a results file from before the model had SAT and NAT heads
        return ["## AGILLM pre-trained on Shakespeare", "", "Results file from an older version: re-run the pre-training."]
    sample = metrics["samples"][0]
    return [
        f"## AGILLM pre-trained on Shakespeare (`{pretrain_shakespeare.MODEL_FOLDER}/`, "
        f"{metrics['parameters'] / 1e6:.1f}M parameters, {metrics['train_seconds'] / 60:.0f} min on CPU)",
        "",
        *time_cap_lines(metrics),
        f"Heads {', '.join(head.upper() for head in metrics['config']['heads'])}, loss weights "
        f"{metrics['config']['objective_weights']}. {metrics['steps']} steps, {metrics['tokens_seen']:,} training "
        f"tokens in {metrics['train_seconds']:.0f} s ({metrics['tokens_per_second']:,} tokens/s). Held-out AR perplexity "
        f"({', '.join(metrics['held_out_plays'])}, {metrics['eval_blocks']} blocks): "
        f"**{metrics['perplexity_before']:,.1f} before -> {metrics['perplexity_after']:,.1f} after**.",
        "",
        pretrain_shakespeare.evaluation_table(metrics),
        "",
        f"Sample from the saved folder, in a fresh process (its generation config: {metrics['sampling']}):",
        "",
        "```",
        sample["prompt"] + sample["answer"],
        "```",
        "",
        f"Loss curve: `{pretrain_shakespeare.PLOT_FILE}`; all numbers: `{pretrain_shakespeare.METRICS_FILE}`.",
    ]


def time_cap_lines(metrics: dict) -> list[str]:
    """A bold warning when the time cap cut the training short (absent from results files of older versions)."""
    if not metrics.get("stopped_by_time_cap"):
        return []
    return [f"**WARNING: training {metrics['time_cap_note']}**: the model is undertrained; these figures are not "
            "those of a full run.", ""]  # fmt: skip


def multimodal_section(metrics: dict) -> list[str]:
    rows = [
        ("digit from image (scikit-learn digits)", "digit_accuracy", "digit"),
        ("emoji category from image (Twemoji)", "emoji_category_accuracy", "emoji"),
        ("spoken digit, unseen voices", "spoken_digit_accuracy", "speech"),
        ("text -> digit image recognisable (SVC judge)", "drawn_digits_recognisable", None),
    ]
    lines = [
        f"## Multimodal AGILLM (`{multimodal.MODEL_FOLDER}/`, {metrics['parameters'] / 1e6:.1f}M parameters, "
        f"{metrics['train_seconds'] / 60:.0f} min on CPU, {metrics['train_steps']} steps)",
        "",
        *time_cap_lines(metrics),
        "| held-out task | accuracy | test items |",
        "|---|---|---|",
    ]
    for title, key, task in rows:
        if key in metrics:
            items = metrics["counts"][task]["test"] if task else 10 * multimodal.DRAW_SAMPLES_PER_DIGIT
            lines.append(f"| {title} | {metrics[key]:.1%} | {items} |")
    if "drawn_grid" in metrics:
        lines += ["", f"Drawn digits (one row per digit 0-9): `{metrics['drawn_grid']}`."]
    return lines


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def summary_markdown(output_dir: Path, timings: dict) -> str:
    """The results file the README can quote.

    Built from the parts' own results files in `output_dir`, whichever exist, so re-running one part with the
    other skipped updates that part's section and keeps the other's.
    """
    lines = ["# `python -m demo` results", "", "| step (latest run) | wall time |", "|---|---|"]
    lines += [f"| {step} | {seconds:.0f} s |" for step, seconds in timings.items()]
    if (chat := read_json(output_dir / smollm2_chat.RESULTS_FILE)) is not None:
        lines += ["", *chat_section(chat)]
    if (pretrain := read_json(output_dir / pretrain_shakespeare.METRICS_FILE)) is not None:
        lines += ["", *pretrain_section(pretrain)]
    if (mm := read_json(output_dir / multimodal.METRICS_FILE)) is not None:
        lines += ["", *multimodal_section(mm)]
    return "\n".join(lines) + "\n"


def timed(step: str, timings: dict, function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    timings[step] = time.perf_counter() - started
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    output_dir = args.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    timings_path = output_dir / TIMINGS_NAME
    timings = read_json(timings_path) or {}  # the step skipped this time keeps its time from its latest run
    started = time.perf_counter()

    if not args.skip_smollm2:
        banner("1. SmolLM2-135M-Instruct -> AGILLM Hub folder -> chat from a fresh process")
        timed(SMOLLM2_STEP, timings, smollm2_chat.run, output_dir, reuse=args.reuse_smollm2)

    cut_short = []  # the parts the time caps stopped early, repeated at the very end so that nobody misses them
    if not args.skip_pretrain:
        text = training_text(args.train_steps, args.train_time_cap_minutes)
        banner(f"2. Pre-train a small AGILLM on Shakespeare ({text})")
        metrics = timed(PRETRAIN_STEP, timings, pretrain_shakespeare.run, output_dir, args.train_steps,
                        seed=args.seed, time_cap_minutes=args.train_time_cap_minutes, report_to=args.report_to)
        if metrics["stopped_by_time_cap"]:
            cut_short.append(f"Shakespeare pre-training {metrics['time_cap_note']}")

    if not args.skip_multimodal:
        text = training_text(args.multimodal_steps, args.multimodal_time_cap_minutes)
        banner(f"3. Train a small multimodal AGILLM ({text})")
        metrics = timed(MULTIMODAL_STEP, timings, multimodal.run, output_dir, args.multimodal_steps, seed=args.seed,
                        time_cap_minutes=args.multimodal_time_cap_minutes)
        if metrics["stopped_by_time_cap"]:
            cut_short.append(f"multimodal training {metrics['time_cap_note']}")

    timings_path.write_text(json.dumps(timings, indent=2), encoding="utf-8")
    summary_path = output_dir / SUMMARY_NAME
    summary_path.write_text(summary_markdown(output_dir, timings), encoding="utf-8")
    banner("Done")
    for step, seconds in timings.items():
        print(f"  {step:<55} {seconds:7.1f} s")
    print(f"  {'this run, in all':<55} {time.perf_counter() - started:7.1f} s")
    print(f"  results: {summary_path}")
    if cut_short:
        print(loud_warning(*cut_short, "Those models are undertrained: re-run without the time cap for the full run."),
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
