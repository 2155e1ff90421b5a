"""The VQ-VAE image tokenizer on held-out real images (issue 5): reconstruction MSE / PSNR per source, codebook usage,
and how recognisable reconstructed digits stay (an SVC trained on the original 8x8 digits classifies them).

Runs `demo.vqvae.run` (data, split, training and evaluation are described there) and tabulates its metrics. The
trained model goes to `outputs/agillm-vqvae` and the PNG grid to `docs/images/vqvae_reconstructions.png` (a quick run
writes both under `outputs/bench/` instead, so it never replaces the reference ones).

Writes `bench/vqvae.md` and `bench/vqvae.json`. Usage: `python -m bench vqvae [--quick] [--steps N]`.
"""

import argparse
import time

import torch

from demo import vqvae as vqvae_demo

from .cli import REPO_ROOT, bench_parser, parse_bench_args, write_report
from .compare_llama import machine_info


QUICK_STEPS = 20
SOURCE_DESCRIPTIONS = {
    "digits": "sklearn digits (8x8 -> 32x32)",
    "emoji": "Twemoji (64x64 on white -> 32x32)",
    "photos": f"crops of the unseen scikit-image photo `{vqvae_demo.HELD_OUT_PHOTO}`",
}


def markdown_report(metrics: dict, machine: dict, seconds: float, quick: bool) -> str:
    reconstruction, digits, training = metrics["reconstruction"], metrics["digit_recognition"], metrics["training"]
    config, codebook = metrics["config"], reconstruction["codebook"]
    lines = ["# VQ-VAE image tokenizer: held-out reconstruction", ""]
    if quick:
        lines += [f"**Quick run** ({training['steps']} steps): checks that the bench runs; the numbers mean little.",
                  ""]
    lines += ["| held-out images | count | MSE ([-1, 1] scale) | PSNR (dB) | distinct codes |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    for source, values in reconstruction.items():
        if source != "codebook":
            lines.append(f"| {SOURCE_DESCRIPTIONS.get(source, source)} | {values['images']} | {values['mse']:.4f} | "
                         f"{values['psnr_db']:.1f} | {values['codes_used']} |")  # fmt: skip
    met = "met" if digits["accuracy_vq_reconstruction"] >= digits["target"] else "NOT met"
    train_images = ", ".join(f"{source} {count}" for source, count in metrics["train_images"].items())
    lines += [
        "",
        f"**Digit recognition (target >= {digits['target']:.0%}, {met})**: an SVC (RBF, gamma 0.001, C 10) fitted "
        f"on the original 8x8 training digits classifies the {digits['held_out_digits']} held-out digits' "
        f"reconstructions, brought back to 8x8 greyscale 0-16 by 4x4 block averages, at "
        f"**{digits['accuracy_vq_reconstruction']:.1%}** "
        f"(the originals: {digits['accuracy_original_8x8']:.1%}; resized to 32x32 and back without the VQ-VAE: "
        f"{digits['accuracy_resized_round_trip']:.1%}).",
        "",
        f"**Codebook**: {codebook['held_out_usage']:.0%} of the {codebook['num_embeddings']} codes appear in the "
        f"held-out images' codes (perplexity {codebook['held_out_perplexity']:.1f}); in training, "
        f"{codebook['training_usage']:.0%} of the codes were above the restart threshold at the end.",
        "",
        f"Reconstructions (held-out originals over their reconstructions, per source): `{metrics['grid']}`.",
        "",
        "## Setup",
        "",
        f"- Model: `AgillmVQVAE`, {metrics['parameters'] / 1e6:.2f}M parameters: image {config['image_size']}x"
        f"{config['image_size']}, conv widths {config['hidden_channels']} ({config['num_res_blocks']} residual "
        f"block(s) per level), latent {config['latent_size']}x{config['latent_size']} = "
        f"{config['latent_size'] ** 2} tokens per image, codebook {config['num_embeddings']} x {config['embed_dim']} "
        "(EMA updates, dead-code restarts).",
        f"- Training: {training['steps']} AdamW steps (warmup + cosine), batches of {training['batch_size']} drawn "
        f"equally from each source ({train_images} "
        f"training images); {training['train_seconds']:.0f} s ({training['steps_per_second']:.2f} steps/s).",
        f"- Held out: {vqvae_demo.DIGITS_HELD_OUT_FRACTION:.0%} of the digits (seeded), every "
        f"{vqvae_demo.EMOJI_HELD_OUT_EVERY}th emoji, and the whole `{metrics['held_out_photo']}` photo (crops of the "
        "other photos are trained on). PSNR uses the [-1, 1] range (peak-to-peak 2), i.e. the usual PSNR of [0, 1] "
        "images.",
        f"- Machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}, "
        f"transformers {machine['transformers']}, {machine['date']}. Whole bench: {seconds / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = bench_parser("vqvae", __doc__.splitlines()[0], quick_help=f"{QUICK_STEPS} training steps")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps (default {vqvae_demo.DEFAULT_STEPS})")  # fmt: skip
    return parse_bench_args(parser, "vqvae", argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (QUICK_STEPS if args.quick else vqvae_demo.DEFAULT_STEPS)
    output_dir = REPO_ROOT / "outputs" / ("bench" if args.quick else "")
    grid = output_dir / "vqvae_reconstructions-quick.png" if args.quick else vqvae_demo.GRID_PATH
    start = time.perf_counter()
    metrics = vqvae_demo.run(output_dir, steps=steps, grid_path=grid)
    machine = machine_info(args.threads)
    report = markdown_report(metrics, machine, time.perf_counter() - start, args.quick)
    raw = {"machine": machine, **metrics}
    write_report(args.output, report, raw, echo_report=True)
    return raw
