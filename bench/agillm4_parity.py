"""Parity of converted AGILLM 4.x checkpoints with the native model's recorded outputs.

`python -m bench.agillm4_parity` converts every fixture of FORMAT.md (`dense`, `dense_plain`, `tiekv`, `moe`,
`tied`, `metric`) with `convert_agillm4`, runs the model both in memory and reloaded from the written folder as
remote code, under eager and sdpa attention, fp32, and writes the max abs difference of every reference tensor to
`bench/agillm4_parity.md`. `tests/test_agillm4_convert.py` asserts the same measurements against `TOLERANCE`.

The fixtures live in `AGILLM41_FIXTURES` (default `../shared/agillm41` beside the repository); each `<name>.expected.safetensors` holds
the original's outputs on `input_ids` (FORMAT.md section 7).
"""

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


# `../shared/agillm41` beside the repository (where CI and the development machines have it), unless overridden.
FIXTURE_DIR = Path(
    os.environ.get("AGILLM41_FIXTURES", Path(__file__).resolve().parent.parent.parent / "shared" / "agillm41")
)
# fixture -> the reference outputs it is compared with (`dense_plain` holds `dense`'s weights in a plain container)
FIXTURES = {
    "dense": "dense", "dense_plain": "dense", "tiekv": "tiekv", "moe": "moe", "tied": "tied", "metric": "metric",
}
# Max abs difference allowed for float tensors (FORMAT.md section 8): `tied` logits reach ~80, so fp32 rounding
# of a 64-term dot product is ~10x larger there.
TOLERANCE = {"tied": 1e-3}
DEFAULT_TOLERANCE = 1e-4
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
GREEDY_NEW_TOKENS = 8
OUTPUT = Path(__file__).resolve().parent / "agillm4_parity.md"


def tolerance(fixture: str) -> float:
    return TOLERANCE.get(FIXTURES[fixture], DEFAULT_TOLERANCE)


def load_expected(fixture: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURE_DIR / f"{FIXTURES[fixture]}.expected.safetensors")


