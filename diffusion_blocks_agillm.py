"""DiffusionBlocks: AGILLM 4.x's block-wise EDM training mode and its Euler sampler.

What is trained. `config.diffusion_blocks.layer_groups` splits the decoder layers into B consecutive groups; group i
owns the i-th noise band `[sigma_bands[i], sigma_bands[i + 1]]` (first layers = LOWEST noise). The bands split the
log-normal(p_mean, p_std) noise distribution truncated to [sigma_min, sigma_max] into equal-probability parts. A
training step (`forward(labels=...)` in training mode, so `Trainer` needs nothing special) picks ONE group, draws one
noise level per sequence inside its band, and trains that group alone as a denoiser of the token embeddings:

    z0 = embed(ids) * scale    zt = z0 + sigma * eps           (every position is noised, context included)
    D  = c_skip * zt + c_out * group(c_in * zt)                (the group's layers only, with the head's mask)
    loss = sum_o weight_o * mean_b(w(sigma_b)) * CE_o(head_o(norm(D)))                       (AGILLM 4.x)
         + reconstruction_weight * mean_b(w(sigma_b) * mean_{t,d} (D - sg(z0))^2)            (new, see below)

`scale` is `sigma_data / RMS(embedding matrix)` (detached) with `embedding_scale="sigma_data"`, 1 with None.
EDM preconditioning (Karras et al. 2022) with sigma_data: `c_skip = sd^2 / (s^2 + sd^2)`, `c_out = s * sd /
sqrt(s^2 + sd^2)`, `c_in = 1 / sqrt(s^2 + sd^2)`; the blocks get no noise conditioning (no c_noise), as in AGILLM
4.x. `w(s) = min((s^2 + sd^2) / (s * sd)^2, loss_weight_max)`; for the CE terms it is averaged over the batch before
multiplying (AGILLM 4.x's scalar `_edm_w`), for the reconstruction it weights each sequence. Objectives: AR (next
token) and SAT (token t + sat_block_size, plus the stride gate when `config.sat_gate_loss`), each with its own mask
and its own noise draw at the same sigma. Layers outside the group are not run at all, so only the group, the
embeddings, the final norm and the heads get gradients.

Group choice ("loss_balanced", AGILLM 4.x `_choose_block`): least-trained group during warm-up or while any group is
untrained; the stalest group once one has waited `choice_max_stale_steps`; the least-trained group when the count
ratio exceeds `choice_max_count_skew` or with probability `choice_explore`; otherwise the highest
`ema + stale_bonus * min(1, stale / max_stale) + undertrain_bonus * (max_count - count) / max_count`. The statistics
live in `model.diffusion_blocks_state` (`DiffusionBlocksState`) and are saved with the weights. Each forward pass is
one step (with gradient accumulation, the micro-batches of one update may train different groups). Under data
parallelism every process chooses for itself, so DDP needs `ddp_find_unused_parameters=True`.

Euler sampler (`generate(generation_mode="diffusion_euler")`): for each new token, the whole sequence starts at
`z = z0 + sigma_max * eps` and follows the EDM probability-flow ODE `z <- z + (s_next - s) / s * (z - D)` down a
band-aligned schedule: every group exactly `euler_steps_per_group` times, from the highest band to the lowest, the
last step going to sigma = 0 (where z = D); the next token is read from `lm_head(norm(z))` at the last position.
As in AGILLM 4.x the known context is noised too, so at sigma_max the prompt is barely visible: the sampler shows
what the chained groups produce, and is no substitute for AR decoding of a DiffusionBlocks model.

Fixes over AGILLM 4.x, all on by default:
1. The sampler's groups are the trained ones: both read `config.diffusion_blocks`, which is saved in config.json
   (AGILLM 4.x re-partitioned with the inference-time `--dblock_blocks`, default 4, whatever training used).
2. Its schedule visits every band (AGILLM 4.x's geometric schedule skipped bands, e.g. band 1 of 4). There is no
   setting for the old schedule: it evaluated groups on noise levels they were not trained on.
3. Training fits what the sampler uses: the reconstruction term makes D an estimate of the clean embedding, which the
   Euler step assumes (AGILLM 4.x fitted only norm(D) to CE). `reconstruction_weight=0` restores AGILLM 4.x's loss.
4. The group choice tracks the raw cross-entropy, not the EDM-weighted loss (bands have different irreducible losses;
   AGILLM 4.x's newest trainer made the same change), skips non-finite losses, and its statistics (and the sigma
   curriculum's step) survive save/load and `Trainer` resumes instead of restarting at zero.
5. The clean data have the scale EDM assumes: `embedding_scale="sigma_data"` rescales the embeddings to RMS
   sigma_data (AGILLM 4.x used them as they are, N(0, 1)-initialised; AGILLM's own init is N(0, 0.02), where noise
   above sigma ~ 0.02 hides every token: measured on Shakespeare, d=128, 4 groups, 400 steps, every group stayed at
   the unigram level, raw CE 6.1-6.3, vs 5.4-5.7 rescaled). `embedding_scale=None` restores AGILLM 4.x.
6. The heads' biases and label smoothing are those of the model's own losses (AGILLM 4.x's DBlock CE trained no head
   bias and no smoothing, although its AR/SAT trainer, and so a converted config, uses 0.1).
AGILLM 4.x's exact loss: `reconstruction_weight=0, embedding_scale=None`, with `label_smoothing=0` and unbiased heads.

Caching in the sampler. The plan (sigma schedule, group per step, c_skip/c_out/c_in, Euler ratios), the embedding
scale and the attention masks are built once per call (each token reads rows of the masks), the rotary tables once
per token for all steps. Attention is causal, so a position's trajectory never depends on later positions: with one
noise draw per position, kept for the whole call, the earlier positions' keys/values at every (step, layer) are
reused, and a new token costs B * euler_steps_per_group passes over ONE position instead of over the whole sequence.
`use_cache=False` recomputes everything for every token (same noise, same result), AGILLM 4.x's cost profile.
"""

