"""Load an AGILLM Hub-ready folder the way a Hub user would, and generate with `pipeline("text-generation")`.

Meant to run as a script in a fresh interpreter that cannot import this repository (see `run_in_fresh_process`),
so the model can only come from the folder's own remote code (`trust_remote_code=True`). It imports nothing from
this repository; it needs only the installed packages.

Prompts come from a JSON file: each one is either a chat (a list of `{"role", "content"}` messages, rendered by the
folder's chat template) or a plain string (continued as text). Results are written as JSON, and printed.

    python -I demo/chat_in_fresh_process.py FOLDER --prompts prompts.json --results results.json \
        --generate-kwargs '{"do_sample": false, "max_new_tokens": 48}'
"""

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# The repository's top-level modules; none may be importable, or the remote-code path would not be what is tested.
REPO_MODULES = ("modeling_agillm", "configuration_agillm", "processing_agillm", "demo", "convert")


def assert_repo_not_importable() -> None:
    importable = [name for name in REPO_MODULES if importlib.util.find_spec(name) is not None]
    if importable:
        raise RuntimeError(
            f"this check must run where the AGILLM repository is not importable, but {importable} can be imported "
            f"(sys.path={sys.path})."
        )


def load_folder(folder: str):
    """Model, tokenizer (and processor when the folder has one) through the Auto classes, as remote code."""
    from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert_remote_code(model)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    processor = None
    if (Path(folder) / "processor_config.json").is_file():
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert_remote_code(processor)
    return model, tokenizer, processor


def assert_remote_code(obj) -> None:
    # Remote code lives in the dynamic `transformers_modules` package; anything else means a local class leaked in.
    if not type(obj).__module__.startswith("transformers_modules."):
        raise RuntimeError(f"expected a remote-code class, got {type(obj).__module__}.{type(obj).__name__}")


def answer_text(output, prompt) -> str:
    """The generated part of one pipeline output: the assistant message of a chat, or the continuation of a text."""
    generated = output[0]["generated_text"]
    if isinstance(prompt, list):
        return generated[-1]["content"]
    return generated


def show(prompt, answer: str) -> None:
    if isinstance(prompt, list):
        print(f"\n  user> {prompt[-1]['content']}\n  assistant> {answer.strip()}", flush=True)
    else:
        print(f"\n  prompt> {prompt}\n  continuation>\n{prompt}{answer}", flush=True)


def generate_answers(generator, prompts: list, generate_kwargs: dict, seed: int) -> list[dict]:
    import torch
    from transformers import set_seed

    results = []
    for index, prompt in enumerate(prompts):
        set_seed(seed + index)  # each answer reproducible on its own, whatever came before it
        started = time.perf_counter()
        with torch.inference_mode():
            # Chats come back as the message list (the answer is the last message); texts as the continuation only.
            output = generator(prompt, return_full_text=isinstance(prompt, list), **generate_kwargs)
        answer = answer_text(output, prompt)
        show(prompt, answer)
        results.append({"prompt": prompt, "answer": answer, "seconds": round(time.perf_counter() - started, 2)})
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a Hub-ready AGILLM folder")
    parser.add_argument("--prompts", required=True, help="JSON file: a list of chats (message lists) or strings")
    parser.add_argument("--results", required=True, help="where to write the answers as JSON")
    parser.add_argument("--generate-kwargs", default="{}", help="JSON dict passed to the pipeline call")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    assert_repo_not_importable()
    # peft (imported by transformers' loading code) imports bitsandbytes, which warns on some CPUs that it cannot
    # fetch an optional Hub kernel; nothing here uses bitsandbytes, so that warning is noise.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers import pipeline

    started = time.perf_counter()
    model, tokenizer, processor = load_folder(args.folder)
    load_seconds = time.perf_counter() - started
    print(
        f"  loaded {type(model).__module__}.{type(model).__name__} "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) in {load_seconds:.1f}s"
        + (f", processor {type(processor).__name__}" if processor is not None else ""),
        flush=True,
    )
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    generate_kwargs = json.loads(args.generate_kwargs)
    prompts = json.loads(Path(args.prompts).read_text(encoding="utf-8"))
    results = generate_answers(generator, prompts, generate_kwargs, args.seed)
    report = {
        "model_class": f"{type(model).__module__}.{type(model).__name__}",
        "processor_class": type(processor).__name__ if processor is not None else None,
        "load_seconds": round(load_seconds, 2),
        "generate_kwargs": generate_kwargs,
        "results": results,
    }
    Path(args.results).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")


def run_in_fresh_process(folder: Path, prompts: list, generate_kwargs: dict, seed: int = 0) -> dict:
    """Run this file in a new interpreter that cannot import the repository; return its JSON report.

    `-I` (isolated mode) ignores PYTHONPATH and does not put the script's folder on `sys.path`; the working
    directory is an empty temporary folder, so `''` on `sys.path` finds nothing either. Output streams live.
    """
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory(prefix="agillm-fresh-") as workdir:
        prompts_file = Path(workdir) / "prompts.json"
        results_file = Path(workdir) / "results.json"
        prompts_file.write_text(json.dumps(prompts, ensure_ascii=False), encoding="utf-8")
        command = [
            sys.executable, "-I", str(Path(__file__).resolve()), str(Path(folder).resolve()),
            "--prompts", str(prompts_file), "--results", str(results_file),
            "--generate-kwargs", json.dumps(generate_kwargs), "--seed", str(seed),
        ]  # fmt: skip
        subprocess.run(command, cwd=workdir, env=env, check=True)
        return json.loads(results_file.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
