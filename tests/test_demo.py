"""The main job's pre-training path end to end, on a short budget: it must learn, save a loadable folder, plot; and
the decoding bench must run on the model it saves."""

import json

import pytest

from bench import decoding
from demo import pretrain_shakespeare


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo")
    return output_dir, pretrain_shakespeare.run(output_dir, train_minutes=0.5, seed=0)


def test_pretraining_lowers_held_out_loss_of_every_head(short_run):
    _, metrics = short_run
    assert metrics["steps"] > 0 and metrics["tokens_seen"] == metrics["steps"] * 4 * pretrain_shakespeare.BLOCK_SIZE
    assert metrics["config"]["heads"] == ["ar", "sat", "nat"]
    # Untrained, the model is near uniform over 8192 ids (ppl ~ 8000). 30 s of training reaches ~1,400 on a busy
    # 2-core machine (10 steps); a run that does not learn (broken loss, frozen weights, scheduler at zero) stays in
    # the thousands.
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
