"""Train a small multimodal AGILLM on CPU in minutes, then measure it on held-out items.

One model, four tasks, all real data that installs from package registries (`make data-multimodal`):
    digit    image -> text   scikit-learn's 8x8 handwritten digits: "What digit is this?" -> "7"
    emoji    image -> text   Twemoji (npm emoji-datasource-twitter, CC-BY 4.0): "Describe this emoji." ->
                             "Animals & Nature: dog face" (scored on the category)
    speech   audio -> text   "zero" ... "nine" in flite / espeak-ng voices and Asterisk's recordings; the test voices
                             are never heard in training
    draw     text -> image   "Draw the digit 7." -> 64 VQ tokens, decoded by the VQ-VAE and judged by an independent
                             classifier (scikit-learn SVC on the original 8x8 digits)

Steps: 1. train the VQ-VAE image tokenizer (`demo/vqvae.py`) or reuse the one in the output folder; 2. build the
examples through `AgillmProcessor` (placeholders expanded, labels only on the answer); 3. train the decoder, the
vision and audio towers end to end for a number of steps (the VQ-VAE stays frozen; an optional time cap stops
early, loudly); 4. evaluate every task with
`generate` / `generate_images` on held-out items, write `multimodal_metrics.json` and example images.
"""

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.svm import SVC
from tqdm.auto import tqdm
from transformers import AutoTokenizer, set_seed

from configuration_agillm import AgillmAudioConfig, AgillmConfig, AgillmVisionConfig
from corpus.images import load_digits, load_emoji
from corpus.speech import load_spoken_digit_corpus, spoken_digit_split
from demo.time_cap import TimeCap
from demo.vqvae import digits_split, pixels_to_digits, run as train_vqvae_demo
from feature_extraction_agillm import AgillmFeatureExtractor
from image_processing_agillm import AgillmImageProcessor
from modeling_agillm import AgillmForConditionalGeneration
from processing_agillm import AgillmProcessor
from tokenizer import TOKENIZER_DIR
from vqvae_agillm import AgillmVQVAE


MODEL_FOLDER = "agillm-multimodal"
VQ_FOLDER = "agillm-vqvae"
METRICS_FILE = "multimodal_metrics.json"
IMAGES_DIR = Path(__file__).resolve().parent.parent / "docs" / "images"
# The step count the former 20-minute wall-clock budget reached on a quiet 2-core CPU (the README's figures); a step
# count trains the same model on a busy machine, only later.
DEFAULT_TRAIN_STEPS = 3888
DEFAULT_TRAIN_STEPS_MINUTES = 20  # what DEFAULT_TRAIN_STEPS took on a quiet 2-core CPU (README), for help texts
WARMUP_STEPS = 50  # at most; a short run warms up over its first tenth so that its cosine has room to learn
BATCH_SIZE = 24
LEARNING_RATE = 2e-3
TASKS = ("digit", "emoji", "speech", "draw")
# Sampling odds of each task per training step: drawing (64 tokens per answer, from scratch) and the vision tower
# learn slowest, speech fastest (measured on 8- to 20-minute runs).
TASK_WEIGHTS = {"digit": 1.5, "emoji": 1.0, "speech": 1.0, "draw": 2.0}
DRAW_SAMPLES_PER_DIGIT = 10
DRAW_TEMPERATURE, DRAW_TOP_K = 0.6, 16  # sampling of drawings: varied, yet within what the model is sure of
LOG_EVERY, PRINT_EVERY = 5, 50  # training steps between entries of the metrics' train_log / printed loss lines
PROMPTS = {
    "digit": "What digit is this?",
    "emoji": "Describe this emoji.",
    "speech": "Which digit is spoken?",
    "draw": "Draw the digit {digit}.",
}


def user_turn(content: str) -> str:
    """ChatML up to the assistant's answer (what `apply_chat_template(add_generation_prompt=True)` writes)."""
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class Example:
    """One training/eval item: token ids with placeholders expanded, labels on the answer only, its media."""

    task: str
    input_ids: torch.Tensor  # [T]
    labels: torch.Tensor  # [T], -100 outside the answer
    prompt_length: int
    answer: str
    pixel_values: torch.Tensor | None = None  # [3, H, W]
    input_features: torch.Tensor | None = None  # [mels, frames] (real frames only)
    digit: int | None = None