import math
import sys
from dataclasses import dataclass
from statistics import NormalDist

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.utils import ModelOutput, logging


try:  # a saved model folder (remote code): sibling modules of the same package
    from .objectives_agillm import ar_loss, sat_loss
except ImportError:  # this repository, imported as top-level modules
    from objectives_agillm import ar_loss, sat_loss


logger = logging.get_logger(__name__)


# ------------------------------------------------------------------------------------------- noise and preconditioning


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`c_skip, c_out, c_in` for noise levels `sigma` `[batch]`, each `[batch, 1, 1]` (for `[batch, seq, hidden]`)."""
    sigma = sigma[:, None, None]
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), total.rsqrt()


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float, weight_max: float) -> torch.Tensor:
    """EDM's `lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2`, clamped at `weight_max` as AGILLM 4.x does."""
    return ((sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2).clamp(max=weight_max)


def sample_sigmas(batch_size: int, low: float, high: float, settings: dict, step: int, device) -> torch.Tensor:
    """One noise level per sequence in `[low, high]`, from the truncated log-normal (AGILLM 4.x `_sample_sigma`).

    The curriculum narrows the band to `[low, low * (high / low) ** frac]`, `frac = clamp((step+1) / steps, 0.05, 1)`;
    stratified sampling draws the quantiles `(j + U) / n` (one shared U, shuffled) instead of n independent ones.
    Draws come from the CPU generator (reproducible across devices) and are moved to `device`.
    """
    if settings.sigma_curriculum_steps > 0:
        fraction = min(1.0, max(0.05, (step + 1) / settings.sigma_curriculum_steps))
        high = low * (high / low) ** fraction
    p_mean, p_std = settings.p_mean, settings.p_std
    normal = NormalDist()
    q_low, q_high = (normal.cdf((math.log(s) - p_mean) / p_std) for s in (low, high))
    if settings.sigma_stratified and batch_size > 1:
        quantiles = (torch.arange(batch_size, dtype=torch.float64) + torch.rand((), dtype=torch.float64)) / batch_size
        quantiles = quantiles[torch.randperm(batch_size)]
    else:
        quantiles = torch.rand(batch_size, dtype=torch.float64)
    sigma = torch.exp(p_mean + p_std * torch.special.ndtri(q_low + (q_high - q_low) * quantiles))
    return sigma.clamp(low, high).to(device=device, dtype=torch.float32)


# ------------------------------------------------------------------------------------------- group choice


class DiffusionBlocksState(nn.Module):
    """Which layer group trains next, and the statistics that decide it (AGILLM 4.x's loss-balanced rule).

    Per group: an EMA of the raw cross-entropy (None until trained), how often and when (training step) it was trained;
    plus the step counter that also drives the sigma curriculum. `AgillmForCausalLM` owns one when
    `config.diffusion_blocks` is set. The statistics are this module's *extra state*, a float64 tensor in the state
    dict (`diffusion_blocks_state._extra_state`): `save_pretrained`/`from_pretrained` and `Trainer`'s
    `resume_from_checkpoint` restore them, and `.to(dtype)` never rounds them (a bf16 EMA could not move by 4% steps).
    """

    def __init__(self, config):
        super().__init__()
        # `from_pretrained(..., diffusion_blocks={...})` sets the field after the config was built and checked.
        config.resolve_diffusion_blocks()
        config.validate()
        self.config = config
        self.num_groups = len(config.diffusion_blocks.layer_groups)
        self.last_group: int | None = None  # the latest step's group and noise levels, for logging
        self.last_sigma: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.loss_ema: list[float | None] = [None] * self.num_groups
        self.counts = [0] * self.num_groups
        self.last_seen = [-1] * self.num_groups

    def choose_group(self) -> int:
        """The group to train at this step (`group_choice`: `loss_balanced`, `round_robin` or `random`)."""
        settings = self.config.diffusion_blocks
        num_groups, step, counts, last_seen = self.num_groups, self.step, self.counts, self.last_seen
        if settings.group_choice == "round_robin":
            return step % num_groups
        if settings.group_choice == "random":
            return int(torch.randint(num_groups, ()))

        def least_trained() -> int:
            return min(range(num_groups), key=lambda i: (counts[i], last_seen[i], i))

        if step < settings.choice_warmup_steps or 0 in counts:
            return least_trained()
        stale = [step - seen if seen >= 0 else step + 1 for seen in last_seen]
        max_stale = settings.choice_max_stale_steps
        if max_stale > 0 and max(stale) >= max_stale:
            return max(range(num_groups), key=lambda i: (stale[i], -counts[i], -i))
        max_count = max(counts)
        max_skew = settings.choice_max_count_skew
        if max_skew > 1.0 and max_count / min(counts) > max_skew:
            return least_trained()
        if settings.choice_explore > 0 and float(torch.rand(())) < settings.choice_explore:
            return least_trained()

        stale_scale = max(1, max_stale if max_stale > 0 else max(stale))

        def score(i: int) -> tuple:
            loss = -1.0 if self.loss_ema[i] is None else self.loss_ema[i]
            staleness = settings.choice_stale_bonus * min(1.0, stale[i] / stale_scale)
            undertraining = settings.choice_undertrain_bonus * (max_count - counts[i]) / max_count
            return loss + staleness + undertraining, -counts[i], stale[i], -i  # ties: fewer counts, staler, lower i

        return max(range(num_groups), key=score)

    def record(self, group: int, loss: float) -> None:
        """Account one training step of `group` whose raw (un-weighted) cross-entropy was `loss`."""
        self.counts[group] += 1
        self.last_seen[group] = self.step
        if math.isfinite(loss):  # one non-finite loss must not poison the EMA for good (counts still advance)
            previous, decay = self.loss_ema[group], self.config.diffusion_blocks.choice_ema_decay
            self.loss_ema[group] = loss if previous is None else decay * previous + (1.0 - decay) * loss
        self.step += 1

    def get_extra_state(self) -> torch.Tensor:
        ema = [math.nan if value is None else value for value in self.loss_ema]
        return torch.tensor([self.step, *ema, *self.counts, *self.last_seen], dtype=torch.float64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        values = state.double().flatten().tolist()
        if len(values) != 1 + 3 * self.num_groups:
            logger.warning(
                f"The saved DiffusionBlocks statistics are for {(len(values) - 1) // 3} layer groups, the config has "
                f"{self.num_groups}: the group choice starts from fresh statistics."
            )
            self.reset()
            return
        groups = self.num_groups
        self.step = int(values[0])
        self.loss_ema = [None if math.isnan(value) else value for value in values[1 : 1 + groups]]
        self.counts = [int(value) for value in values[1 + groups : 1 + 2 * groups]]
        self.last_seen = [int(value) for value in values[1 + 2 * groups :]]

    def extra_repr(self) -> str:
        ema = ", ".join("-" if value is None else f"{value:.3f}" for value in self.loss_ema)
        return f"groups={self.num_groups}, step={self.step}, counts={self.counts}, loss_ema=[{ema}]"


# ------------------------------------------------------------------------------------------- shared pieces


def _modeling_module(model):
    """The module defining the model's classes (this repository's or a remote-code copy): its output class and helpers.

    This file may not import modeling_agillm (it is imported BY it, and remote code has its own copy).
    """
    return sys.modules[type(model.model).__module__]


def _settings_of(model) -> dict:
    if getattr(model, "diffusion_blocks_state", None) is None or model.config.diffusion_blocks is None:
        raise ValueError(
            "DiffusionBlocks needs a model built with config.diffusion_blocks set, e.g. "
            "AgillmConfig(diffusion_blocks={'num_groups': 4}) or from_pretrained(path, diffusion_blocks={...}); "
            "setting it on an existing model's config does not create the group statistics."
        )
    return model.config.diffusion_blocks


def embedding_scale(model) -> float | torch.Tensor:
    """Factor from token embeddings to the clean data z0: `sigma_data / RMS(embedding matrix)`, or 1 when
    `embedding_scale` is None. Detached, and the same in training and sampling for the same weights."""
    settings = model.config.diffusion_blocks
    if settings.embedding_scale is None:
        return 1.0
    with torch.no_grad():
        weight = model.model.embed_tokens.weight
        return settings.sigma_data / weight.float().pow(2).mean().sqrt().clamp(min=1e-12).to(weight.dtype)


def clean_embeddings(model, input_ids=None, inputs_embeds=None) -> torch.Tensor:
    """The clean data z0 of a batch (gradients reach the looked-up embedding rows as usual)."""
    if inputs_embeds is None:
        model.model.check_token_ids(input_ids)
        inputs_embeds = model.model.embed_tokens(input_ids)
    return inputs_embeds * embedding_scale(model)


def _layer_inputs(model, objective: str, inputs_embeds, attention_mask, position_ids):
    """Per-layer-type masks and rotary tables for `objective`, built exactly as `AgillmModel.forward` builds them."""
    trunk = model.model
    masks = trunk.attention_masks(objective, inputs_embeds, attention_mask, None, position_ids)
    return masks, trunk.rotary_emb(inputs_embeds, position_ids=position_ids)


def _run_group(model, group: list[int], hidden_states, masks, position_embeddings, position_ids, cache=None, **kwargs):
    """The decoder layers `[start, end)` of one group, nothing else."""
    start, end = group
    for layer in model.model.layers[start:end]:
        hidden_states = layer(
            hidden_states,
            attention_mask=masks[layer.attention_type],
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
            **kwargs,
        )
    return hidden_states


# ------------------------------------------------------------------------------------------- training


def diffusion_blocks_training_step(model, inputs: dict, labels: torch.Tensor, **kwargs):
    """One DiffusionBlocks step: choose a group, noise the embeddings in its band, return the group's EDM losses.

    Called by `AgillmForCausalLM.forward` in training mode with labels and no `objective`. Returns the model's
    `AgillmCausalLMOutputWithPast`: `loss`, the AR `logits` of the denoised sequence, and `objective_losses` with the
    raw cross-entropy of each objective and the (unweighted) `reconstruction` error. The chosen group and the noise
    levels are left in `model.diffusion_blocks_state.last_group` / `.last_sigma`.
    """
    settings = _settings_of(model)
    state, trunk = model.diffusion_blocks_state, model.model
    kwargs.pop("num_items_in_batch", None)  # losses are means over this batch (`accepts_loss_kwargs` is False)
    kwargs.pop("shift_labels", None)  # `forward` already turned them into `labels`
    clean = clean_embeddings(model, inputs["input_ids"], inputs["inputs_embeds"])
    batch_size, seq_len = clean.shape[:2]
    attention_mask, position_ids = inputs["attention_mask"], inputs["position_ids"]
    if position_ids is None:
        position_ids = torch.arange(seq_len, device=clean.device)[None]
        trunk.check_last_position(seq_len - 1)
    else:
        trunk.check_last_position(position_ids.max())

    group = state.choose_group()
    sigma = sample_sigmas(batch_size, *settings.sigma_bands[group : group + 2], settings, state.step, clean.device)
    c_skip, c_out, c_in = (c.to(clean.dtype) for c in edm_preconditioning(sigma, settings.sigma_data))
    weight = edm_loss_weight(sigma, settings.sigma_data, settings.loss_weight_max)

    loss, raw_loss, losses, ar_logits = 0.0, 0.0, {}, None
    for objective, objective_weight in settings.objectives.items():
        if objective_weight == 0:
            continue
        noisy = clean + sigma[:, None, None].to(clean.dtype) * torch.randn_like(clean)
        masks, position_embeddings = _layer_inputs(model, objective, noisy, attention_mask, position_ids)
        hidden = _run_group(model, settings.layer_groups[group], c_in * noisy, masks, position_embeddings,
                            position_ids, **kwargs)
        denoised = c_skip * noisy + c_out * hidden
        normed = trunk.norm(denoised)
        if objective == "ar":
            ar_logits = model.lm_head(normed)
            losses["ar"] = ar_loss(model, ar_logits, labels)
            if settings.reconstruction_weight > 0:
                error = _reconstruction_error(denoised, clean.detach(), attention_mask)
                losses["reconstruction"] = error.mean()
                loss = loss + settings.reconstruction_weight * (weight * error).mean()
        else:
            sat_logits, gate_logits = model.sat_head(normed)
            losses["sat"] = sat_loss(model, sat_logits, gate_logits, labels)
        loss = loss + objective_weight * weight.mean() * losses[objective]
        raw_loss = raw_loss + objective_weight * losses[objective].detach()

    state.last_group, state.last_sigma = group, sigma
    state.record(group, float(raw_loss))  # one host sync per step, as AGILLM 4.x's `float(loss)`
    return _modeling_module(model).AgillmCausalLMOutputWithPast(loss=loss, logits=ar_logits, objective_losses=losses)


def _reconstruction_error(denoised: torch.Tensor, clean: torch.Tensor, attention_mask) -> torch.Tensor:
    """Per sequence: mean squared error of D against the clean embedding over real (non-padding) positions, in fp32."""
    squared = (denoised.float() - clean.float()).pow(2).mean(-1)  # [batch, seq]
    if attention_mask is None or attention_mask.ndim != 2:
        return squared.mean(-1)
    real = attention_mask.to(squared.dtype)
    return (squared * real).sum(-1) / real.sum(-1).clamp(min=1)


# ------------------------------------------------------------------------------------------- Euler sampler


@dataclass
class EulerStep:
    """One Euler step of the plan: evaluate `group` at noise `sigma`, then move z to `sigma_next`."""

    group: int
    sigma: float
    sigma_next: float
    c_skip: float
    c_out: float
    c_in: float

    @property
    def keep(self) -> float:
        """`z_next = keep * z + (1 - keep) * D` is the Euler step `z + (s_next - s) / s * (z - D)`."""
        return self.sigma_next / self.sigma


def euler_plan(settings: dict) -> list[EulerStep]:
    """The band-aligned schedule: groups from the highest band down, `euler_steps_per_group` geometric steps inside
    each band, starting at sigma_max and ending at sigma = 0 (the last step returns D itself)."""
    bands, steps_per_group = settings.sigma_bands, settings.euler_steps_per_group
    sigma_data = settings.sigma_data
    knots, groups = [], []
    for group in reversed(range(len(bands) - 1)):
        low, high = bands[group], bands[group + 1]
        knots += [high * (low / high) ** (j / steps_per_group) for j in range(steps_per_group)]
        groups += [group] * steps_per_group
    knots.append(0.0)
    plan = []
    for i, group in enumerate(groups):
        sigma = knots[i]
        total = sigma**2 + sigma_data**2
        plan.append(EulerStep(group, sigma, knots[i + 1], sigma_data**2 / total, sigma * sigma_data / math.sqrt(total),
                              1 / math.sqrt(total)))
    return plan


@dataclass
class DiffusionEulerOutput(ModelOutput):
    r"""
    sequences (`torch.LongTensor` of shape `(batch_size, sequence_length)`): prompt followed by the generated tokens.
    scores (`tuple[torch.FloatTensor]`, *optional*): processed next-token scores per generated token
        (`output_scores=True`).
    logits (`tuple[torch.FloatTensor]`, *optional*): raw AR logits per generated token (`output_logits=True`).
    num_forward_passes (`int`): group evaluations run (each a pass through one layer group).
    group_schedule (`list[int]`): the group evaluated at each Euler step of one token.
    sigma_schedule (`list[float]`): the noise level of each of those steps.
    """

    sequences: torch.LongTensor | None = None
    scores: tuple[torch.FloatTensor, ...] | None = None
    logits: tuple[torch.FloatTensor, ...] | None = None
    num_forward_passes: int | None = None
    group_schedule: list[int] | None = None
    sigma_schedule: list[float] | None = None


class _EulerDenoiser:
    """Runs the plan for new positions `[start, end)` of the sequence; with `use_cache`, earlier positions come from
    one KV cache per Euler step (their trajectories do not depend on later positions: attention is causal)."""

    def __init__(self, model, plan: list[EulerStep], noise: torch.Tensor, use_cache: bool):
        self.model, self.plan, self.noise, self.use_cache = model, plan, noise, use_cache
        self.settings = model.config.diffusion_blocks
        self.caches = [DynamicCache() for _ in plan] if use_cache else None
        self.num_forward_passes = 0
        self.embedding_scale = embedding_scale(model)  # once per call
        if use_cache:  # one mask per layer type for the longest sequence; each token reads its rows
            max_len = noise.shape[1]
            positions = torch.arange(max_len, device=noise.device)[None]
            # (ALiBi included: its bias depends only on absolute positions, so the rows slice exactly too.)
            self.full_masks = model.model.attention_masks("ar", noise[:1], None, None, positions)
            masks = self.full_masks.values()
            if not all(mask is None or (torch.is_tensor(mask) and mask.ndim == 4) for mask in masks):
                raise ValueError(
                    "generation_mode='diffusion_euler' caches attention-mask rows, which needs attn_implementation "
                    f"'eager', 'sdpa' or a flash attention; got {model.config._attn_implementation!r}. Pass "
                    "use_cache=False to rebuild the masks for every token instead."
                )

    def _masks_and_positions(self, new_embeds: torch.Tensor, start: int, end: int):
        position_ids = torch.arange(start, end, device=new_embeds.device)[None]
        if not self.use_cache:
            return (*_layer_inputs(self.model, "ar", new_embeds, None, position_ids), position_ids)
        masks = {kind: None if mask is None else mask[..., start:end, :end] for kind, mask in self.full_masks.items()}
        position_embeddings = self.model.model.rotary_emb(new_embeds, position_ids=position_ids)
        return masks, position_embeddings, position_ids

    def final_state(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        """z after the last step (= the denoised embeddings) for positions `[start, len(input_ids))`."""
        end = input_ids.shape[1]
        clean = self.model.model.embed_tokens(input_ids[:, start:end]) * self.embedding_scale
        z = clean + self.plan[0].sigma * self.noise[:, start:end].to(clean.dtype)
        masks, position_embeddings, position_ids = self._masks_and_positions(clean, start, end)
        for index, step in enumerate(self.plan):
            cache = self.caches[index] if self.use_cache else None
            hidden = _run_group(self.model, self.settings.layer_groups[step.group], step.c_in * z, masks,
                                position_embeddings, position_ids, cache=cache)
            denoised = step.c_skip * z + step.c_out * hidden
            z = step.keep * z + (1.0 - step.keep) * denoised
            self.num_forward_passes += 1
        return z


@torch.no_grad()
def diffusion_euler_generate(
    model,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    generation_config=None,
    **kwargs,
):
    """Generate with the DiffusionBlocks Euler sampler (`model.generate(..., generation_mode="diffusion_euler")`).

    Takes the usual generation arguments (`max_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`,
    `repetition_penalty`, `eos_token_id`, `return_dict_in_generate`, `output_scores`, `output_logits`, `use_cache`,
    or a `generation_config`); the noise comes from torch's global CPU generator, so `torch.manual_seed` makes it
    reproducible on any device. Prompts must be unpadded (a batch of equal-length prompts is fine).
    """
    settings = _settings_of(model)
    input_ids = kwargs.pop("inputs", None) if input_ids is None else input_ids
    if input_ids is None or input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError("generation_mode='diffusion_euler' needs input_ids of shape [batch, prompt_length > 0].")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError(
            "generation_mode='diffusion_euler' does not support padded prompts (the sampler noises every position "
            "and has no padding-aware denoising); pass unpadded prompts of equal length, or one prompt at a time."
        )
    generation_config, unused = model._prepare_generation_config(generation_config, **kwargs)
    unused = {key: value for key, value in unused.items() if not key.startswith("output_")}
    if unused:
        raise TypeError(f"generation_mode='diffusion_euler' got unexpected arguments {sorted(unused)}.")
    model._prepare_special_tokens(generation_config, True, device=input_ids.device)
    prompt_len = input_ids.shape[1]
    max_new_tokens = generation_config.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = max(0, generation_config.max_length - prompt_len)
    model.model.check_token_ids(input_ids)
    model.model.check_last_position(prompt_len + max_new_tokens - 1)
    logits_processor = model._get_logits_processor(generation_config, input_ids_seq_length=prompt_len,
                                                   device=input_ids.device, model_kwargs={})

    plan = euler_plan(settings)
    batch_size, hidden_size = input_ids.shape[0], model.config.hidden_size
    dtype = model.model.embed_tokens.weight.dtype
    noise = torch.randn(batch_size, prompt_len + max_new_tokens, hidden_size, dtype=torch.float32)
    denoiser = _EulerDenoiser(model, plan, noise.to(device=input_ids.device, dtype=dtype),
                              use_cache=bool(generation_config.use_cache))
    eos = generation_config._eos_token_tensor
    pad = generation_config._pad_token_tensor
    unfinished = torch.ones(batch_size, dtype=torch.bool, device=input_ids.device)
    scores, raw_logits, sequences, cached_len = [], [], input_ids, 0
    for _ in range(max_new_tokens):
        start = cached_len if denoiser.use_cache else 0
        z_last = denoiser.final_state(sequences, start)[:, -1]
        cached_len = sequences.shape[1]
        logits = model.lm_head(model.model.norm(z_last)).float()
        next_scores = logits_processor(sequences, logits)
        if generation_config.do_sample:
            next_tokens = torch.multinomial(next_scores.softmax(-1), num_samples=1).squeeze(1)
        else:
            next_tokens = next_scores.argmax(-1)
        if eos is not None and pad is not None:
            next_tokens = torch.where(unfinished, next_tokens, pad)
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)
        scores.append(next_scores)
        raw_logits.append(logits)
        if eos is not None:
            unfinished &= ~torch.isin(next_tokens, eos)
            if not bool(unfinished.any()):
                break

    if not generation_config.return_dict_in_generate:
        return sequences
    return DiffusionEulerOutput(
        sequences=sequences,
        scores=tuple(scores) if generation_config.output_scores else None,
        logits=tuple(raw_logits) if generation_config.output_logits else None,
        num_forward_passes=denoiser.num_forward_passes,
        group_schedule=[step.group for step in plan],
        sigma_schedule=[step.sigma for step in plan],
    )
