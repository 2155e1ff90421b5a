"""Expert specialisation: token routing vs document routing on a mix of Shakespeare and the Python documentation.

Two tiny MoE AGILLMs with the same config, weights and batches (8 experts, top-2) are trained from scratch on CPU, in
lockstep for a shared time budget: one with `router_scope="token"` (each token picks its experts), one with
`router_scope="document"` (EMO-style: each document picks `experts_per_document` experts from its tokens' mean
router scores, and its tokens route among those only). Training rows pack `segments_per_row` windows of random
training documents, drawn half from Shakespeare's plays (`corpus.shakespeare`) and half from the Python docs
(`corpus.python_docs`), with `position_ids` restarting at each window, so one row can hold documents of both
corpora; the loss is the AR loss plus the
Switch/Mixtral balancing loss and the z-loss (`output_router_logits=True`); no label crosses a document boundary.

Then both models read held-out windows, one document per row: the held-out plays (hamlet, the-tempest) and the
held-out Python pages (`corpus.python_docs.HELD_OUT_DOCS`), the same number of windows of each corpus. Per MoE layer
it reports, from the experts the routers actually chose (`router_indices`):
    usage       each corpus's distribution over experts (share of its token-slot assignments);
    JSD         the Jensen-Shannon divergence between the two corpora's distributions, in bits (0: the corpora use the
                experts alike; 1: disjoint experts). With equal token counts per corpus it equals the mutual
                information between corpus and chosen expert;
    per doc     distinct experts a held-out document's tokens use (at most `experts_per_document` under document
                routing, which the bench checks);
and each model's held-out AR loss per corpus.

Usage: `python -m bench moe_routing [--quick] [--threads N] [--output PATH]` (writes `bench/moe_routing.md` + `.json`).
"""

import argparse
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from configuration_agillm import AgillmConfig
from corpus import python_docs, shakespeare
from modeling_agillm import AgillmForCausalLM

from .cli import REPO_ROOT, bench_parser, parse_bench_args, write_report
from .compare_llama import machine_info


TOKENIZER_DIR = REPO_ROOT / "tokenizer"
CORPORA = ("shakespeare", "python_docs")
SCOPES = ("token", "document")
# One config for both models; only `router_scope` differs.
MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    experts_per_document=3,
    output_router_logits=True,
    router_aux_loss_coef=0.01,
    router_z_loss_coef=0.001,
)
CHARS_PER_TOKEN = 6  # generous: a window of `tokens * 6` characters always holds `tokens` tokens unless the text ends


@dataclass
class Plan:
    """Training and evaluation sizes; `--quick` shrinks them to check that the bench runs end to end."""

    minutes: float = 4.0  # training budget of both models together (they train in lockstep)
    max_steps: int = 1000
    batch_size: int = 4
    segments_per_row: int = 2
    segment_tokens: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    eval_windows: int = 48  # per corpus
    eval_tokens: int = 128
    seed: int = 0

    @classmethod
    def quick(cls) -> "Plan":
        return cls(minutes=0.3, max_steps=10, warmup_steps=2, eval_windows=8, eval_tokens=64)


# --------------------------------------------------------------------------------------------------- data


def corpus_texts() -> dict[str, tuple[list[str], list[str]]]:
    """{corpus: (training documents, held-out documents)}."""
    return {"shakespeare": shakespeare.train_and_held_out(), "python_docs": python_docs.train_and_held_out()}


def window_ids(tokenizer, text: str, start: int, tokens: int) -> list[int] | None:
    """`tokens` ids from the first line start at or after character `start` (None if the text ends before)."""
    line_start = 0 if start == 0 else text.find("\n", start) + 1
    if line_start <= 0:
        return None
    chunk = text[line_start : line_start + tokens * CHARS_PER_TOKEN]
    ids = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
    return ids[:tokens] if len(ids) >= tokens else None


def sample_window(tokenizer, documents: list[str], weights: np.ndarray, tokens: int, rng: random.Random) -> list[int]:
    """A window at a random line start of a random document (drawn by length, so every character counts the same)."""
    while True:
        text = documents[rng.choices(range(len(documents)), weights)[0]]
        ids = window_ids(tokenizer, text, rng.randrange(max(1, len(text) - tokens * CHARS_PER_TOKEN)), tokens)
        if ids is not None:
            return ids


