"""The multimodal demo end to end on a short step budget, with the tasks CI has data for (scikit-learn's digits):
digit recognition from images and text -> digit image. The full run (emoji, spoken digits) needs
`make data-multimodal`; its figures are in the README. Also: the optional time cap stops training early, loudly."""

import json

import pytest
from transformers import AutoTokenizer

from demo import multimodal
from test_integration import run_isolated
from tokenizer import TOKENIZER_DIR
from vqvae_agillm import AgillmVQVAE


SHORT_RUN_STEPS = 60


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("multimodal")
    metrics = multimodal.run(output_dir, steps=SHORT_RUN_STEPS, tasks=("digit", "draw"), vq_steps=10,
                             images_dir=output_dir / "images")
    return output_dir, metrics


def test_without_a_time_cap_the_requested_steps_run_exactly(short_run):
    _, metrics = short_run
    assert metrics["train_steps"] == metrics["requested_steps"] == SHORT_RUN_STEPS
    assert metrics["time_cap_minutes"] is None and metrics["time_cap_note"] is None
    assert not metrics["stopped_by_time_cap"]
    assert [entry["step"] for entry in metrics["train_log"]] == list(range(0, SHORT_RUN_STEPS, multimodal.LOG_EVERY))


def test_time_cap_stops_training_early_and_reports_it(short_run, capsys):
    """A cap far below one step's time stops after the first step, and the cap says so (stderr and metrics)."""
    output_dir, _ = short_run
    vqvae = AgillmVQVAE.from_pretrained(output_dir / multimodal.VQ_FOLDER).eval()
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = multimodal.build_config(tokenizer, vqvae)
    processor = multimodal.build_processor(tokenizer, config)
    train_sets, _, _ = multimodal.load_tasks(processor, vqvae, config, ("digit",), seed=0)
    requested = 200
    log, steps, cap = multimodal.train(multimodal.AgillmForConditionalGeneration(config), train_sets, requested,
                                       seed=0, time_cap_minutes=0.01)
    assert 1 <= steps < requested and log[0]["step"] == 0
    assert cap.metrics() == {"requested_steps": requested, "time_cap_minutes": 0.01, "stopped_by_time_cap": True,
                             "time_cap_note": f"stopped by the time cap (0.01 min) at step {steps} of {requested}"}
    warning = capsys.readouterr().err
    assert "WARNING: Multimodal training stopped by the time cap" in warning
    assert "--multimodal-time-cap-minutes" in warning


def mean_loss(entries):
    return sum(entry["loss"] for entry in entries) / len(entries)


def test_training_lowers_the_loss_of_both_tasks(short_run):
    _, metrics = short_run
    assert metrics["counts"]["digit"] == {"train": 1438, "test": 359}
    for task in ("digit", "draw"):
        entries = [entry for entry in metrics["train_log"] if entry["task"] == task]
        assert len(entries) >= 2, (task, metrics["train_log"])
        first, last = entries[0]["loss"], mean_loss(entries[-2:])
        # At init the loss is ~ln(8704) = 9.1 nats; a few steps bring the answer tokens well below that.
        assert last < first - 1.0, (task, entries)


def test_evaluation_reports_every_task_and_writes_images(short_run):
    output_dir, metrics = short_run
    assert 0.0 <= metrics["digit_accuracy"] <= 1.0
    assert 0.0 <= metrics["drawn_digits_recognisable"] <= 1.0
    assert set(metrics["drawn_per_digit"]) == {str(d) for d in range(10)}
    assert (output_dir / "images" / "text_to_digit_samples.png").stat().st_size > 1000
    assert (output_dir / "images" / "vqvae_reconstructions.png").stat().st_size > 1000
    saved = json.loads((output_dir / multimodal.METRICS_FILE).read_text())
    assert saved["digit_accuracy"] == metrics["digit_accuracy"]


PIPELINE_SCRIPT = """
import json, sys
import numpy as np, PIL.Image
from transformers import pipeline
folder, output_path = sys.argv[1:3]
pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
image = PIL.Image.fromarray(np.zeros((8, 8), np.uint8), mode="L")
messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "What digit is this?"}]}]
out = pipe(text=messages, max_new_tokens=2, return_full_text=False)
json.dump({"text": out[0]["generated_text"], "model": type(pipe.model).__module__}, open(output_path, "w"))
"""


def test_saved_folder_answers_through_the_pipeline_in_a_fresh_process(short_run, tmp_path):
    """The saved model + processor load as remote code (repo off sys.path) and run pipeline("image-text-to-text")."""
    output_dir, _ = short_run
    output_path = tmp_path / "answer.json"
    run_isolated(PIPELINE_SCRIPT, [str(output_dir / multimodal.MODEL_FOLDER), str(output_path)], cwd=tmp_path)
    answer = json.loads(output_path.read_text())
    assert answer["model"].startswith("transformers_modules.")
    assert isinstance(answer["text"], str)