def encode(processor, prompt: str, answer: str, task: str, images=None, audio=None, sampling_rate=None, **extra):
    """Prompt + answer through the processor; the answer's tokens (and the closing <|im_end|>) are the labels."""
    kwargs = {"images": images} if images is not None else {}
    if audio is not None:
        kwargs.update(audio=[audio], sampling_rate=sampling_rate)
    full = processor(text=prompt + answer + "<|im_end|>", return_tensors="pt", **kwargs)
    prompt_length = len(processor(text=prompt, return_tensors="pt", **kwargs)["input_ids"][0])
    input_ids = full["input_ids"][0]
    labels = input_ids.clone()
    labels[:prompt_length] = -100
    features = None
    if audio is not None:
        valid = int(full["feature_attention_mask"][0].sum())
        features = full["input_features"][0, :, :valid]
    pixel_values = full["pixel_values"][0] if images is not None else None
    return Example(task, input_ids, labels, prompt_length, answer, pixel_values, features, **extra)


def draw_example(tokenizer, digit: int, image_tokens: torch.Tensor, config: AgillmConfig) -> Example:
    """"Draw the digit d." -> <|image_start|> 64 VQ tokens <|image_end|><|im_end|> (labels on all of them)."""
    prompt_ids = tokenizer(user_turn(PROMPTS["draw"].format(digit=digit)), return_tensors="pt")["input_ids"][0]
    answer = torch.cat([
        torch.tensor([config.image_start_token_id]), image_tokens, torch.tensor([config.image_end_token_id]),
        torch.tensor(tokenizer.convert_tokens_to_ids(["<|im_end|>"])),
    ])
    input_ids = torch.cat([prompt_ids, answer])
    labels = input_ids.clone()
    # The <|image_start|> is part of the prompt at generation time (generate_images appends it): no loss on it.
    labels[: len(prompt_ids) + 1] = -100
    return Example("draw", input_ids, labels, len(prompt_ids), str(digit), digit=digit)


# ----------------------------------------------------------------------------------------------------- data


