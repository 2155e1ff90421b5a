"""Run every scale-out engine on tiny AGILLM models and compare each with the single-process model.

`run_suite(root)` is what `tests/test_scale_out.py` asserts on and what `bench/scale_out.py` tabulates:

1. saves the tiny models of `common.MODEL_FIELDS` (built from this repository's code) as Hub-ready folders;
2. one `torch.distributed.run --nproc_per_node 2` launch runs all multi-process engines (`worker.py`);
3. disk offload runs here, in this single process;
4. the single-process reference (logits, greedy tokens, SGD losses, trained logits) runs here from the same folders;
5. the folders the training engines saved are reloaded as remote code in a fresh interpreter (`reload.py`).
"""

import time
from pathlib import Path

import torch

from configuration_agillm import AgillmConfig
from modeling_agillm import AgillmForCausalLM

from . import common


def save_model_folders(root: Path) -> dict[str, Path]:
    folders = {}
    for name, fields in common.MODEL_FIELDS.items():
        torch.manual_seed(0)
        AgillmForCausalLM(AgillmConfig(**fields)).save_pretrained(root / name)
        folders[name] = root / name
    return folders


def run_suite(root: Path) -> dict:
    """`{"engines": {engine: row}, "seconds": {...}}`; a row holds the comparison figures of one engine."""
    start = time.perf_counter()
    folders = save_model_folders(root / "models")
    worker_start = time.perf_counter()
    results = common.run_distributed_worker(folders, common.DISTRIBUTED_ENGINES, root / "workers")
    worker_seconds = time.perf_counter() - worker_start
    tensors = {}
    for name in common.DISTRIBUTED_ENGINES:
        if results.get(name, {}).get("ok"):
            tensors[name] = torch.load(root / "workers" / f"{name}.pt")
        else:
            results.setdefault(name, {"ok": False, "error": "the launch ended before this engine ran"})

    offload_start = time.perf_counter()
    try:
        tensors["disk_offload"], scalars = common.disk_offload(folders["dense"], root / "offload")
        results["disk_offload"] = {"ok": True, "error": None, **scalars}
    except Exception as error:  # reported in the table and by the test, like a failing distributed engine
        results["disk_offload"] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    results["disk_offload"]["seconds"] = round(time.perf_counter() - offload_start, 2)

    reference = common.single_process_reference(folders)
    saved = {name: Path(result["saved"]) for name, result in results.items() if result.get("saved")}
    reloaded = common.reload_in_fresh_process(saved, root / "reload") if saved else {}

    rows = {}
    for name, (model_name, configured, trains) in common.ENGINES.items():
        result, ref = results[name], reference[model_name]
        row = {"engine": name, "model": model_name, "configured": configured, "trains": trains, **result}
        if result["ok"]:
            got = tensors[name]
            row["logits_diff"] = common.max_abs_diff(got["logits"], ref["logits"])
            if "held_parameter_elements" in result:  # rank 0's share of the weights
                row["held_fraction"] = result["held_parameter_elements"] / ref["parameter_elements"]
            if "tokens" in got:
                row["tokens_equal"] = torch.equal(got["tokens"], ref["tokens"])
            if trains:
                row["reference_losses"] = ref["losses"]
                row["loss_diff"] = max(abs(a - b) for a, b in zip(result["losses"], ref["losses"], strict=True))
                row["trained_logits_diff"] = common.max_abs_diff(got["trained_logits"], ref["trained_logits"])
            if name in reloaded:
                again = reloaded[name]
                row["reload"] = {key: again[key] for key in ("class", "files", "auto_map")}
                row["reload_logits_diff"] = common.max_abs_diff(again["logits"], got["trained_logits"])
        rows[name] = row
    return {
        "engines": rows,
        "seconds": {"total": time.perf_counter() - start, "distributed_launch": worker_seconds},
    }