def _max_abs(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {list(actual.shape)} != expected {list(expected.shape)}")
    return (actual.float() - expected.float()).abs().max().item()


def _mismatches(actual: torch.Tensor, expected: torch.Tensor) -> int:
    """Number of differing entries of two integer tensors of the same shape (0 = identical)."""
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {list(actual.shape)} != expected {list(expected.shape)}")
    return int((actual != expected).sum())


class ResidualRecorder:
    """Records the AR pass's residual stream: the embedding output and every decoder layer's output."""

    def __init__(self, model):
        self.states: list[torch.Tensor] = []
        modules = [model.model.embed_tokens, *model.model.layers]
        self.handles = [module.register_forward_hook(self._record) for module in modules]

    def _record(self, module, inputs, output):
        self.states.append(output[0] if isinstance(output, tuple) else output)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def _objective_diffs(model, expected: dict, objective: str) -> dict[str, float | int]:
    input_ids = expected["input_ids"]
    moe = bool(model.config.num_experts)
    with ResidualRecorder(model) as recorder:
        output = model(input_ids, objective=objective, output_hidden_states=True, output_router_logits=moe,
                       use_cache=False)
    diffs = {
        # hidden_states[-1] is the trunk's output after the final norm, which is what the references record
        f"hidden_{objective}": _max_abs(output.hidden_states[-1], expected[f"hidden_{objective}"]),
        f"{objective}_logits": _max_abs(output.logits, expected[f"{objective}_logits"]),
    }
    if objective == "ar":
        diffs["layer_states_ar"] = _max_abs(torch.stack(recorder.states), expected["layer_states_ar"])
    if objective == "sat":
        diffs["sat_gate_logits"] = _max_abs(output.gate_logits, expected["sat_gate_logits"])
    if moe:
        router_logits = torch.stack(output.router_logits)  # [layers, tokens, experts]
        diffs[f"moe_router_logits_{objective}"] = _max_abs(router_logits, expected[f"moe_router_logits_{objective}"])
        diffs[f"moe_top1_expert_{objective}"] = _mismatches(
            router_logits.argmax(-1), expected[f"moe_top1_expert_{objective}"]
        )
    return diffs


@torch.no_grad()
def _greedy_diffs(model, expected: dict) -> dict[str, float | int]:
    """Greedy AR continuation of the recorded prompt, with the converted generation config (no penalties).

    The reference run did not stop early, and the converted generation config keeps the checkpoint's eos id, so a
    model that emitted eos would stop and fail the comparison rather than hide the difference.
    """
    prompt = expected["greedy_prompt_ids"][None]
    output = model.generate(prompt, do_sample=False, max_new_tokens=GREEDY_NEW_TOKENS, output_logits=True,
                            return_dict_in_generate=True)
    generated = output.sequences[0, prompt.shape[1]:]
    reference = expected["greedy_generated_ids"]
    if generated.shape != reference.shape:  # stopped early (eos): every missing token counts as a mismatch
        return {"greedy_generated_ids": len(reference), "greedy_step_logits": float("inf")}
    return {
        "greedy_generated_ids": _mismatches(generated, reference),
        "greedy_step_logits": _max_abs(torch.stack(output.logits)[:, 0], expected["greedy_step_logits"]),
    }


def measure_parity(model, expected: dict, attn_implementation: str) -> dict[str, float | int]:
    """Max abs difference of every reference tensor (float tensors) or count of mismatches (ids, experts).

    `model` must be in eval mode and fp32; objectives run in the order the references were recorded.
    """
    model.set_attn_implementation(attn_implementation)
    diffs = {}
    for objective in ("ar", "sat", "nat"):
        diffs |= _objective_diffs(model, expected, objective)
    if "greedy_prompt_ids" in expected:
        diffs |= _greedy_diffs(model, expected)
    return diffs


def within_tolerance(diffs: dict, fixture: str) -> list[str]:
    """The names of the measurements that fail: any id mismatch, or a float difference above the tolerance."""
    failures = []
    for name, value in diffs.items():
        if (isinstance(value, int) and value != 0) or (isinstance(value, float) and not value <= tolerance(fixture)):
            failures.append(f"{name}={value}")
    return failures


# --------------------------------------------------------------------------------------------------- report


def _format(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:.1e}"


def measure_all(work_dir: Path) -> dict[tuple[str, str], dict[str, float | int]]:
    """`{(fixture, "memory"|"folder" + "/" + attn): diffs}` for every fixture."""
    from transformers import AutoModelForCausalLM

    from convert.agillm4 import agillm4_to_agillm, convert_agillm4, load_agillm4_checkpoint

    results = {}
    for fixture in FIXTURES:
        expected = load_expected(fixture)
        checkpoint_path = FIXTURE_DIR / f"{fixture}.pt"
        folder = convert_agillm4(checkpoint_path, work_dir / fixture)
        models = {
            "memory": agillm4_to_agillm(load_agillm4_checkpoint(checkpoint_path)),
            "folder": AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval(),
        }
        for source, model in models.items():
            for attn_implementation in ATTN_IMPLEMENTATIONS:
                key = fixture, f"{source}/{attn_implementation}"
                results[key] = measure_parity(model, expected, attn_implementation)
    return results


def write_report(results: dict, seconds: float, path: Path = OUTPUT) -> None:
    columns = [f"{source}/{attn}" for source in ("memory", "folder") for attn in ATTN_IMPLEMENTATIONS]
    lines = [
        "# AGILLM 4.x conversion parity",
        "",
        f"Generated by `python -m bench.agillm4_parity` in {seconds:.0f} s; torch {torch.__version__}, "
        f"{platform.machine()}, fp32, CPU.",
        "",
        "Max abs difference between the converted model and the native AGILLM 4.x reference outputs recorded in "
        f"`../shared/agillm41/<name>.expected.safetensors` (FORMAT.md section 7), on its `input_ids` [2, 16]. "
        "`memory` is `agillm4_to_agillm(load_agillm4_checkpoint(file))`; `folder` is the folder written by "
        "`convert_agillm4`, reloaded with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`. "
        "Rows `moe_top1_expert_*` and `greedy_generated_ids` count differing entries (0 = identical). "
        "`hidden_*` is the final-norm output (`hidden_states[-1]`), `layer_states_ar` the embedding output and every "
        "block's residual output of the AR pass, `moe_router_logits_*` the per-layer router logits "
        "(`output_router_logits=True`), greedy = `generate(do_sample=False, max_new_tokens=8)` on "
        "`greedy_prompt_ids`.",
        "",
        "| fixture | tensor | " + " | ".join(columns) + " | tolerance |",
        "| --- | --- | " + " | ".join("---:" for _ in columns) + " | ---: |",
    ]
    for fixture in FIXTURES:
        for name in results[fixture, columns[0]]:
            values = " | ".join(_format(results[fixture, column][name]) for column in columns)
            limit = "identical" if isinstance(results[fixture, columns[0]][name], int) else f"{tolerance(fixture):.0e}"
            lines.append(f"| {fixture} | {name} | {values} | {limit} |")
    worst = max(value for diffs in results.values() for value in diffs.values() if isinstance(value, float))
    failures = {key: within_tolerance(diffs, key[0]) for key, diffs in results.items()}
    failures = {key: names for key, names in failures.items() if names}
    lines += ["", f"Largest float difference: {worst:.2e}. "
              + ("All measurements within tolerance." if not failures else f"FAILURES: {failures}")]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agillm4_parity", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"report to write (default: {OUTPUT})")
    args = parser.parse_args(argv)
    if not FIXTURE_DIR.is_dir():
        parser.error(f"fixture folder {FIXTURE_DIR} not found; set AGILLM41_FIXTURES")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work_dir:
        results = measure_all(Path(work_dir))
    write_report(results, time.perf_counter() - start, args.output)
    print(args.output.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
