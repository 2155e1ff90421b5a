"""Reload folders saved by the scale-out engines as remote code, in a fresh interpreter that cannot see the repository.

    python -I tests/scale_out/reload.py '{"fsdp2": "OUT/saved_fsdp2", ...}' OUT/reloaded.pt

Writes `{name: {"class": module.qualname of the loaded model, "files": [files in the folder], "logits": ...}}`:
logits of `common.batch_ids()` in eval mode, for comparison with the engine's own logits of the trained model.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch


def _load_common():
    spec = importlib.util.spec_from_file_location("scale_out_common", Path(__file__).with_name("common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    common = _load_common()
    for module in ("configuration_agillm", "modeling_agillm"):
        if importlib.util.find_spec(module) is not None:
            sys.exit(f"{module} is importable: the repository leaked onto sys.path")
    folders, output = json.loads(sys.argv[1]), sys.argv[2]
    results = {}
    for name, folder in folders.items():
        model = common.load_remote(folder).eval()
        with torch.no_grad():
            logits = model(input_ids=common.batch_ids()).logits
        results[name] = {
            "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "files": sorted(os.listdir(folder)),
            "auto_map": model.config.auto_map,
            "logits": logits,
        }
    torch.save(results, output)


if __name__ == "__main__":
    main()
