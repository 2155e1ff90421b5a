"""The main job's pre-training path end to end, on a short step budget: it must learn, save a loadable folder, plot;
the decoding bench must run on the model it saves; and the optional time cap must stop training early and say so."""

import json

import pytest
from transformers import AutoTokenizer

from bench import decoding
from corpus.shakespeare import train_and_held_out
from demo import __main__ as demo_main
from demo import pretrain_shakespeare
from tokenizer import TOKENIZER_DIR


SHORT_RUN_STEPS = 10


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo")
    return output_dir, pretrain_shakespeare.run(output_dir, train_steps=SHORT_RUN_STEPS, seed=0)


def test_without_a_time_cap_the_requested_steps_run_exactly(short_run):
    _, metrics = short_run
    assert metrics["steps"] == metrics["requested_steps"] == SHORT_RUN_STEPS
    assert metrics["time_cap_minutes"] is None and metrics["time_cap_note"] is None
    assert not metrics["stopped_by_time_cap"]
    # The cosine schedule ends at zero on the last step, and the Trainer's warmup starts from zero at the first.
    learning_rates = [entry["learning_rate"] for entry in metrics["log_history"] if "learning_rate" in entry]
    assert len(learning_rates) == SHORT_RUN_STEPS  # a loss entry per step at this length (1/40 of the steps -> 1)
    assert learning_rates[0] == 0.0
    assert max(learning_rates) == pytest.approx(pretrain_shakespeare.TrainingPlan.learning_rate)
    assert learning_rates[-1] < 0.05 * max(learning_rates)
    evaluated_at = [entry["step"] for entry in metrics["log_history"] if "eval_loss" in entry]
    assert evaluated_at[0] == 0 and evaluated_at[-1] == SHORT_RUN_STEPS and len(evaluated_at) == len(set(evaluated_at))


def test_pretraining_lowers_held_out_loss_of_every_head(short_run):
    _, metrics = short_run
    assert metrics["tokens_seen"] == metrics["steps"] * 4 * pretrain_shakespeare.BLOCK_SIZE
    assert metrics["config"]["heads"] == ["ar", "sat", "nat"]
    # Untrained, the model is near uniform over 8192 ids (ppl ~ 8000). 10 steps reach ~1,500; a run that does not
    # learn (broken loss, frozen weights, scheduler at zero) stays in the thousands.
    assert metrics["perplexity_before"] > 4000
    assert metrics["perplexity_after"] < metrics["perplexity_before"] / 4
    before, after = metrics["held_out_losses_before"], metrics["held_out_losses_after"]
    assert set(before) == set(after) == {"ar", "sat", "nat"}
    for head in before:  # ~9.0 -> ~7.3 nats for each head after 10 steps
        assert after[head] < before[head] - 1.0, head


def test_every_head_is_logged_during_training(short_run):
    _, metrics = short_run
    train_entries = [entry for entry in metrics["log_history"] if "loss" in entry]
    eval_entries = [entry for entry in metrics["log_history"] if "eval_loss" in entry]
    assert train_entries and all({"ar_loss", "sat_loss", "nat_loss"} <= set(entry) for entry in train_entries)
    weights = metrics["config"]["objective_weights"]
    for entry in eval_entries:  # eval_loss is the training objective: the weighted sum of the heads' losses
        weighted = sum(weight * entry[f"eval_{head}_loss"] for head, weight in weights.items())
        assert entry["eval_loss"] == pytest.approx(weighted)


def test_outputs_are_written_and_the_folder_loads_as_remote_code(short_run):
    output_dir, metrics = short_run
    folder = output_dir / pretrain_shakespeare.MODEL_FOLDER
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
                 "modeling_agillm.py", "configuration_agillm.py", "processing_agillm.py", "README.md"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "config.json").read_text())["heads"] == ["ar", "sat", "nat"]
    assert (output_dir / pretrain_shakespeare.PLOT_FILE).stat().st_size > 10_000
    saved = json.loads((output_dir / pretrain_shakespeare.METRICS_FILE).read_text())
    assert saved["perplexity_after"] == metrics["perplexity_after"]
    # the sample was generated in a fresh process that loaded the folder as remote code
    assert metrics["sample_model_class"].startswith("transformers_modules.")
    assert all(sample["answer"].strip() for sample in metrics["samples"])


