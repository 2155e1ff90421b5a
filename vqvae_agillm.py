# Copyright 2025 The AGILLM authors. Licensed under the Apache License, Version 2.0.
"""AGILLM's image tokenizer: a small convolutional VQ-VAE that turns a 32x32 image into an 8x8 grid of codebook ids
and back, so the decoder can read and write images as tokens (code `c` is token id `image_vocab_offset + c`).

Modeled on transformers' Janus/Chameleon VQ-VAE (`models/janus/modeling_janus.py`: residual blocks with GroupNorm +
SiLU, padded stride-2 downsampling, nearest upsampling + conv, nearest-code quantiser with a straight-through
estimator) and trained the way VQ-VAE-2 / Jukebox train their codebooks: exponential-moving-average codebook updates
with Laplace smoothing, and restarts of codes the encoder stopped using. No attention blocks: at 32x32 the conv
stack alone reconstructs well and stays fast on CPU.

Data flow:
    pixels [B, C, S, S] -> AgillmVQVAEEncoder -> z_e [B, D, h, w] -> AgillmVectorQuantizer -> codes [B, h*w]
    codes -> codebook vectors z_q [B, D, h, w] -> AgillmVQVAEDecoder -> pixels [B, C, S, S] in [-1, 1]
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput, can_return_tuple, logging


try:  # a saved model folder (remote code): sibling files are a package
    from .configuration_agillm import AgillmVQVAEConfig
except ImportError:  # this repository, imported as top-level modules
    from configuration_agillm import AgillmVQVAEConfig


logger = logging.get_logger(__name__)

# GroupNorm groups: taming/Janus use 32 with >= 128 channels; the small widths here (down to a few channels in
# tests) take the largest divisor of the width up to this.
MAX_NORM_GROUPS = 8
# Laplace smoothing of the EMA cluster sizes (Sonnet / VQ-VAE-2): keeps a code with no recent assignment from
# dividing by zero.
EMA_EPSILON = 1e-5


@dataclass
class AgillmVQVAEOutput(ModelOutput):
    r"""
    Output of [`AgillmVQVAE.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            Training loss: reconstruction MSE + `commitment_cost` x commitment loss (+ the codebook loss when the
            codebook is not trained by EMA).
        reconstruction (`torch.FloatTensor` of shape `(batch_size, num_channels, image_size, image_size)`):
            The decoded image, clamped to [-1, 1] (what `decode(encode(pixel_values))` gives).
        codes (`torch.LongTensor` of shape `(batch_size, latent_size ** 2)`):
            Codebook ids of the latent grid, row-major.
        commitment_loss (`torch.FloatTensor` of shape `()`):
            `|z_e - sg(z_q)|^2`, averaged: how far encoder outputs sit from their codes.
        perplexity (`torch.FloatTensor` of shape `()`):
            `exp(entropy)` of the batch's code histogram: the number of codes effectively in use.
    """

    loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    codes: torch.LongTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    perplexity: torch.FloatTensor | None = None


@dataclass
class AgillmQuantizerOutput(ModelOutput):
    r"""
    Output of [`AgillmVectorQuantizer.forward`].

    Args:
        quantized (`torch.FloatTensor` of shape `(batch_size, embed_dim, height, width)`):
            The codebook vectors, carrying the encoder's gradient (straight-through estimator).
        codes (`torch.LongTensor` of shape `(batch_size, height, width)`): the nearest code of every position.
        commitment_loss (`torch.FloatTensor` of shape `()`): `|z_e - sg(z_q)|^2`.
        codebook_loss (`torch.FloatTensor` of shape `()`): `|sg(z_e) - z_q|^2`; zero when the codebook follows EMA.
        perplexity (`torch.FloatTensor` of shape `()`): `exp(entropy)` of the code histogram.
    """

    quantized: torch.FloatTensor | None = None
    codes: torch.LongTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    codebook_loss: torch.FloatTensor | None = None
    perplexity: torch.FloatTensor | None = None


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=math.gcd(channels, MAX_NORM_GROUPS), num_channels=channels, eps=1e-6)


class AgillmVQVAEResidualBlock(nn.Module):
    """(GroupNorm -> SiLU -> conv3x3) twice, plus the input: keeps width and resolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = _group_norm(channels)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.conv1(F.silu(self.norm1(hidden_states)))
        hidden_states = self.conv2(F.silu(self.norm2(hidden_states)))
        return residual + hidden_states


class AgillmVQVAEDownsample(nn.Module):
    """Stride-2 conv3x3 that halves the resolution and moves to the next level's width."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # As in taming/Janus: pad right and bottom only, so that output pixel (i, j) sees input pixels 2i..2i+2.
        return self.conv(F.pad(hidden_states, pad=(0, 1, 0, 1)))


class AgillmVQVAEUpsample(nn.Module):
    """Nearest x2 upsampling, then a conv3x3 to the next (finer) level's width."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(hidden_states, scale_factor=2.0, mode="nearest"))


class AgillmVQVAEEncoder(nn.Module):
    """conv_in -> per level [residual blocks, downsample except after the last] -> norm/SiLU -> 1x1 conv to codes'
    width: [B, C, S, S] -> [B, embed_dim, S / 2**(levels-1), same]."""

    def __init__(self, config: AgillmVQVAEConfig):
        super().__init__()
        widths = config.hidden_channels
        self.conv_in = nn.Conv2d(config.num_channels, widths[0], kernel_size=3, padding=1)
        self.levels = nn.ModuleList()
        for level, width in enumerate(widths):
            blocks = [AgillmVQVAEResidualBlock(width) for _ in range(config.num_res_blocks)]
            if level < len(widths) - 1:
                blocks.append(AgillmVQVAEDownsample(width, widths[level + 1]))
            self.levels.append(nn.Sequential(*blocks))
        self.norm_out = _group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], config.embed_dim, kernel_size=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv_in(pixel_values)
        for level in self.levels:
            hidden_states = level(hidden_states)
        return self.conv_out(F.silu(self.norm_out(hidden_states)))


class AgillmVQVAEDecoder(nn.Module):
    """The encoder mirrored: 1x1 conv from the codes' width -> per level, coarsest first, [residual blocks, upsample
    except after the finest] -> norm/SiLU -> conv3x3 to pixel channels."""

    def __init__(self, config: AgillmVQVAEConfig):
        super().__init__()
        widths = config.hidden_channels[::-1]
        self.conv_in = nn.Conv2d(config.embed_dim, widths[0], kernel_size=1)
        self.levels = nn.ModuleList()
        for level, width in enumerate(widths):
            blocks = [AgillmVQVAEResidualBlock(width) for _ in range(config.num_res_blocks)]
            if level < len(widths) - 1:
                blocks.append(AgillmVQVAEUpsample(width, widths[level + 1]))
            self.levels.append(nn.Sequential(*blocks))
        self.norm_out = _group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], config.num_channels, kernel_size=3, padding=1)

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv_in(quantized)
        for level in self.levels:
            hidden_states = level(hidden_states)
        return self.conv_out(F.silu(self.norm_out(hidden_states)))


class AgillmVectorQuantizer(nn.Module):
    """
    Nearest-code (L2) quantiser with a straight-through gradient to the encoder.

    The codebook `embedding` learns either by EMA (`codebook_ema_decay > 0`): every training step moves each code to
    the moving average of the encoder outputs assigned to it (`ema_embed_sum / ema_cluster_size`, Laplace-smoothed);
    or, with decay 0, by gradient through the codebook loss. `usage` is the moving average of each code's assignments
    per training batch; codes whose usage falls below `dead_code_threshold` are restarted on random encoder outputs of
    the current batch, so the whole codebook stays in play. All of this happens only in a training forward with
    gradients enabled: evaluation and `torch.no_grad()` / `torch.inference_mode()` calls never change the codebook.
    """

    def __init__(self, config: AgillmVQVAEConfig):
        super().__init__()
        self.num_embeddings = config.num_embeddings
        self.embed_dim = config.embed_dim
        self.ema_decay = config.codebook_ema_decay
        # Usage follows the codebook's own timescale; a gradient-trained codebook still needs one for restarts.
        self.usage_decay = config.codebook_ema_decay or 0.99
        self.dead_code_threshold = config.dead_code_threshold
        self.embedding = nn.Embedding(config.num_embeddings, config.embed_dim)
        # Persistent: a saved model resumes training with its codebook statistics.
        self.register_buffer("ema_cluster_size", torch.ones(config.num_embeddings))
        self.register_buffer("ema_embed_sum", torch.zeros(config.num_embeddings, config.embed_dim))
        self.register_buffer("usage", torch.zeros(config.num_embeddings))

    def nearest_codes(self, flat_inputs: torch.Tensor) -> torch.LongTensor:
        """Id of the closest code (L2) for each row of `flat_inputs` [N, embed_dim]."""
        codebook = self.embedding.weight
        # |z - e|^2 = |z|^2 + |e|^2 - 2 z.e, without materialising the [N, K, D] differences.
        distances = (
            flat_inputs.pow(2).sum(1, keepdim=True)
            + codebook.pow(2).sum(1)
            - 2 * flat_inputs @ codebook.t()
        )
        return distances.argmin(dim=1)

    def lookup(self, codes: torch.LongTensor) -> torch.Tensor:
        """Codebook vectors of a grid of ids [B, h, w] as a feature map [B, embed_dim, h, w]."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()

    def forward(self, hidden_states: torch.Tensor) -> AgillmQuantizerOutput:
        batch_size, _, height, width = hidden_states.shape
        flat_inputs = hidden_states.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        codes = self.nearest_codes(flat_inputs.detach())
        quantized = self.lookup(codes.view(batch_size, height, width))

        commitment_loss = F.mse_loss(hidden_states, quantized.detach())
        if self.ema_decay > 0:
            codebook_loss = torch.zeros_like(commitment_loss)
        else:
            codebook_loss = F.mse_loss(quantized, hidden_states.detach())

        counts = torch.bincount(codes, minlength=self.num_embeddings).to(flat_inputs.dtype)
        probabilities = counts / counts.sum()
        perplexity = torch.exp(-torch.sum(probabilities * torch.log(probabilities + 1e-10)))

        if self.training and torch.is_grad_enabled():
            self._update_codebook(flat_inputs.detach(), codes, counts)

        # Straight-through estimator: the decoder sees z_q; the encoder gets the decoder's gradient as if z_q = z_e.
        quantized = hidden_states + (quantized - hidden_states).detach()
        return AgillmQuantizerOutput(
            quantized=quantized,
            codes=codes.view(batch_size, height, width),
            commitment_loss=commitment_loss,
            codebook_loss=codebook_loss,
            perplexity=perplexity,
        )

    @torch.no_grad()
    def _update_codebook(self, flat_inputs: torch.Tensor, codes: torch.LongTensor, counts: torch.Tensor) -> None:
        if self.ema_decay > 0:
            embed_sum = torch.zeros_like(self.ema_embed_sum).index_add_(0, codes, flat_inputs)
            self.ema_cluster_size.lerp_(counts, 1 - self.ema_decay)
            self.ema_embed_sum.lerp_(embed_sum, 1 - self.ema_decay)
            total = self.ema_cluster_size.sum()
            smoothed = (self.ema_cluster_size + EMA_EPSILON) / (total + self.num_embeddings * EMA_EPSILON) * total
            self.embedding.weight.copy_(self.ema_embed_sum / smoothed.unsqueeze(1))
        self.usage.lerp_(counts, 1 - self.usage_decay)
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(flat_inputs)

    def _restart_dead_codes(self, flat_inputs: torch.Tensor) -> None:
        dead = (self.usage < self.dead_code_threshold).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        # Sampled with replacement: a small batch may hold fewer vectors than there are dead codes.
        picks = torch.randint(flat_inputs.shape[0], (dead.numel(),), device=flat_inputs.device)
        self.embedding.weight[dead] = flat_inputs[picks]
        # A restarted code starts as one fresh assignment, right at the threshold: it stays if the encoder uses it.
        self.ema_cluster_size[dead] = 1.0
        self.ema_embed_sum[dead] = flat_inputs[picks]
        self.usage[dead] = self.dead_code_threshold

    def codebook_usage(self) -> float:
        """Fraction of codes whose moving-average usage (assignments per training batch) is above
        `dead_code_threshold`. Strictly above: a code just restarted sits exactly at the threshold and counts as
        used only once the encoder picks it. With restarts off (threshold 0) this is any code ever assigned."""
        return (self.usage > self.dead_code_threshold).float().mean().item()


class AgillmVQVAEPreTrainedModel(PreTrainedModel):
    config: AgillmVQVAEConfig
    config_class = AgillmVQVAEConfig
    base_model_prefix = "vqmodel"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["AgillmVQVAEResidualBlock", "AgillmVectorQuantizer"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            # PyTorch's own conv init (kaiming-uniform, a = sqrt(5)): the library's normal(0, 0.02) starves a conv
            # stack of signal. Restated so that weights missing from a checkpoint get it too.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
                bound = 1 / math.sqrt(fan_in)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, AgillmVectorQuantizer):
            # The codebook (normal(0, initializer_range)) is initialised first, as a child module. The EMA statistics
            # start as one assignment per code at its current vector; usage starts at zero, so the first training
            # step restarts every code the batch did not use on real encoder outputs (a data-dependent init).
            init.ones_(module.ema_cluster_size)
            init.copy_(module.ema_embed_sum, module.embedding.weight)
            init.zeros_(module.usage)
        else:
            super()._init_weights(module)


class AgillmVQVAE(AgillmVQVAEPreTrainedModel):
    """
    The VQ-VAE image tokenizer: `encode(pixel_values) -> codes`, `decode(codes) -> pixels`, and a training
    `forward(pixel_values) -> AgillmVQVAEOutput` (loss, reconstruction, codes, commitment loss, perplexity).

    Pixels are what `AgillmImageProcessor` produces: float [B, num_channels, image_size, image_size] in [-1, 1].
    Codes are row-major ids in `[0, num_embeddings)` of the `latent_size x latent_size` grid.
    """

    def __init__(self, config: AgillmVQVAEConfig):
        super().__init__(config)
        self.encoder = AgillmVQVAEEncoder(config)
        self.quantize = AgillmVectorQuantizer(config)
        self.decoder = AgillmVQVAEDecoder(config)
        self.post_init()

    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor, **kwargs) -> AgillmVQVAEOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, image_size, image_size)`):
            Images in [-1, 1]. In training mode (with gradients enabled) this call also updates the codebook (EMA,
            usage, dead-code restarts).
        """
        self._check_pixel_values(pixel_values)
        quantizer_output = self.quantize(self.encoder(pixel_values))
        decoded = self.decoder(quantizer_output.quantized)
        # The loss sees the unclamped output so that pixels pushed past the range still get a gradient back.
        reconstruction_loss = F.mse_loss(decoded, pixel_values)
        loss = (
            reconstruction_loss
            + self.config.commitment_cost * quantizer_output.commitment_loss
            + quantizer_output.codebook_loss
        )
        return AgillmVQVAEOutput(
            loss=loss,
            reconstruction=decoded.clamp(-1, 1),
            codes=quantizer_output.codes.flatten(1),
            commitment_loss=quantizer_output.commitment_loss,
            perplexity=quantizer_output.perplexity,
        )

    def encode(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """Images [B, C, S, S] -> codes [B, latent_size ** 2] (row-major). Never updates the codebook."""
        self._check_pixel_values(pixel_values)
        latents = self.encoder(pixel_values)
        flat_latents = latents.permute(0, 2, 3, 1).reshape(-1, self.config.embed_dim)
        return self.quantize.nearest_codes(flat_latents).view(pixel_values.shape[0], -1)

    def decode(self, codes: torch.LongTensor) -> torch.FloatTensor:
        """Codes [B, latent_size**2] (row-major) or [B, latent_size, latent_size] -> images [B, C, S, S] in [-1, 1]."""
        codes = self._check_codes(codes)
        side = self.config.latent_size
        decoded = self.decoder(self.quantize.lookup(codes.reshape(-1, side, side)))
        return decoded.clamp(-1, 1)

    def codebook_usage(self) -> float:
        """Fraction of the codebook in use during training (see `AgillmVectorQuantizer.codebook_usage`); for the
        codes of given images, count `encode(pixel_values).unique()` instead."""
        return self.quantize.codebook_usage()

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        config = self.config
        expected = (config.num_channels, config.image_size, config.image_size)
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
            raise ValueError(f"AgillmVQVAE expects pixel_values as a float tensor, got "
                             f"{getattr(pixel_values, 'dtype', type(pixel_values).__name__)}.")
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected or pixel_values.shape[0] == 0:
            raise ValueError(f"AgillmVQVAE expects pixel_values of shape [batch, {', '.join(map(str, expected))}] "
                             f"(AgillmImageProcessor with size {config.image_size}), got {list(pixel_values.shape)}.")

    def _check_codes(self, codes: torch.Tensor) -> torch.LongTensor:
        config = self.config
        side = config.latent_size
        integer = isinstance(codes, torch.Tensor) and not (codes.is_floating_point() or codes.is_complex())
        if not integer or codes.dtype == torch.bool:
            raise ValueError(f"AgillmVQVAE.decode expects integer codes, got "
                             f"{getattr(codes, 'dtype', type(codes).__name__)}.")
        if codes.ndim < 2 or codes.shape[0] == 0 or tuple(codes.shape[1:]) not in ((side * side,), (side, side)):
            raise ValueError(f"AgillmVQVAE.decode expects codes of shape [batch, {side ** 2}] or [batch, {side}, "
                             f"{side}] (a {side}x{side} latent grid), got {list(codes.shape)}.")
        if not torch.compiler.is_compiling() and (codes.min() < 0 or codes.max() >= config.num_embeddings):
            raise ValueError(f"AgillmVQVAE.decode: codes must lie in [0, {config.num_embeddings}), got values in "
                             f"[{codes.min().item()}, {codes.max().item()}]. Token ids from the decoder's vocabulary "
                             f"must have image_vocab_offset subtracted first.")
        return codes.long()


__all__ = ["AgillmVQVAE", "AgillmVQVAEOutput", "AgillmVQVAEPreTrainedModel", "AgillmVectorQuantizer"]