class TrainingBatches:
    """Packed training batches, drawn from a seeded stream on first use and kept, so that the second model trains on
    exactly the batches the first one saw. Each window's corpus is drawn at random (half and half on average)."""

    def __init__(self, tokenizer, texts: dict, plan: Plan):
        self.tokenizer, self.texts, self.plan = tokenizer, texts, plan
        self.rng = random.Random(plan.seed)
        self.weights = {corpus: np.array([len(text) for text in train]) for corpus, (train, _) in texts.items()}
        self.positions = torch.arange(plan.segment_tokens).repeat(plan.segments_per_row)
        self.batches: list[dict[str, torch.Tensor]] = []

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        while len(self.batches) <= step:
            self.batches.append(self._draw())
        return self.batches[step]

    def _draw(self) -> dict[str, torch.Tensor]:
        plan, rows = self.plan, []
        for _ in range(plan.batch_size):
            row = []
            for _ in range(plan.segments_per_row):
                corpus = self.rng.choice(CORPORA)
                documents = self.texts[corpus][0]
                row += sample_window(self.tokenizer, documents, self.weights[corpus], plan.segment_tokens, self.rng)
            rows.append(row)
        input_ids = torch.tensor(rows)
        labels = input_ids.clone()
        # No target across a boundary: a window's first token follows another document.
        labels[:, self.positions == 0] = -100
        return {"input_ids": input_ids, "labels": labels, "position_ids": self.positions.expand_as(input_ids)}


def held_out_windows(tokenizer, documents: list[str], count: int, tokens: int) -> torch.Tensor:
    """`count` windows spread evenly over the held-out documents (evenly spaced line starts within each)."""
    windows = []
    for index, text in enumerate(documents):
        share = count // len(documents) + (index < count % len(documents))
        for fraction in (np.arange(share) + 0.5) / share:
            start = int(fraction * max(0, len(text) - tokens * CHARS_PER_TOKEN))
            ids = window_ids(tokenizer, text, start, tokens) or window_ids(tokenizer, text, 0, tokens)
            if ids is None:
                raise ValueError(f"a held-out document has fewer than {tokens} tokens")
            windows.append(ids)
    return torch.tensor(windows)


# ------------------------------------------------------------------------------------------------- train and evaluate


def build_model(scope: str, vocab_size: int, seed: int) -> AgillmForCausalLM:
    torch.manual_seed(seed)  # the same seed for both scopes: identical initial weights
    config = AgillmConfig(vocab_size=vocab_size, router_scope=scope, **MODEL_SHAPE)
    return AgillmForCausalLM(config)


def learning_rate(plan: Plan, step: int, budget_used: float) -> float:
    """Linear warm-up over `plan.warmup_steps`, then cosine decay to 10% over the time budget."""
    if step < plan.warmup_steps:
        return plan.learning_rate * (step + 1) / plan.warmup_steps
    return plan.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, budget_used))))