def test_decoding_bench_runs_on_the_saved_model(short_run):
    """Every decoder runs on the demo's folder; the bench checks hook counts against `num_forward_passes` itself."""
    output_dir, _ = short_run
    folder = output_dir / pretrain_shakespeare.MODEL_FOLDER
    from transformers import AutoTokenizer

    model = decoding.AgillmForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    plan = decoding.Plan(prompts=2, prompt_tokens=16, new_tokens=12, repeats=1, warmup=0)
    rows, prompts = decoding.bench(model, tokenizer, plan, decoding.DECODERS)
    assert [prompt["play"] for prompt in prompts] == ["hamlet", "the-tempest"]
    assert all(len(prompt["ids"]) == 16 for prompt in prompts)
    by_name = {row["decoder"]: row for row in rows}
    assert by_name[decoding.AR]["forwards"] == by_name[decoding.AR]["new_tokens"]  # prefill, then one per token
    for name in ("staged, NAT draft", "staged, SAT draft"):  # lossless by construction, whatever the model learned
        assert by_name[name]["identical_continuations"] == 2, name
    assert by_name["SAT, fixed stride"]["tokens_per_forward"] > 1.5  # two tokens per SAT step, after the prefill
    assert by_name["NAT mask-predict, 4 passes"]["forwards"] == 2 * 4  # one forward per pass, no early stop
    assert all(row["forwards"] > 0 and "not_run" not in row for row in rows)


def test_time_cap_stops_training_early_and_reports_it(capsys):
    """A cap far below one step's time stops after the first step: the metrics, the model card text and the demo
    summary say so, with the step reached and the steps asked for, and stderr carries the warning."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    train_texts, held_out_texts = train_and_held_out()
    block_size = pretrain_shakespeare.BLOCK_SIZE
    # Two plays and four held-out blocks: enough for a few steps and the two evaluations, and quick to tokenize.
    train_dataset = pretrain_shakespeare.pack_plays(train_texts[:2], tokenizer, block_size, "two plays")
    eval_dataset = pretrain_shakespeare.pack_plays(held_out_texts[:1], tokenizer, block_size, "one held-out play")
    train_dataset = train_dataset.with_format("torch")
    eval_dataset = eval_dataset.select(range(4)).with_format("torch")
    plan = pretrain_shakespeare.TrainingPlan()
    config = pretrain_shakespeare.small_agillm_config(tokenizer, plan.objective_weights)
    model = pretrain_shakespeare.AgillmForCausalLM(config)
    requested = 50
    trainer = pretrain_shakespeare.train(model, train_dataset, eval_dataset, plan, requested, seed=0,
                                         time_cap_minutes=0.01)
    metrics = pretrain_shakespeare.training_metrics(trainer, train_dataset, eval_dataset, plan)

    assert 1 <= metrics["steps"] < requested and metrics["requested_steps"] == requested
    assert metrics["stopped_by_time_cap"] and metrics["time_cap_minutes"] == 0.01
    assert metrics["time_cap_note"] == f"stopped by the time cap (0.01 min) at step {metrics['steps']} of {requested}"
    # The model is evaluated as the cap left it, so "after" describes the saved model.
    assert [entry for entry in metrics["log_history"] if "eval_ar_loss" in entry][-1]["step"] == metrics["steps"]
    warning = capsys.readouterr().err
    assert "WARNING: Shakespeare pre-training stopped by the time cap" in warning
    assert "--train-time-cap-minutes" in warning

    metrics.update(sampling="", samples=[{"prompt": "", "answer": ""}])  # what `run` adds after sampling
    summary = "\n".join(demo_main.pretrain_section(metrics))
    assert f"WARNING: training {metrics['time_cap_note']}" in summary


@pytest.mark.parametrize("argv", [["--train-steps", "0"], ["--multimodal-steps", "-5"],
                                  ["--train-time-cap-minutes", "0"], ["--multimodal-time-cap-minutes", "-1"]])
def test_demo_options_reject_empty_budgets(argv):
    with pytest.raises(SystemExit):
        demo_main.parse_args(argv)


def test_demo_options_default_to_step_counts():
    args = demo_main.parse_args([])
    assert args.train_steps == pretrain_shakespeare.DEFAULT_TRAIN_STEPS
    assert args.train_time_cap_minutes is None and args.multimodal_time_cap_minutes is None
    assert demo_main.parse_args(["--train-time-cap-minutes", "2.5"]).train_time_cap_minutes == 2.5