def digit_tasks(processor, vqvae: AgillmVQVAE, config: AgillmConfig, seed: int):
    """Digit recognition (image -> text) and drawing (text -> VQ tokens) on scikit-learn's digits, one split."""
    images, labels = load_digits()  # [N, 8, 8] in 0..16
    train_idx, test_idx = digits_split(len(images), seed)
    grey = [Image.fromarray((image / 16.0 * 255).astype(np.uint8), mode="L") for image in images]
    make = lambda i: encode(processor, user_turn("<|image|>" + PROMPTS["digit"]), str(labels[i]), "digit",
                            images=[grey[i]], digit=int(labels[i]))
    digit_pixels = processor.image_processor([grey[i] for i in train_idx], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        codes = vqvae.encode(digit_pixels) + config.image_vocab_offset
    draw = [draw_example(processor.tokenizer, int(labels[i]), codes[k], config) for k, i in enumerate(train_idx)]
    train = {"digit": [make(i) for i in train_idx], "draw": draw}
    test = {"digit": [make(i) for i in test_idx]}
    return train, test, (images, labels, train_idx, test_idx)


def emoji_task(processor, seed: int):
    """Emoji captioning: every fifth emoji (after a seeded shuffle) is held out, so every category is in both."""
    emoji = load_emoji()
    random.Random(seed).shuffle(emoji)
    examples = [
        encode(processor, user_turn("<|image|>" + PROMPTS["emoji"]), f"{item['category']}: {item['name'].lower()}",
               "emoji", images=[item["image"]])
        for item in emoji
    ]
    return [e for i, e in enumerate(examples) if i % 5], [e for i, e in enumerate(examples) if i % 5 == 0]


def speech_task(processor, seed: int):
    """Spoken digits, split by voice: the test voices are never heard in training."""
    speech_train, speech_test = spoken_digit_split(load_spoken_digit_corpus(), seed=seed)
    make = lambda r: encode(processor, user_turn("<|audio|>" + PROMPTS["speech"]), str(r["digit"]), "speech",
                            audio=r["audio"], sampling_rate=r["sampling_rate"], digit=int(r["digit"]))
    voices = sorted({r["voice"] for r in speech_test})
    return [make(r) for r in speech_train], [make(r) for r in speech_test], voices


def load_tasks(processor, vqvae: AgillmVQVAE, config: AgillmConfig, tasks, seed: int) -> tuple[dict, dict, dict]:
    """Train and held-out examples of the chosen tasks, plus what evaluation needs (raw digits for the judge)."""
    train, test, digits = digit_tasks(processor, vqvae, config, seed)  # cheap, and the judge needs the split
    extra = {"digits": digits}
    if "emoji" in tasks:
        train["emoji"], test["emoji"] = emoji_task(processor, seed)
    if "speech" in tasks:
        train["speech"], test["speech"], extra["held_out_voices"] = speech_task(processor, seed)
    train = {task: examples for task, examples in train.items() if task in tasks}
    return train, {task: examples for task, examples in test.items() if task in tasks}, extra


def collate(examples: list[Example], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad ids/labels to one length and stack the media in order of appearance (as the processor does)."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[row, span], labels[row, span], attention_mask[row, span] = example.input_ids, example.labels, 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    pixels = [e.pixel_values for e in examples if e.pixel_values is not None]
    if pixels:
        batch["pixel_values"] = torch.stack(pixels)
    clips = [e.input_features for e in examples if e.input_features is not None]
    if clips:
        frames = max(c.shape[1] for c in clips)
        batch["input_features"] = torch.zeros(len(clips), clips[0].shape[0], frames)
        batch["feature_attention_mask"] = torch.zeros(len(clips), frames, dtype=torch.long)
        for k, clip in enumerate(clips):
            batch["input_features"][k, :, : clip.shape[1]] = clip
            batch["feature_attention_mask"][k, : clip.shape[1]] = 1
    return batch


def prompt_only(example: Example) -> Example:
    """The example cut at the end of its prompt, for generation."""
    ids = example.input_ids[: example.prompt_length]
    return Example(example.task, ids, torch.full_like(ids, -100), len(ids), example.answer, example.pixel_values,
                   example.input_features, example.digit)


# ------------------------------------------------------------------------------------------------- model


def build_config(tokenizer, vqvae: AgillmVQVAE) -> AgillmConfig:
    num_codes = vqvae.config.num_embeddings
    return AgillmConfig(
        vocab_size=len(tokenizer) + num_codes,  # text ids, then the VQ codes
        image_vocab_offset=len(tokenizer),
        hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
        max_position_embeddings=512,
        vision_config=AgillmVisionConfig(image_size=32, patch_size=8, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4),
        audio_config=AgillmAudioConfig(num_mel_bins=80, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4),
        vq_config=vqvae.config.to_dict(),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )


def build_processor(tokenizer, config: AgillmConfig) -> AgillmProcessor:
    return AgillmProcessor(
        image_processor=AgillmImageProcessor(size={"height": config.vision_config.image_size,
                                                   "width": config.vision_config.image_size}),
        feature_extractor=AgillmFeatureExtractor(feature_size=config.audio_config.num_mel_bins),
        tokenizer=tokenizer,
        image_seq_length=config.vision_config.num_image_tokens,
        audio_frames_per_token=config.audio_config.frames_per_audio_token,
    )


def train(model, train_sets: dict, steps: int, seed: int, time_cap_minutes: float | None = None
          ) -> tuple[list[dict], int, TimeCap]:
    """AdamW with warmup and cosine decay over `steps` steps; each batch is drawn from one task (odds
    `TASK_WEIGHTS`, over the tasks present). Stops sooner, with a loud warning, if `time_cap_minutes` pass first.
    Returns the loss log, the steps run and the cap (which says whether it cut the run short)."""
    model.train()
    trainable = [p for name, p in model.named_parameters() if not name.startswith("model.vqmodel.")]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.01, betas=(0.9, 0.98))
    rng = random.Random(seed)
    tasks = [task for task in TASK_WEIGHTS if train_sets.get(task)]
    weights = [TASK_WEIGHTS[task] for task in tasks]
    cap = TimeCap(time_cap_minutes, steps)
    warmup_steps = min(WARMUP_STEPS, max(1, steps // 10))
    log, step = [], 0
    bar = tqdm(total=steps, desc="Training", unit="step", dynamic_ncols=True)
    cap.start()
    while step < steps and not cap.should_stop(step):
        lr_scale = min(1.0, (step + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = LEARNING_RATE * lr_scale
        task = rng.choices(tasks, weights)[0]
        batch = collate(rng.sample(train_sets[task], BATCH_SIZE), model.config.pad_token_id)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        if step % LOG_EVERY == 0:
            seconds = round(cap.elapsed_seconds, 1)
            log.append({"step": step, "seconds": seconds, "task": task, "loss": round(loss.item(), 4)})
            bar.set_postfix(task=task, loss=f"{loss.item():.3f}", refresh=False)
        if step % PRINT_EVERY == 0:
            bar.write(f"  step {step:5d}  {cap.elapsed_seconds:6.0f}s  {task:6s} loss {loss.item():.3f}")
        step += 1
        bar.update()
    bar.close()
    cap.warn_if_stopped("Multimodal training", "--multimodal-time-cap-minutes")
    model.eval()
    return log, step, cap


# -------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def generate_answers(model, processor, examples: list[Example], max_new_tokens: int, unit: str,
                     batch_size: int = 64):
    """Greedy answers to held-out prompts, batched with left padding (as a pipeline would); the progress bar counts
    the items answered (`unit`: images, clips)."""
    answers = []
    bar = tqdm(total=len(examples), desc=f"Answering held-out {unit}s", unit=unit, dynamic_ncols=True)
    for start in range(0, len(examples), batch_size):
        batch = collate([prompt_only(e) for e in examples[start : start + batch_size]], model.config.pad_token_id,
                        padding_side="left")
        batch.pop("labels")
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        answers += processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        bar.update(len(batch["input_ids"]))
    bar.close()
    return [a.strip() for a in answers]


def accuracy(predictions: list[str], examples: list[Example], key) -> float:
    return float(np.mean([key(p) == key(e.answer) for p, e in zip(predictions, examples)]))


def category_of(caption: str) -> str:
    return caption.split(":")[0].strip()


@torch.no_grad()
def draw_digits(model, tokenizer, judge: SVC, samples_per_digit: int, seed: int) -> tuple[dict, torch.Tensor]:
    """Text -> image for every digit; the judge (trained on real 8x8 digits) reads the images back."""
    torch.manual_seed(seed)
    prompts = [user_turn(PROMPTS["draw"].format(digit=d)) for d in range(10) for _ in range(samples_per_digit)]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    pixels, _ = model.generate_images(**inputs, do_sample=True, temperature=DRAW_TEMPERATURE, top_k=DRAW_TOP_K)
    predicted = judge.predict(pixels_to_digits(pixels).reshape(len(prompts), -1))
    wanted = np.repeat(np.arange(10), samples_per_digit)
    per_digit = {str(d): float(np.mean(predicted[wanted == d] == d)) for d in range(10)}
    return {"recognisable": float(np.mean(predicted == wanted)), "per_digit": per_digit}, pixels


def save_grid(pixels: torch.Tensor, rows: int, path: Path, scale: int = 2) -> None:
    """Images [N, 3, H, W] in [-1, 1] as a PNG grid with `rows` rows."""
    images = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    cols = math.ceil(len(images) / rows)
    h, w = images.shape[1:3]
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def evaluate(model, processor, test_sets: dict, extra: dict, seed: int) -> tuple[dict, torch.Tensor | None]:
    """Accuracy of every trained task on its held-out items (greedy answers; sampled drawings)."""
    metrics, drawn = {}, None
    if "digit" in test_sets:
        answers = generate_answers(model, processor, test_sets["digit"], max_new_tokens=3, unit="image")
        metrics["digit_accuracy"] = accuracy(answers, test_sets["digit"], str.strip)
    if "emoji" in test_sets:
        answers = generate_answers(model, processor, test_sets["emoji"], max_new_tokens=24, unit="image")
        metrics["emoji_category_accuracy"] = accuracy(answers, test_sets["emoji"], category_of)
        metrics["emoji_exact_caption"] = accuracy(answers, test_sets["emoji"], str.strip)
        metrics["emoji_examples"] = [{"caption": e.answer, "generated": a}
                                     for e, a in list(zip(test_sets["emoji"], answers))[:12]]
    if "speech" in test_sets:
        answers = generate_answers(model, processor, test_sets["speech"], max_new_tokens=3, unit="clip")
        metrics["spoken_digit_accuracy"] = accuracy(answers, test_sets["speech"], str.strip)
        metrics["held_out_voices"] = extra["held_out_voices"]
    if "draw" in extra["tasks"]:
        images, labels, train_idx, _ = extra["digits"]
        judge = SVC(gamma=0.001).fit(images[train_idx].reshape(len(train_idx), -1), labels[train_idx])
        drawing, drawn = draw_digits(model, processor.tokenizer, judge, DRAW_SAMPLES_PER_DIGIT, seed)
        metrics["drawn_digits_recognisable"] = drawing["recognisable"]
        metrics["drawn_per_digit"] = drawing["per_digit"]
    return metrics, drawn


def run(output_dir: Path, steps: int = DEFAULT_TRAIN_STEPS, seed: int = 0, tasks=TASKS,
        vq_steps: int | None = None, images_dir: Path = IMAGES_DIR, time_cap_minutes: float | None = None) -> dict:
    """Train (the VQ-VAE first unless `output_dir` has one), evaluate, save model + processor + metrics + images."""
    TimeCap(time_cap_minutes, steps)  # checks both before the VQ-VAE and the data
    set_seed(seed)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    output_dir, t0 = Path(output_dir), time.perf_counter()
    if not (output_dir / VQ_FOLDER / "config.json").is_file():
        print("1. training the VQ-VAE image tokenizer (demo/vqvae.py)", flush=True)
        train_vqvae_demo(output_dir, **({} if vq_steps is None else {"steps": vq_steps}),
                         grid_path=images_dir / "vqvae_reconstructions.png")
    vqvae = AgillmVQVAE.from_pretrained(output_dir / VQ_FOLDER).eval()

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = build_config(tokenizer, vqvae)
    processor = build_processor(tokenizer, config)
    print(f"2. building the examples of {', '.join(tasks)} through AgillmProcessor", flush=True)
    train_sets, test_sets, extra = load_tasks(processor, vqvae, config, tasks, seed)
    extra["tasks"] = tasks
    counts = {task: {"train": len(train_sets[task]), "test": len(test_sets.get(task, []))} for task in train_sets}
    print(f"   {counts}", flush=True)

    model = AgillmForConditionalGeneration(config)
    model.model.vqmodel.load_state_dict(vqvae.state_dict())
    model.model.vqmodel.requires_grad_(False)
    parameters = sum(p.numel() for p in model.parameters())
    cap_text = "" if time_cap_minutes is None else f" (time cap {time_cap_minutes:g} min)"
    print(f"3. training {parameters / 1e6:.1f}M parameters for {steps} steps{cap_text}", flush=True)
    train_start = time.perf_counter()
    log, steps_run, cap = train(model, train_sets, steps, seed, time_cap_minutes)
    train_seconds = time.perf_counter() - train_start

    print("4. evaluating on held-out items", flush=True)
    metrics, drawn = evaluate(model, processor, test_sets, extra, seed)
    metrics.update(counts=counts, parameters=parameters, train_steps=steps_run, **cap.metrics(),
                   train_seconds=round(train_seconds, 1), train_log=log,
                   minutes_total=round((time.perf_counter() - t0) / 60, 2))
    if drawn is not None:
        metrics["drawn_grid"] = str(images_dir / "text_to_digit_samples.png")
        save_grid(drawn, rows=10, path=Path(metrics["drawn_grid"]))
    model.save_pretrained(output_dir / MODEL_FOLDER)
    processor.save_pretrained(output_dir / MODEL_FOLDER)
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    for key, value in metrics.items():
        if key.endswith(("accuracy", "recognisable")):
            print(f"   {key}: {value:.3f}", flush=True)
    if cap.stopped:
        print(f"   CUT SHORT: training {cap.note}", flush=True)
    return metrics


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"))
    parser.add_argument("--steps", type=int, default=DEFAULT_TRAIN_STEPS,
                        help=f"training steps (default {DEFAULT_TRAIN_STEPS}: about {DEFAULT_TRAIN_STEPS_MINUTES} min "
                             "on a quiet 2-core CPU)")
    parser.add_argument("--time-cap-minutes", type=float, default=None,
                        help="stop training after this many minutes even if steps remain, with a loud warning "
                             "(default: no cap)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.time_cap_minutes is not None and args.time_cap_minutes <= 0:
        parser.error(f"--time-cap-minutes must be positive, got {args.time_cap_minutes}")
    return run(args.output_dir, args.steps, args.seed, tuple(args.tasks), time_cap_minutes=args.time_cap_minutes)


if __name__ == "__main__":
    main()