def train_in_lockstep(models: dict[str, AgillmForCausalLM], batches: TrainingBatches, plan: Plan) -> dict[str, dict]:
    """One AdamW step of every model per batch, until `plan.minutes` have passed (or `plan.max_steps`).

    Lockstep keeps the comparison fair: the same batches, the same learning rates and the same machine conditions
    (a busy machine slows both alike), and it bounds the bench's time whatever the load.
    """
    optimizers = {
        name: torch.optim.AdamW(model.train().parameters(), lr=plan.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
        for name, model in models.items()
    }
    history = {name: {"seconds": 0.0, "losses": [], "aux_losses": []} for name in models}
    learning_rates, budget, start = [], plan.minutes * 60, time.perf_counter()
    for step in range(plan.max_steps):
        elapsed = time.perf_counter() - start
        if elapsed >= budget:
            break
        learning_rates.append(learning_rate(plan, step, elapsed / budget))
        for name, model in models.items():
            started = time.perf_counter()
            for group in optimizers[name].param_groups:
                group["lr"] = learning_rates[-1]
            output = model(**batches[step])
            optimizers[name].zero_grad(set_to_none=True)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizers[name].step()
            history[name]["seconds"] += time.perf_counter() - started
            history[name]["losses"].append(output.loss.item())
            history[name]["aux_losses"].append(output.aux_loss.item())
    tokens = sum(batches[step]["input_ids"].numel() for step in range(len(learning_rates)))
    return {
        name: {"steps": len(learning_rates), "tokens": tokens, "tokens_per_second": tokens / record["seconds"],
               "learning_rates": learning_rates, **record}
        for name, record in history.items()
    }  # fmt: skip


@torch.no_grad()
def evaluate(model: AgillmForCausalLM, windows: torch.Tensor, batch_size: int = 16) -> dict:
    """Held-out AR loss and, per MoE layer, the experts each window's tokens chose: `[windows, tokens, k]`."""
    model.eval()
    losses, chosen = [], []
    for batch in windows.split(batch_size):
        output = model.model(input_ids=batch, output_router_indices=True)
        logits = model.lm_head(output.last_hidden_state)
        losses.append(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none"))
        chosen.append(torch.stack([index.view(*batch.shape, -1) for index in output.router_indices]))
    # router_indices: [layers, windows, tokens, k]
    return {"loss": torch.cat(losses).mean().item(), "router_indices": torch.cat(chosen, dim=1)}


# --------------------------------------------------------------------------------------------------- specialisation


def usage(router_indices: torch.Tensor, num_experts: int) -> np.ndarray:
    """Share of the token-slot assignments that went to each expert."""
    counts = torch.bincount(router_indices.flatten(), minlength=num_experts).double()
    return (counts / counts.sum()).numpy()


def entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def jensen_shannon_bits(p: np.ndarray, q: np.ndarray) -> float:
    """JSD(p, q) = H((p + q) / 2) - (H(p) + H(q)) / 2: the mutual information between corpus and expert when both
    corpora contribute the same number of assignments."""
    return entropy_bits((p + q) / 2) - (entropy_bits(p) + entropy_bits(q)) / 2


def experts_per_document(router_indices: torch.Tensor) -> float:
    """Mean number of distinct experts a window's tokens use (`router_indices` [windows, tokens, k])."""
    return float(np.mean([window.unique().numel() for window in router_indices]))


def specialisation(evaluations: dict[str, dict], config: AgillmConfig) -> list[dict]:
    """One row per MoE layer: usage per corpus, JSD, experts per held-out document per corpus."""
    rows = []
    for layer in range(config.num_hidden_layers):
        per_corpus = {corpus: evaluations[corpus]["router_indices"][layer] for corpus in CORPORA}
        shares = {corpus: usage(indices, config.num_experts) for corpus, indices in per_corpus.items()}
        per_document = {corpus: experts_per_document(indices) for corpus, indices in per_corpus.items()}
        most = max(max(indices.unique().numel() for indices in per_corpus[corpus]) for corpus in CORPORA)
        if config.router_scope == "document" and most > config.experts_per_document:
            raise RuntimeError(f"layer {layer}: a document used {most} experts (experts_per_document "
                               f"{config.experts_per_document}): document routing is broken")  # fmt: skip
        rows.append({
            "layer": layer,
            "usage": {corpus: share.round(4).tolist() for corpus, share in shares.items()},
            "jsd_bits": jensen_shannon_bits(shares["shakespeare"], shares["python_docs"]),
            "experts_per_document": per_document,
            "max_experts_per_document": most,
        })  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------------- report


def percent_list(shares: list[float]) -> str:
    return " ".join(f"{100 * share:.0f}" for share in shares)


def markdown_report(results: dict, plan: Plan, machine: dict, seconds: float, quick: bool) -> str:
    command = "python -m bench moe_routing --quick" if quick else "python -m bench moe_routing"
    caveat = " (**quick run: reduced sizes, not reference numbers**)" if quick else ""
    shape = MODEL_SHAPE
    lines = [
        "# Expert specialisation: token vs document routing (Shakespeare + Python docs, CPU)",
        "",
        f"Generated by `{command}`{caveat} in {seconds / 60:.1f} min.",
        "",
        "| model | held-out loss, Shakespeare | held-out loss, Python docs | mean | mean JSD over layers (bits) | "
        "experts per held-out document (mean over layers) | train tokens/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scope in SCOPES:
        result = results[scope]
        losses = result["held_out_loss"]
        layers = result["layers"]
        jsd = np.mean([row["jsd_bits"] for row in layers])
        per_document = np.mean([np.mean(list(row["experts_per_document"].values())) for row in layers])
        lines.append(
            f"| `router_scope={scope!r}` | {losses['shakespeare']:.3f} | {losses['python_docs']:.3f} | "
            f"{np.mean(list(losses.values())):.3f} | {jsd:.3f} | {per_document:.2f} | "
            f"{result['training']['tokens_per_second']:,.0f} |"
        )
    lines += [
        "",
        "Per layer: share of each corpus's token-slot assignments per expert (experts 0..7, %), their Jensen-Shannon "
        "divergence (= mutual information between corpus and expert, bits, max 1) and the distinct experts a held-out "
        "document uses:",
        "",
        "| model | layer | Shakespeare usage (%) | Python docs usage (%) | JSD (bits) | experts per document "
        "(Shakespeare / Python) |",
        "| --- | ---: | --- | --- | ---: | ---: |",
    ]
    for scope in SCOPES:
        for row in results[scope]["layers"]:
            per_document = row["experts_per_document"]
            lines.append(
                f"| {scope} | {row['layer']} | {percent_list(row['usage']['shakespeare'])} | "
                f"{percent_list(row['usage']['python_docs'])} | {row['jsd_bits']:.3f} | "
                f"{per_document['shakespeare']:.2f} / {per_document['python_docs']:.2f} |"
            )
    training = results[SCOPES[0]]["training"]
    lines += [
        "",
        "## Setup",
        "",
        f"- Models: AGILLM, hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, every layer MoE with "
        f"{shape['num_experts']} experts of width {shape['moe_intermediate_size']}, "
        f"top-{shape['num_experts_per_tok']} "
        f"(`softmax_topk`), shipped tokenizer (vocabulary 8192, tied embeddings). Document routing: "
        f"`experts_per_document={shape['experts_per_document']}`. Same seed, so both start from the same weights.",
        f"- Training: {training['steps']} AdamW steps for each model, the two in lockstep (a step of each per batch) "
        f"for {plan.minutes} min together; peak lr {plan.learning_rate}, {plan.warmup_steps} warm-up steps, cosine "
        f"to 10% over the budget; batch {plan.batch_size} rows of {plan.segments_per_row} "
        f"packed windows of {plan.segment_tokens} tokens "
        f"({training['tokens']:,} tokens), each window from a random training document of a random corpus (50/50), "
        f"position ids restarting per window; loss = AR + {shape['router_aux_loss_coef']} x balancing + "
        f"{shape['router_z_loss_coef']} x z-loss. Both models see the same batches.",
        f"- Held out: {plan.eval_windows} windows of {plan.eval_tokens} tokens per corpus, one document per row, "
        f"evenly spread over {', '.join(shakespeare.HELD_OUT_PLAYS)} and the Python pages "
        f"{', '.join(python_docs.HELD_OUT_DOCS)}. Loss = mean next-token cross-entropy (nats).",
        f"- Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, `torch.set_num_threads("
        f"{machine['torch_threads']})`, 1-minute load average {machine['load_average_1min'][0]:.1f} at the start "
        f"and {machine['load_average_1min'][1]:.1f} at the end (other jobs mean fewer steps in the budget); "
        f"torch {machine['torch']}, transformers {machine['transformers']}; {machine['date']}.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = bench_parser("moe_routing", __doc__.split("\n\n")[0], quick_help="a few steps and windows (a smoke run)")
    return parse_bench_args(parser, "moe_routing", argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    torch.set_num_threads(args.threads)
    start, load_at_start = time.perf_counter(), os.getloadavg()[0]
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    texts = corpus_texts()
    batches = TrainingBatches(tokenizer, texts, plan)
    windows = {corpus: held_out_windows(tokenizer, held_out, plan.eval_windows, plan.eval_tokens)
               for corpus, (_, held_out) in texts.items()}  # fmt: skip
    models = {scope: build_model(scope, len(tokenizer), plan.seed) for scope in SCOPES}
    trainings = train_in_lockstep(models, batches, plan)
    results = {}
    for scope, model in models.items():
        evaluations = {corpus: evaluate(model, corpus_windows) for corpus, corpus_windows in windows.items()}
        results[scope] = {
            "training": trainings[scope],
            "held_out_loss": {corpus: evaluation["loss"] for corpus, evaluation in evaluations.items()},
            "layers": specialisation(evaluations, model.config),
        }
        print(f"router_scope={scope!r}: held-out loss {results[scope]['held_out_loss']}", flush=True)
    seconds = time.perf_counter() - start
    # The budget is wall-clock time: on a busy machine fewer steps fit, which the report has to say.
    machine = {**machine_info(torch.get_num_threads()), "load_average_1min": [load_at_start, os.getloadavg()[0]]}
    raw = {"plan": asdict(plan), "model_shape": MODEL_SHAPE, "machine": machine, "seconds": seconds,
           "results": results}  # fmt: skip
    write_report(args.output, markdown_report(results, plan, machine, seconds, args.quick), raw)
    return raw


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
