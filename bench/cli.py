"""Options every table-writing bench shares: `--quick`, `--threads`, `--output` (a quick run never overwrites the
reference table in `bench/`)."""

import argparse
import json
import os
from pathlib import Path


BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


def bench_parser(name: str, description: str, quick_help: str) -> argparse.ArgumentParser:
    """`python -m bench NAME`'s parser with the shared options; the bench adds its own before parsing."""
    parser = argparse.ArgumentParser(prog=f"python -m bench {name}", description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: usable CPUs)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"markdown path; the JSON goes next to it (default: bench/{name}.md, or outputs/bench/{name}-quick.md "
        "with --quick)",
    )
    return parser


def add_repeats_option(parser: argparse.ArgumentParser, help: str) -> None:
    """`--repeats N` (N >= 1, checked by argparse) for the benches that repeat their timed runs; None keeps the
    plan's own count."""
    parser.add_argument("--repeats", type=_positive_int, default=None, help=help)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_bench_args(parser: argparse.ArgumentParser, name: str, argv=None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.output is None:
        args.output = REPO_ROOT / f"outputs/bench/{name}-quick.md" if args.quick else BENCH_DIR / f"{name}.md"
    return args


def write_report(output: Path, report: str, raw: dict, *, echo_report: bool = False, json_default=None) -> None:
    """Write the markdown table to `output` and the raw figures as JSON next to it; print the table (with
    `echo_report`) and where both went."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    output.with_suffix(".json").write_text(json.dumps(raw, indent=2, default=json_default) + "\n")
    if echo_report:
        print(report)
    print(f"Written: {output} and {output.with_suffix('.json')}")
