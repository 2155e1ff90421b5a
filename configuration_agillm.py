"""AGILLM model configuration.

Every field is documented once, here, in the order the model reads it. Field names follow transformers'
conventions (the Llama/Qwen3/Llama4 names), so configs of those families map onto AGILLM one to one
(see `convert/`). Invalid configs fail when they are built or loaded, never later in a forward, the way
transformers' own configs do (`@strict`): a value outside a field's type or choices (`Literal`) raises
huggingface_hub's `StrictDataclassFieldValidationError`; an invalid combination raises
`StrictDataclassClassValidationError` from the `validate_*` method that checks it. Both name the field.
`config.validate()` re-runs the checks after edits, and `save_pretrained` runs them before writing.
"""

import math
from statistics import NormalDist
from typing import Literal, get_args

import transformers


# The APIs this file and its siblings use exist from transformers 5 on. Older versions would fail on the imports
# below with a bare ImportError naming some class; say what is wrong instead (this file is the first one a
# remote-code load runs).
REQUIRED_TRANSFORMERS_MAJOR = 5
if int(transformers.__version__.split(".")[0]) < REQUIRED_TRANSFORMERS_MAJOR:
    raise ImportError(
        f"AGILLM needs transformers {REQUIRED_TRANSFORMERS_MAJOR}.x (tested with 5.23.0); this environment has "
        f"transformers {transformers.__version__}. Upgrade it: pip install -U 'transformers>=5,<6'"
    )

from dataclasses import fields  # noqa: E402

from huggingface_hub.dataclasses import strict  # noqa: E402
from huggingface_hub.errors import StrictDataclassFieldValidationError  # noqa: E402
from transformers import PreTrainedConfig  # noqa: E402
from transformers.configuration_utils import SubConfigSpec  # noqa: E402
from transformers.modeling_rope_utils import RopeParameters  # noqa: E402


# Fields every config inherits from `PreTrainedConfig` (not settings of an AGILLM component).
PRETRAINED_CONFIG_FIELDS = frozenset(field.name for field in fields(PreTrainedConfig))
# Keys `to_dict()` writes beside the fields (and a legacy one `PreTrainedConfig` still reads).
SERIALIZED_CONFIG_KEYS = frozenset({"model_type", "transformers_version", "_name_or_path", "output_attentions",
                                    "torch_dtype"})


# The closed choices of string fields, as transformers' configs type them (`Literal`): `@strict` checks a value on
# every assignment.
# Attention kinds a layer can have; names are transformers' own layer types, so `DynamicCache(config=...)`,
# `StaticCache` and `masking_utils` pick the right cache layer and mask per layer without extra code.
LayerType = Literal["full_attention", "sliding_attention", "chunked_attention"]
NormType = Literal["rms_norm", "layer_norm"]
PositionEmbeddingType = Literal["rope", "alibi", "agillm_alibi", "none"]
MlpType = Literal["gated", "plain"]
RouterType = Literal["softmax_topk", "sigmoid_group_topk", "sigmoid_top1_scaled_input", "top1_straight_through"]
MlpLayerType = Literal["dense", "sparse"]
RouterScope = Literal["token", "document"]
QkNormType = Literal["learned", "unweighted_post_rope"]
HeadName = Literal["ar", "sat", "nat"]
NatObjective = Literal["denoise", "draft"]  # see `nat_objective`
GroupChoice = Literal["loss_balanced", "round_robin", "random"]  # see `AgillmDiffusionBlocksConfig.group_choice`
AGILLM_HEADS = get_args(HeadName)  # the heads' names, for the checks that iterate over them
NEEDS_ONE_PARTITION = ("diffusion_blocks needs exactly one of layer_groups (list of [start, end) layer ranges) or "
                       "num_groups (AGILLM 4.x's uniform partition).")
DIFFUSION_BLOCKS_OBJECTIVES = ("ar", "sat")  # NAT is not an EDM objective in AGILLM 4.x (no noise level, no c_in)


def uniform_layer_groups(num_layers: int, num_groups: int) -> list[list[int]]:
    """AGILLM 4.x's partition: `num_groups` runs of `max(1, L // B)` layers, the last one taking the remainder."""
    if not 1 <= num_groups <= num_layers:
        raise ValueError(f"diffusion_blocks num_groups must lie in [1, num_hidden_layers={num_layers}], got {num_groups}.")
    size = max(1, num_layers // num_groups)
    return [[i * size, (i + 1) * size if i < num_groups - 1 else num_layers] for i in range(num_groups)]


def equal_mass_sigma_bands(num_groups: int, sigma_min: float, sigma_max: float, p_mean: float, p_std: float):
    """Band edges splitting log-normal(p_mean, p_std) truncated to [sigma_min, sigma_max] into equal-probability bands.

    Edge i is `exp(p_mean + p_std * Phi^-1(a + (b - a) * i / B))` with `a, b = Phi((ln sigma_{min,max} - p_mean) / p_std)`
    (AGILLM 4.x `_block_sigmas`); the ends are pinned to sigma_min and sigma_max exactly.
    """
    normal = NormalDist()
    low, high = (normal.cdf((math.log(s) - p_mean) / p_std) for s in (sigma_min, sigma_max))
    inner = [math.exp(p_mean + p_std * normal.inv_cdf(low + (high - low) * i / num_groups)) for i in range(1, num_groups)]
    return [float(sigma_min), *inner, float(sigma_max)]
# Written into every saved config.json so a folder loads through any of these auto classes as remote code.
# (`save_pretrained` on its own records only the class of the object being saved.)
AGILLM_AUTO_MAP = {
    "AutoConfig": "configuration_agillm.AgillmConfig",
    "AutoModel": "modeling_agillm.AgillmModel",
    "AutoModelForCausalLM": "modeling_agillm.AgillmForCausalLM",
    "AutoModelForSequenceClassification": "modeling_agillm.AgillmForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_agillm.AgillmForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_agillm.AgillmForQuestionAnswering",
    "AutoModelForImageTextToText": "modeling_agillm.AgillmForConditionalGeneration",
    "AutoModelForMultimodalLM": "modeling_agillm.AgillmForConditionalGeneration",
}


# ------------------------------------------------------------------------------------------- multimodal towers
# Each tower has its own small config, held by `AgillmConfig` as an optional sub-config (`None` = no such tower),
# as transformers' Gemma 4 does for its vision and audio towers.


@strict(accept_kwargs=True)
class AgillmVisionConfig(PreTrainedConfig):
    r"""
    The ViT-style image encoder ([`AgillmVisionModel`]): non-overlapping patches -> linear embedding + learned
    position embedding -> pre-norm transformer encoder (bidirectional) -> final norm. A projector then maps each
    patch feature into the decoder's width, where it replaces one `<|image|>` placeholder token.

        image_size (`int`): side of the (square) input image in pixels; `AgillmImageProcessor` resizes to it.
        patch_size (`int`): side of one patch; must divide `image_size`. One image becomes
            `(image_size // patch_size) ** 2` tokens (`num_image_tokens`).
        num_channels (`int`): input channels (3: the image processor converts everything to RGB).
        hidden_size / intermediate_size / num_hidden_layers / num_attention_heads: the encoder's transformer.
        hidden_act (`str`): MLP activation of the encoder and of the projector.
        layer_norm_eps (`float`): epsilon of the encoder's LayerNorms.
        attention_dropout (`float`): dropout on the encoder's attention probabilities (training only).
        initializer_range (`float`): std of the normal init of the encoder's weights.
    """

    model_type = "agillm_vision"
    base_config_key = "vision_config"

    image_size: int = 32
    patch_size: int = 8
    num_channels: int = 3
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    attention_dropout: float | int = 0.0
    initializer_range: float = 0.02

    def validate_architecture(self):
        _check_positive(self, "image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size",
                        "num_hidden_layers", "num_attention_heads")
        _check_intervals(self, layer_norm_eps="(0, inf)", attention_dropout="[0, 1)", initializer_range="[0, inf)")
        _check_activation(self)
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size ({self.patch_size}) must divide image_size ({self.image_size}).")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads}).")

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens (and features) per image."""
        return (self.image_size // self.patch_size) ** 2


@strict(accept_kwargs=True)
class AgillmAudioConfig(PreTrainedConfig):
    r"""
    The speech encoder ([`AgillmAudioModel`]), Whisper-shaped: log-mel frames -> two 1-D convolutions (the second
    with stride `conv_stride`) -> sinusoidal positions -> pre-norm transformer encoder (bidirectional over the
    frames that are not padding) -> final norm; then `frames_per_token` consecutive frames are stacked and a
    projector maps them into the decoder's width, one `<|audio|>` placeholder each.
    Clip of `n` feature frames -> `ceil(n / (conv_stride * frames_per_token))` audio tokens (`num_audio_tokens`).

        num_mel_bins (`int`): log-mel channels per frame; `AgillmFeatureExtractor.feature_size` must match.
        conv_kernel_size (`int`): kernel of both convolutions (odd, so `same` padding keeps frames aligned).
        conv_stride (`int`): stride of the second convolution.
        frames_per_token (`int`): encoder frames stacked into one decoder token.
        hidden_size / intermediate_size / num_hidden_layers / num_attention_heads: the encoder's transformer.
        hidden_act (`str`): activation of the convolutions, the MLPs and the projector.
        layer_norm_eps (`float`): epsilon of the encoder's LayerNorms.
        attention_dropout (`float`): dropout on the encoder's attention probabilities (training only).
        initializer_range (`float`): std of the normal init of the encoder's weights.
    """

    model_type = "agillm_audio"
    base_config_key = "audio_config"

    num_mel_bins: int = 80
    conv_kernel_size: int = 3
    conv_stride: int = 2
    frames_per_token: int = 2
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float | int = 0.0
    initializer_range: float = 0.02

    def validate_architecture(self):
        _check_positive(self, "num_mel_bins", "conv_kernel_size", "conv_stride", "frames_per_token", "hidden_size",
                        "intermediate_size", "num_hidden_layers", "num_attention_heads")
        _check_intervals(self, layer_norm_eps="(0, inf)", attention_dropout="[0, 1)", initializer_range="[0, inf)")
        _check_activation(self)
        if self.conv_kernel_size % 2 == 0:
            raise ValueError(f"conv_kernel_size must be odd (same padding), got {self.conv_kernel_size}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"audio hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads}).")

    @property
    def frames_per_audio_token(self) -> int:
        """Log-mel frames behind one audio token (the processor expands `<|audio|>` with the same number)."""
        return self.conv_stride * self.frames_per_token

    def num_audio_tokens(self, num_frames: int) -> int:
        return -(-num_frames // self.frames_per_audio_token)


@strict(accept_kwargs=True)
class AgillmVQVAEConfig(PreTrainedConfig):
    r"""
    The VQ-VAE image tokenizer ([`AgillmVQVAE`]): a convolutional encoder down to a `latent_size x latent_size`
    grid, a vector quantiser with a codebook of `num_embeddings` codes, and a decoder back to pixels. Code `c` is
    token id `AgillmConfig.image_vocab_offset + c` in the decoder's vocabulary, so the decoder can write images.

        image_size (`int`): side of the square input/output image in pixels.
        num_channels (`int`): image channels (3).
        hidden_channels (`list[int]`): conv widths per resolution level; each level after the first halves the
            resolution, so the latent grid has side `image_size // 2 ** (len(hidden_channels) - 1)`.
        num_res_blocks (`int`): residual blocks per level, in the encoder and in the decoder.
        embed_dim (`int`): width of a code vector.
        num_embeddings (`int`): codebook size (= image token ids reserved in the decoder's vocabulary).
        commitment_cost (`float`): weight of the commitment loss `|z_e - sg(z_q)|^2`.
        codebook_ema_decay (`float`): the codebook follows an exponential moving average of the encoder outputs
            assigned to each code (VQ-VAE-2); 0 trains it with the codebook loss `|sg(z_e) - z_q|^2` instead.
        dead_code_threshold (`float`): a code whose moving-average usage (assignments per training batch) falls
            below this is restarted on a random encoder output of the current batch; 0 disables restarts.
        initializer_range (`float`): std of the normal init of the codebook (convolutions keep PyTorch's init).
    """

    model_type = "agillm_vqvae"
    base_config_key = "vq_config"

    image_size: int = 32
    num_channels: int = 3
    hidden_channels: list[int] | None = None
    num_res_blocks: int = 1
    embed_dim: int = 64
    num_embeddings: int = 512
    commitment_cost: float = 0.25
    codebook_ema_decay: float = 0.99
    dead_code_threshold: float = 1.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.hidden_channels is None:
            self.hidden_channels = [32, 64, 128]
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        _check_positive(self, "image_size", "num_channels", "embed_dim", "num_embeddings")
        if not self.hidden_channels or any(c <= 0 for c in self.hidden_channels) or self.num_res_blocks < 0:
            raise ValueError(f"hidden_channels must be positive widths and num_res_blocks >= 0, got "
                             f"{self.hidden_channels} / {self.num_res_blocks}.")
        if self.image_size % 2 ** (len(self.hidden_channels) - 1):
            raise ValueError(f"image_size ({self.image_size}) must be divisible by 2 ** (len(hidden_channels) - 1).")
        _check_intervals(self, codebook_ema_decay="[0, 1)", dead_code_threshold="[0, inf)",
                         commitment_cost="[0, inf)", initializer_range="[0, inf)")

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.hidden_channels) - 1)

    @property
    def num_image_tokens(self) -> int:
        """Tokens one image becomes (a `latent_size x latent_size` grid, row-major)."""
        return self.latent_size**2


def _check_positive(config: PreTrainedConfig, *names: str) -> None:
    for name in names:
        if getattr(config, name) <= 0:
            raise ValueError(f"{type(config).__name__}.{name} must be positive, got {getattr(config, name)}.")


def in_interval(value, interval: str) -> bool:
    """Whether `value` is a finite number inside `interval`, written as in maths: "[0, 1)", "(0, inf)".

    A check written as `value < 0` lets NaN through (every comparison with NaN is false) and `value > 0` lets inf
    through; asking for membership of a finite interval rejects both.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


def _check_intervals(config: PreTrainedConfig, **intervals: str) -> None:
    """Each named field must be a finite number inside its interval (see `in_interval`)."""
    for name, interval in intervals.items():
        if not in_interval(getattr(config, name), interval):
            raise ValueError(f"{type(config).__name__}.{name} must be a finite number in {interval}, got "
                             f"{getattr(config, name)!r}.")


def _check_activation(config: PreTrainedConfig, name: str = "hidden_act") -> None:
    """An unknown activation name would only fail when the first layer is built; name the choices at construction."""
    from transformers.activations import ACT2FN

    if getattr(config, name) not in ACT2FN:
        raise ValueError(f"{type(config).__name__}.{name}={getattr(config, name)!r} is not an activation transformers "
                         f"knows; choose one of {sorted(ACT2FN)}.")


@strict(accept_kwargs=True)
class AgillmDiffusionBlocksConfig(PreTrainedConfig):
    r"""
    DiffusionBlocks training (`AgillmConfig.diffusion_blocks`; diffusion_blocks_agillm.py). In training mode,
    `forward(labels=...)` trains ONE layer group per step as an EDM denoiser at that group's noise band, and
    `generate(generation_mode="diffusion_euler")` samples through the same groups: both read this config, so training
    and inference cannot disagree. The defaults are AGILLM 4.x's `--dblock_*` defaults, except `reconstruction_weight`
    and `embedding_scale` (new; 0 and None are AGILLM 4.x).

    Structure:
        layer_groups (`list[list[int]]`): `[start, end)` layer ranges covering every decoder layer in order; group i
            trains on the i-th lowest noise band. Give this or `num_groups`.
        num_groups (`int`, *optional*): AGILLM 4.x's uniform partition into this many groups. `AgillmConfig` turns
            it into `layer_groups` (it knows the number of layers), so config.json holds one source of truth.
        sigma_bands (`list[float]`): derived, `len(layer_groups) + 1` equal-probability edges of the noise
            distribution below (`equal_mass_sigma_bands`), written so config.json shows them. A stored value must
            equal the derived one: edit the sigma settings instead.
        objectives (`dict[str, float]`, *optional*): `{"ar": w, "sat": w}`, the EDM objectives and their weights.
            Default: the model's AR and SAT heads at 1.0. AR must have a positive weight (the Euler sampler reads it).

    Noise (a log-normal `exp(N(p_mean, p_std))` truncated to `[sigma_min, sigma_max]`, EDM preconditioning):
        sigma_min / sigma_max / p_mean / p_std (`float`): the noise distribution.
        sigma_data (`float`): EDM's data standard deviation.
        loss_weight_max (`float`): clamp of the EDM loss weight.
        sigma_curriculum_steps (`int`): steps over which the sampled noise widens from the band's low edge to the
            whole band (0 = off).
        sigma_stratified (`bool`): stratify the noise levels of a batch over the band.
        reconstruction_weight (`float`): weight of the EDM denoising term the Euler sampler relies on (0 is
            AGILLM 4.x's loss).
        embedding_scale (`str`, *optional*): `"sigma_data"`: the clean data are the embeddings rescaled to RMS
            `sigma_data`; `None`: as they are (AGILLM 4.x).

    Which group trains at a step:
        group_choice (`str`): `loss_balanced` (AGILLM 4.x: favour groups whose loss is high, stale or undertrained),
            `round_robin` or `random`.
        choice_warmup_steps / choice_max_stale_steps (`int`), choice_max_count_skew / choice_explore /
            choice_ema_decay / choice_stale_bonus / choice_undertrain_bonus (`float`): the loss-balanced rule's
            parameters (`DiffusionBlocksState.choose_group`).

    Sampling:
        euler_steps_per_group (`int`): Euler steps the sampler takes inside each group's band.
    """

    model_type = "agillm_diffusion_blocks"
    base_config_key = "diffusion_blocks"

    layer_groups: list[list[int]] | None = None
    num_groups: int | None = None
    sigma_bands: list[float] | None = None
    objectives: dict[str, float | int] | None = None
    sigma_min: float | int = 0.002
    sigma_max: float | int = 80.0
    p_mean: float | int = -1.2
    p_std: float | int = 1.2
    sigma_data: float | int = 0.5
    loss_weight_max: float | int = 5.0
    sigma_curriculum_steps: int = 2000
    sigma_stratified: bool = True
    reconstruction_weight: float | int = 1.0
    embedding_scale: Literal["sigma_data"] | None = "sigma_data"
    group_choice: GroupChoice = "loss_balanced"
    choice_warmup_steps: int = 16
    choice_max_stale_steps: int = 64
    choice_max_count_skew: float | int = 1.35
    choice_explore: float | int = 0.08
    choice_ema_decay: float | int = 0.96
    choice_stale_bonus: float | int = 0.35
    choice_undertrain_bonus: float | int = 0.25
    euler_steps_per_group: int = 1

    def __post_init__(self, **kwargs):
        # A misspelt setting would otherwise be kept as an unused attribute.
        if kwargs.get("model_type") == self.model_type:  # written by `to_dict`; the class already says it
            del kwargs["model_type"]
        unknown = sorted(set(kwargs) - SERIALIZED_CONFIG_KEYS)
        if unknown:
            known = sorted(self.settings())
            cause = ValueError(f"diffusion_blocks has unknown keys {unknown}; known keys are {known}.")
            raise StrictDataclassFieldValidationError(field=unknown[0], cause=cause) from cause
        super().__post_init__(**kwargs)

    def validate_structure(self):
        """One partition (the count or the ranges), and the objectives."""
        if self.num_groups is not None and self.layer_groups is not None:
            raise ValueError(NEEDS_ONE_PARTITION)
        if self.num_groups is not None and self.num_groups < 1:
            raise ValueError(f"diffusion_blocks num_groups must be at least 1, got {self.num_groups}.")
        if self.objectives is not None:
            _check_diffusion_objectives(self.objectives)

    def validate_noise(self):
        """The noise distribution and the EDM constants."""
        finite = "(-inf, inf)"
        _check_intervals(self, sigma_min=finite, sigma_max=finite, p_mean=finite, p_std=finite, sigma_data=finite,
                         loss_weight_max=finite, reconstruction_weight="[0, inf)")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"diffusion_blocks needs 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min} "
                             f"and sigma_max={self.sigma_max}.")
        for name in ("p_std", "sigma_data", "loss_weight_max"):
            if getattr(self, name) <= 0:
                raise ValueError(f"diffusion_blocks {name} must be positive, got {getattr(self, name)}.")
        if self.sigma_curriculum_steps < 0:
            raise ValueError(f"diffusion_blocks sigma_curriculum_steps must be >= 0, got "
                             f"{self.sigma_curriculum_steps}.")

    def validate_group_choice(self):
        """The loss-balanced rule's parameters and the sampler's steps."""
        _check_intervals(self, choice_max_count_skew="(-inf, inf)", choice_explore="[0, 1]",
                         choice_ema_decay="[0, 1)", choice_stale_bonus="(-inf, inf)",
                         choice_undertrain_bonus="(-inf, inf)")
        for name in ("choice_warmup_steps", "choice_max_stale_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"diffusion_blocks {name} must be >= 0, got {getattr(self, name)}.")
        if self.euler_steps_per_group < 1:
            raise ValueError("diffusion_blocks euler_steps_per_group must be at least 1.")

    def settings(self) -> dict:
        """The DiffusionBlocks settings alone, without the fields every `PreTrainedConfig` has (dtype, ...)."""
        return {field.name: getattr(self, field.name) for field in fields(self)
                if field.name not in PRETRAINED_CONFIG_FIELDS}

    def derived_sigma_bands(self) -> list[float]:
        return equal_mass_sigma_bands(len(self.layer_groups), self.sigma_min, self.sigma_max, self.p_mean, self.p_std)


def _check_diffusion_objectives(objectives: dict) -> None:
    unknown = sorted(set(objectives) - set(DIFFUSION_BLOCKS_OBJECTIVES))
    if unknown:
        raise ValueError(f"diffusion_blocks objectives {unknown} are not supported; choose from "
                         f"{list(DIFFUSION_BLOCKS_OBJECTIVES)} (NAT is not trained at a noise level).")
    if not all(in_interval(weight, "[0, inf)") for weight in objectives.values()):
        raise ValueError(f"diffusion_blocks objective weights must be numbers >= 0, got {objectives}.")
    if not objectives.get("ar", 0) > 0:
        raise ValueError("diffusion_blocks objectives must train 'ar' with a positive weight: the Euler sampler "
                         f"denoises with the AR attention pattern and reads the AR head (got {objectives}).")


def _layer_groups_problem(groups, num_layers: int) -> str | None:
    """What is wrong with `groups` as `[start, end)` ranges covering layers `0..num_layers - 1` in order, or None."""
    if not groups:
        return "it must be a non-empty list of [start, end) pairs"
    expected_start = 0
    for group in groups:
        if len(group) != 2:
            return f"{group!r} is not a [start, end) pair of integers"
        if group[0] != expected_start:
            return f"group {list(group)} starts at {group[0]}, expected {expected_start} (gap or overlap)"
        if group[1] <= group[0]:
            return f"group {list(group)} is empty"
        expected_start = group[1]
    if expected_start != num_layers:
        return f"the groups end at layer {expected_start}, expected {num_layers}"
    return None


@strict(accept_kwargs=True)
class AgillmConfig(PreTrainedConfig):
    r"""
    Configuration of an AGILLM decoder ([`AgillmModel`] and its task heads).

    Vocabulary and sizes:
        vocab_size (`int`): number of token ids; ids must lie in `[0, vocab_size)`.
        hidden_size (`int`): width of the residual stream.
        intermediate_size (`int`): width of the gated MLP (SwiGLU when `hidden_act="silu"`).
        num_hidden_layers (`int`): number of decoder layers.
        num_attention_heads (`int`): query heads per layer.
        num_key_value_heads (`int`, *optional*): key/value heads; `None` means MHA (= query heads), 1 means MQA,
            anything in between GQA. Must divide `num_attention_heads`.
        head_dim (`int`, *optional*): per-head width. `None` means `hidden_size // num_attention_heads`, which
            then must divide evenly. Set explicitly (as Qwen3 does) to decouple it from `hidden_size`.
        max_position_embeddings (`int`): longest sequence (prompt + generated) the model accepts. Longer input
            raises `ValueError`, except with `rope_type="dynamic"`, which is built to extrapolate.

    Positions:
        rope_parameters (`dict`, *optional*): transformers' RoPE dict: `rope_type` (`default`, `linear`,
            `dynamic`, `yarn`, `longrope`, `llama3`), `rope_theta` and the type's own keys.
            Validated by transformers; an unknown type raises `ValueError`.
        nope_layers (`list[int]`, *optional*): indices of layers that apply no rotary embedding at all (NoPE,
            as in Llama 4): their attention is position-free and relies on causality and the other layers.
        position_embedding_type (`str`): how positions enter attention. `rope` (rotary, `rope_parameters`);
            `alibi` (standard ALiBi: a per-head linear penalty `-m_h * |i - j|` on the attention scores);
            `agillm_alibi` (AGILLM 4.x's variant, `-m_h * max(j - i, 0)`: only keys *after* the query are
            penalised, so under the causal AR mask it is exactly zero and AR has no positional signal: kept for
            converted checkpoints, whose SAT/NAT passes depend on it); `none` (no positions, NoPE everywhere).
            ALiBi slopes follow AGILLM 4.x (= the ALiBi paper's rule, also for non-power-of-two head counts).
            ALiBi needs `full_attention` layers and an attention backend that takes an additive mask (eager, sdpa).

    Attention:
        layer_types (`list[str]`, *optional*): per-layer attention kind, one of `full_attention`,
            `sliding_attention` (each token sees the previous `sliding_window` tokens) or `chunked_attention`
            (tokens see only their own `attention_chunk_size` block, causally). `None` means every layer is
            `sliding_attention` when `sliding_window` is set (Mistral), else `full_attention`.
        sliding_window (`int`, *optional*): window of `sliding_attention` layers.
        attention_chunk_size (`int`, *optional*): block size of `chunked_attention` layers.
        attention_bias (`bool`): bias on the q/k/v projections (Qwen2 sets it).
        attention_output_bias (`bool`, *optional*): bias on the output projection; `None` follows
            `attention_bias` (Llama's convention, where one flag covers all four projections).
        attention_dropout (`float`): dropout on attention probabilities while training.
        use_qk_norm (`bool`): normalise queries and keys per head over `head_dim` (see `qk_norm_type`).
        qk_norm_type (`str`): `learned` (RMSNorm with a weight, before RoPE: Qwen3) or `unweighted_post_rope`
            (RMS normalisation without a weight, after RoPE and on RoPE layers only: Llama 4).
        attn_temperature_tuning (`bool`): Llama 4's query scaling on NoPE layers, `1 + attn_scale *
            log1p(floor((position + 1) / floor_scale))`, which keeps long-context attention sharp without positions.
        floor_scale (`int`), attn_scale (`float`): the two constants of `attn_temperature_tuning`.
        kv_source_layers (`list[int]`, *optional*): cross-layer KV sharing. Entry i names the layer whose keys and
            values layer i attends over; `i` itself means layer i computes its own (the default for every layer).
            A sharing layer has no k/v projections and stores nothing in the cache; its source must be an earlier
            layer that computes its own K/V, with the same attention type.

    Multi-head latent attention (MLA, DeepSeek-V2/V3), on when `kv_lora_rank` is set:
        kv_lora_rank (`int`, *optional*): width of the compressed key/value latent. The cache stores this latent
            (after its norm) and the shared rotary key part, `kv_lora_rank + qk_rope_head_dim` numbers per token and
            layer, instead of `2 * num_key_value_heads * head_dim`.
        q_lora_rank (`int`, *optional*): width of the compressed query (`None`: a full-rank `q_proj`).
        qk_nope_head_dim (`int`), qk_rope_head_dim (`int`), v_head_dim (`int`): per-head widths of the
            position-free query/key part, the rotary part and the values. `head_dim` is the rotary width
            (`qk_rope_head_dim`), as in DeepSeek-V3's config; the attention scale is `(nope + rope) ** -0.5`
            (times YaRN's `mscale_all_dim` correction when the RoPE is YaRN).
        mla_absorbed_decode (`bool`): when decoding against a cache, fold the key/value up-projection into the
            query and the output (attend in the latent space: MQA with one latent head), instead of expanding every
            cached latent to per-head K/V each step. Both give the same output; absorbed reads far less memory.
        tie_kv (`bool`): one projection serves as both key and value (AGILLM 4.x `--tie_kv`): there is no
            `v_proj`; values are the key projection before RoPE and QK-norm.
        hidden_dropout (`float`): dropout on the attention block's output (after `o_proj`) while training.

    MLP and norms:
        mlp_type (`str`): `gated` (`down(act(gate(x)) * up(x))`, SwiGLU with silu) or `plain`
            (`down(act(up(x)))`, e.g. AGILLM 4.x's ReLU MLP with biases).
        hidden_act (`str`): activation of the MLP, any key of `transformers.activations.ACT2FN`.
        mlp_bias (`bool`): bias on the MLP projections (also on the experts of an MoE layer).
        num_experts (`int`): routed experts per MoE layer; 0 means every layer has a dense MLP.
        num_experts_per_tok (`int`): experts each token is routed to (top-k).
        moe_intermediate_size (`int`, *optional*): hidden width of one routed expert (default:
            `intermediate_size`).
        router_type (`str`): `softmax_topk` (softmax over the router logits, top-k, renormalised over the chosen
            experts when `norm_topk_prob`; equal to AGILLM 4.x's top-k>1 rule) or `top1_straight_through`
            (AGILLM 4.x top-1: the chosen expert's output is used unscaled in the forward pass, while the router
            probability carries the gradient: `y = expert(x) * p / p.detach()`).
        norm_topk_prob (`bool`): renormalise the top-k routing weights to sum to one.
        router_type (continued): `sigmoid_group_topk` (DeepSeek-V3: sigmoid scores; experts are chosen on
            `score + e_score_correction_bias` within the `topk_group` best of `n_group` expert groups, a group
            scored by its two best experts; weights are the unbiased scores, renormalised when `norm_topk_prob`, times
            `routed_scaling_factor`); `sigmoid_top1_scaled_input` (Llama 4: top-1 expert, whose input is scaled by
            the sigmoid of its router logit).
        n_group (`int`), topk_group (`int`): expert groups and how many of them a token may use
            (`sigmoid_group_topk`); `n_group` must divide `num_experts`.
        routed_scaling_factor (`float`): multiplies the routed experts' weights (`sigmoid_group_topk`).
        shared_expert_intermediate_size (`int`): hidden width of the always-on shared expert added to every
            MoE layer's output (several AGILLM 4.x or DeepSeek-V3 shared experts are one wider one); 0 means none.
        shared_expert_gate (`bool`): scale the shared expert's output by a learned per-token sigmoid gate
            (Qwen2-MoE); `False` adds it unweighted (DeepSeek-V3, Llama 4, AGILLM 4.x).
        mlp_layer_types (`list[str]`, *optional*): per layer, `dense` (an MLP of `intermediate_size`) or
            `sparse` (MoE). Default: every layer sparse when `num_experts > 0`. Expresses DeepSeek-V3's dense first
            layers (`first_k_dense_replace`), Qwen3-MoE's `mlp_only_layers` and Llama 4's interleaving.
        router_scope (`str`): `token` (each token picks its experts) or `document` (EMO-style document routing:
            each document first picks `experts_per_document` experts from its tokens' mean router scores, then
            every token of it routes, by the rule above, among those experts only). Documents are delimited by the
            attention mask (padding belongs to none) and by packed-sequence boundaries (`position_ids` restarting).
            The choice is made from the whole document in training and from the prompt at generation time (kept in
            the cache for the generated tokens).
        experts_per_document (`int`, *optional*): experts a document may use (default `num_experts_per_tok`).
        output_router_logits (`bool`): return each MoE layer's router logits, and add the auxiliary losses below to
            the training loss (as Mixtral).
        router_aux_loss_coef (`float`): weight of the load-balancing loss `E * sum_e f_e * P_e` (Switch/Mixtral).
            Set to 0.0 when no decoder layer is sparse (there is no router; TRL enables its router loss otherwise).
        router_z_loss_coef (`float`): weight of the router z-loss `mean(logsumexp(logits)^2)` (ST-MoE); 0.0 when no
            decoder layer is sparse.
        router_bias_update_rate (`float`): DeepSeek-V3's auxiliary-loss-free balancing: after each training
            forward, `e_score_correction_bias += rate * sign(mean load - load)` per layer (0 = off). The bias only
            steers which experts are chosen, never the weights.
        norm_type (`str`): `rms_norm` (Llama) or `layer_norm` (with bias, as GPT-style and AGILLM 4.x models).
        rms_norm_eps (`float`): epsilon of every norm (either type).

    Heads and objectives ([`AgillmForCausalLM`]):
        heads (`list[str]`): output heads over the trunk. `ar` (next token, causal mask; always present),
            `sat` (semi-autoregressive: block-causal mask over blocks of `sat_block_size`, position t predicts
            token t + `sat_block_size`, plus a stride gate), `nat` (non-autoregressive: a masked token predicts
            itself, with bidirectional or block-causal attention).
        head_bias (`bool`): bias on the head projections (AGILLM 4.x untied heads have one).
        objective_weights (`dict[str, float]`, *optional*): weight of each head's loss in the training loss
            (`forward(labels=...)` without `objective`); default 1.0 for every head.
        label_smoothing (`float` or `dict[str, float]`): label smoothing of the heads' cross-entropy (0 = none), one
            value for all heads or one per head (AGILLM 4.x smoothed AR and SAT by 0.1, NAT not at all).
        sat_block_size (`int`): tokens a SAT step emits; the SAT mask is block-causal over blocks of this size.
        sat_gate_loss (`bool`): train the SAT stride gate on a real target: class `s - 1` where `s` is the
            number of leading SAT predictions of a block that are correct (the longest prefix safe to emit).
            Off for converted AGILLM 4.x checkpoints, whose gate was trained without one.
        nat_mask_token_id (`int`): the id NAT replaces hidden tokens with (`<|mask|>` = 3 in the shipped
            tokenizer; AGILLM 4.x used its pad id).
        nat_block_size (`int`, *optional*): `None` is AGILLM 4.x's NAT, fully bidirectional over the whole
            sequence. An integer makes NAT block-causal (each block sees earlier blocks and itself) and trains it
            the way it decodes: block by block, with an exact KV cache of finished blocks.
        nat_objective (`str`): how a block NAT head trains. `"denoise"` hides each block's tokens at a random ratio
            and runs the clean and the noised sequence side by side, clean blocks block-causal (the cache of
            `generation_mode="nat_block"`). `"draft"` (TiDAR: AR and diffusion drafting in one forward) appends
            an all-mask copy of the sequence to the clean one and runs ONE pass for both losses: the clean tokens
            are causal (the AR loss reads them, exactly as a plain AR pass would), mask block k sees the clean
            tokens before block k and its own masks and predicts that block's tokens. This is the layout
            `generation_mode="verify_and_draft"` decodes with (one forward verifies the last drafts with the AR
            head and drafts the next ones with the NAT head); it needs `nat_block_size` >= 2.
        cross_entropy_chunk_size (`int`, *optional*): opt-in memory saving for training (`None` = off, the stock
            loss). When set, a model in training mode given `labels` computes every head's cross-entropy (AR, SAT
            with its gate target, NAT, MTP) from the hidden states this many tokens at a time (`losses_agillm.py`):
            the `tokens x vocab_size` logits, their fp32 copy and their gradients never exist, only a few
            `cross_entropy_chunk_size x vocab_size` fp32 buffers. Loss and gradients equal the stock path's. As with
            Liger-Kernel's fused loss, the output's `logits` is then `None` (`gate_logits` are still returned);
            evaluation and calls without labels are unchanged, and DiffusionBlocks training keeps the stock loss.
            The head projections must be plain `nn.Linear`s (no LoRA on a head, no tensor-parallel or offloaded
            heads). 256 cut the peak memory of a vocab-49,152 training step to 0.17x (bench/fused_cross_entropy.md).
        diffusion_blocks (`AgillmDiffusionBlocksConfig` or `dict`, *optional*): DiffusionBlocks training (`None` =
            off): in training mode, `forward(labels=...)` trains one layer group per step as an EDM denoiser at that
            group's noise band, and `generate(generation_mode="diffusion_euler")` samples through the same groups.
            Every setting is documented on [`AgillmDiffusionBlocksConfig`]; `{"num_groups": 4}` takes AGILLM 4.x's
            defaults for the rest.

    Multi-token prediction (DeepSeek-V3 MTP):
        num_mtp_layers (`int`): MTP depth D. Layer k (k = 0..D-1) predicts token t + k + 2 from the previous
            depth's hidden state and the embedding of token t + k + 1: `block(eh_proj([enorm(emb), hnorm(h)]))`,
            then `shared_head.norm` and the shared `lm_head`. Stored after the last decoder layer as
            `model.layers.{num_hidden_layers + k}` (DeepSeek-V3's checkpoint layout), which is what
            `generate(use_mtp=True)` loads for lossless speculative decoding.
        mtp_layer_types (`list[str]`, *optional*): attention type of each MTP layer (default full attention).
        mtp_mlp_layer_types (`list[str]`, *optional*): `dense` / `sparse` per MTP layer (default: sparse for MoE
            models, as DeepSeek-V3).
        mtp_loss_weight (`float`): weight of the mean MTP loss over depths added to the training loss.

    Multimodal (images and speech in, image tokens out; [`AgillmForConditionalGeneration`]):
        vision_config (`AgillmVisionConfig` or `dict`, *optional*): the image encoder; `None` = no image input.
        audio_config (`AgillmAudioConfig` or `dict`, *optional*): the speech encoder; `None` = no audio input.
        vq_config (`AgillmVQVAEConfig` or `dict`, *optional*): the VQ-VAE image tokenizer; `None` = the model cannot
            write images.
        image_token_id / audio_token_id (`int`): placeholder ids (the shipped tokenizer's `<|image|>` = 6 and
            `<|audio|>` = 9); each placeholder is replaced by one encoder feature.
        image_start_token_id / image_end_token_id (`int`): `<|image_start|>` (7) / `<|image_end|>` (8), around the
            placeholders of an input image and around the VQ tokens of a generated one.
        audio_start_token_id / audio_end_token_id (`int`): `<|audio_start|>` (10) / `<|audio_end|>` (11).
        image_vocab_offset (`int`, *optional*): token id of VQ code 0; codes take ids
            `[image_vocab_offset, image_vocab_offset + vq_config.num_embeddings)`. `None` puts them at the end of the
            vocabulary. Text generation never emits them; `generate_images` emits nothing else.
        media_bidirectional_attention (`bool`): the placeholder tokens of one image (or one audio clip) attend to
            each other both ways, not only causally (the rest of the sequence stays causal).

    Embeddings, init, generation:
        tie_word_embeddings (`bool`): the LM head (and every other head projection) shares the input
            embedding matrix.
        initializer_range (`float`): std of the normal init of linear and embedding weights.
        use_cache (`bool`): return a KV cache from forward by default.
        pad_token_id / bos_token_id / eos_token_id: special ids; the shipped tokenizer uses 0 / 1 / 2.
    """

    model_type = "agillm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AgillmVisionConfig, optional=True),
        "audio_config": SubConfigSpec(config_class=AgillmAudioConfig, optional=True),
        "vq_config": SubConfigSpec(config_class=AgillmVQVAEConfig, optional=True),
        "diffusion_blocks": SubConfigSpec(config_class=AgillmDiffusionBlocksConfig, optional=True),
    }
    keys_to_ignore_at_inference = ["past_key_values"]
    # Tensor-parallel plan of `AgillmModel`: column-split q/k/v and gate/up, row-split o and down, as Llama.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 8192
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048

    rope_parameters: RopeParameters | dict | None = None
    nope_layers: list[int] | None = None

    layer_types: list[LayerType] | None = None
    sliding_window: int | None = None
    attention_chunk_size: int | None = None
    attention_bias: bool = False
    attention_output_bias: bool | None = None
    attention_dropout: float | int = 0.0
    use_qk_norm: bool = False
    qk_norm_type: QkNormType = "learned"
    attn_temperature_tuning: bool = False
    floor_scale: int = 8192
    attn_scale: float = 0.1
    kv_source_layers: list[int] | None = None
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    mla_absorbed_decode: bool = True
    position_embedding_type: PositionEmbeddingType = "rope"
    tie_kv: bool = False
    hidden_dropout: float | int = 0.0

    mlp_type: MlpType = "gated"
    hidden_act: str = "silu"
    mlp_bias: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int | None = None
    router_type: RouterType = "softmax_topk"
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float | int = 1.0
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    mlp_layer_types: list[MlpLayerType] | None = None
    router_scope: RouterScope = "token"
    experts_per_document: int | None = None
    output_router_logits: bool = False
    router_aux_loss_coef: float | int = 0.001
    router_z_loss_coef: float | int = 0.0
    router_bias_update_rate: float | int = 0.0
    norm_type: NormType = "rms_norm"
    rms_norm_eps: float = 1e-6

    heads: list[HeadName] | None = None
    head_bias: bool = False
    objective_weights: dict[str, float] | None = None
    label_smoothing: float | int | dict[str, float] = 0.0
    sat_block_size: int = 2
    sat_gate_loss: bool = True
    nat_mask_token_id: int = 3
    nat_block_size: int | None = 8
    nat_objective: NatObjective = "denoise"
    diffusion_blocks: dict | PreTrainedConfig | None = None
    cross_entropy_chunk_size: int | None = None

    num_mtp_layers: int = 0
    mtp_layer_types: list[LayerType] | None = None
    mtp_mlp_layer_types: list[MlpLayerType] | None = None
    mtp_loss_weight: float | int = 0.3

    vision_config: dict | PreTrainedConfig | None = None
    audio_config: dict | PreTrainedConfig | None = None
    vq_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 6
    image_start_token_id: int = 7
    image_end_token_id: int = 8
    audio_token_id: int = 9
    audio_start_token_id: int = 10
    audio_end_token_id: int = 11
    image_vocab_offset: int | None = None
    media_bidirectional_attention: bool = True

    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.kv_lora_rank is not None and self.head_dim is None:
            self.head_dim = self.qk_rope_head_dim  # MLA: the rotary tables are built for the rotary part only
        if self.head_dim is None and self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads  # else `validate_architecture` says why
        if self.attention_output_bias is None:
            self.attention_output_bias = self.attention_bias
        if self.layer_types is None:
            default = "sliding_attention" if self.sliding_window is not None else "full_attention"
            self.layer_types = [default] * self.num_hidden_layers
        if self.nope_layers is None:
            self.nope_layers = []
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["sparse" if self.num_experts else "dense"] * self.num_hidden_layers
        if "sparse" not in self.mlp_layer_types:
            # No decoder layer routes, so there is no router loss to weight. Trainers read a non-zero coefficient as
            # "this model returns router logits": TRL's SFTTrainer / DPOTrainer then request them and index the
            # (empty) tuple. Dense configs, saved ones included, therefore always carry 0.0.
            self.router_aux_loss_coef = 0.0
            self.router_z_loss_coef = 0.0
        if self.experts_per_document is None:
            self.experts_per_document = self.num_experts_per_tok
        if self.kv_source_layers is None:
            self.kv_source_layers = list(range(self.num_hidden_layers))
        if self.num_mtp_layers and self.mtp_layer_types is None:
            self.mtp_layer_types = ["full_attention"] * self.num_mtp_layers
        if self.num_mtp_layers and self.mtp_mlp_layer_types is None:
            self.mtp_mlp_layer_types = ["sparse" if self.num_experts else "dense"] * self.num_mtp_layers
        if self.heads is None:
            self.heads = ["ar"]
        if self.objective_weights is None:
            self.objective_weights = {head: 1.0 for head in self.heads}
        self.base_model_tp_plan = self._tp_plan_for_modules()
        self.base_model_ep_plan = self._ep_plan_for_modules()
        super().__post_init__(**kwargs)  # builds the sub-configs from dicts
        if self.vq_config is not None and self.image_vocab_offset is None:
            self.image_vocab_offset = self.vocab_size - self.vq_config.num_embeddings
        if getattr(self, "auto_map", None) is None:  # a loaded config keeps its own (it may carry a Hub repo prefix)
            self.auto_map = dict(AGILLM_AUTO_MAP)
        self.resolve_diffusion_blocks()

    # Validation: `@strict` runs every `validate_*` method after `__post_init__`, when a config is built or loaded,
    # and again in `validate()` and `save_pretrained`; each raises `ValueError` naming the wrong field, which
    # `@strict` re-raises as huggingface_hub's `StrictDataclassClassValidationError` (transformers' own configs
    # behave the same). They run in name order: `validate_architecture`, the first, checks the sizes and per-layer
    # list lengths that the others index with.

    def validate_architecture(self):
        """Sizes, layer lists, norms, positions and activations."""
        super().validate_architecture()
        if self.head_dim is None:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads}), or set head_dim explicitly.")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.num_mtp_layers < 0 or self.mtp_loss_weight < 0:
            raise ValueError("num_mtp_layers and mtp_loss_weight must be >= 0.")
        for name, length in (("layer_types", self.num_hidden_layers), ("mlp_layer_types", self.num_hidden_layers),
                             ("kv_source_layers", self.num_hidden_layers), ("mtp_layer_types", self.num_mtp_layers),
                             ("mtp_mlp_layer_types", self.num_mtp_layers)):
            values = getattr(self, name) or []
            if len(values) != length:
                raise ValueError(f"{name} has {len(values)} entries, expected {length}.")
        if "sliding_attention" in self.layer_types and not (self.sliding_window and self.sliding_window > 0):
            raise ValueError("sliding_attention layers need a positive sliding_window.")
        if "chunked_attention" in self.layer_types and not (self.attention_chunk_size and self.attention_chunk_size > 0):
            raise ValueError("chunked_attention layers need a positive attention_chunk_size.")
        bad_nope = [i for i in self.nope_layers if not 0 <= i < self.num_hidden_layers]
        if bad_nope:
            raise ValueError(f"nope_layers {bad_nope} are not layer indices (0..{self.num_hidden_layers - 1}).")
        _check_activation(self)
        _check_intervals(self, rms_norm_eps="(0, inf)", attention_dropout="[0, 1)", hidden_dropout="[0, 1)",
                         initializer_range="[0, inf)", mtp_loss_weight="[0, inf)")
        if self.uses_alibi and set(self.layer_types) != {"full_attention"}:
            raise ValueError(
                f"position_embedding_type={self.position_embedding_type!r} needs full_attention layers only "
                f"(ALiBi distances are absolute positions; windowed caches drop them), got {sorted(set(self.layer_types))}."
            )

    def validate_rope(self):
        """transformers' own RoPE checks, then what AGILLM needs on top (a known type, a finite theta)."""
        try:  # a missing key surfaces as KeyError there
            super().validate_rope()
        except KeyError as error:
            raise ValueError(f"Invalid rope_parameters {self.rope_parameters!r}: {error}") from error
        if self.rope_parameters is None or "rope_type" not in self.rope_parameters:
            raise ValueError(f"rope_parameters must name a rope_type, got {self.rope_parameters!r}.")
        bad_numbers = {key: value for key, value in self.rope_parameters.items()
                       if isinstance(value, float) and not math.isfinite(value)}
        if bad_numbers or not in_interval(self.rope_parameters.get("rope_theta", 1.0), "(0, inf)"):
            raise ValueError(f"rope_parameters need a finite rope_theta > 0 and finite numbers, got {self.rope_parameters!r}.")
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rope_type = self.rope_parameters["rope_type"]
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"Unknown rope_type {rope_type!r}; choose 'default' or one of {sorted(ROPE_INIT_FUNCTIONS)}."
            )

    def layer_type_at(self, layer_idx: int) -> str:
        """Attention type of a decoder layer or, past the last one, of an MTP layer (DeepSeek-V3 numbering)."""
        if layer_idx < self.num_hidden_layers:
            return self.layer_types[layer_idx]
        return self.mtp_layer_types[layer_idx - self.num_hidden_layers]

    def mlp_layer_type_at(self, layer_idx: int) -> str:
        if layer_idx < self.num_hidden_layers:
            return self.mlp_layer_types[layer_idx]
        return self.mtp_mlp_layer_types[layer_idx - self.num_hidden_layers]

    def kv_source_of(self, layer_idx: int) -> int:
        return self.kv_source_layers[layer_idx] if layer_idx < self.num_hidden_layers else layer_idx

    @property
    def shares_kv(self) -> bool:
        """Whether some layer attends over an earlier layer's keys and values (`kv_source_layers`)."""
        return any(source != layer for layer, source in enumerate(self.kv_source_layers))

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def has_gated_experts(self) -> bool:
        return bool(self.num_experts) and self.mlp_type == "gated"

    def validate_moe(self):
        """Experts, routers and their losses."""
        if "sparse" in self.mlp_layer_types and not self.num_experts:
            raise ValueError("mlp_layer_types has 'sparse' layers but num_experts is 0.")
        if self.num_experts < 0 or (self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts):
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must lie in [1, num_experts={self.num_experts}]."
            )
        if not self.num_experts:
            return
        if self.router_type == "top1_straight_through" and self.num_experts_per_tok != 1:
            raise ValueError("router_type='top1_straight_through' routes each token to exactly one expert "
                             f"(num_experts_per_tok=1), got {self.num_experts_per_tok}.")
        if (self.mlp_type == "plain") != bool(self.mlp_bias):
            raise ValueError("MoE experts are either gated without biases (mlp_type='gated', mlp_bias=False) or "
                             "plain with biases as AGILLM 4.x (mlp_type='plain', mlp_bias=True).")
        if self.moe_intermediate_size <= 0 or self.shared_expert_intermediate_size < 0:
            raise ValueError("moe_intermediate_size must be positive and shared_expert_intermediate_size >= 0.")
        if self.router_type == "sigmoid_group_topk":
            if self.n_group < 1 or self.num_experts % self.n_group:
                raise ValueError(f"n_group ({self.n_group}) must divide num_experts ({self.num_experts}).")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group ({self.topk_group}) must lie in [1, n_group={self.n_group}].")
            group_size = self.num_experts // self.n_group
            if self.n_group > 1 and group_size < 2:
                raise ValueError(f"sigmoid_group_topk scores a group by its two best experts; {self.n_group} groups "
                                 f"of {self.num_experts} experts leave {group_size} per group.")
            if self.num_experts_per_tok > self.topk_group * group_size:
                raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts of the "
                                 f"topk_group={self.topk_group} groups a token may use ({self.topk_group * group_size}).")
        if self.router_type == "sigmoid_top1_scaled_input" and self.num_experts_per_tok != 1:
            raise ValueError("router_type='sigmoid_top1_scaled_input' (Llama 4) scales the input of ONE expert; "
                             f"num_experts_per_tok must be 1, got {self.num_experts_per_tok}.")
        if self.router_scope == "document" and not (
            self.num_experts_per_tok <= self.experts_per_document <= self.num_experts
        ):
            raise ValueError(f"experts_per_document ({self.experts_per_document}) must lie in "
                             f"[num_experts_per_tok={self.num_experts_per_tok}, num_experts={self.num_experts}].")
        if self.router_scope == "document" and self.router_type == "sigmoid_group_topk" and self.n_group > 1:
            raise ValueError("router_scope='document' picks a document's experts by score; combine it with "
                             "n_group=1 (group-limited routing would restrict the choice a second time).")
        _check_intervals(self, routed_scaling_factor="(0, inf)", router_aux_loss_coef="[0, inf)",
                         router_z_loss_coef="[0, inf)", router_bias_update_rate="[0, 1)")
        if self.shared_expert_gate and not self.shared_expert_intermediate_size:
            raise ValueError("shared_expert_gate needs a shared expert (shared_expert_intermediate_size > 0).")

    def validate_attention(self):
        """Llama 4's temperature tuning, cross-layer KV sharing and MLA."""
        if self.attn_temperature_tuning and not (self.floor_scale > 0 and in_interval(self.attn_scale, "[0, inf)")):
            raise ValueError("attn_temperature_tuning needs floor_scale > 0 and attn_scale >= 0.")
        sources = self.kv_source_layers
        for layer, source in enumerate(sources):
            if source == layer:
                continue
            if not 0 <= source < layer or sources[source] != source:
                raise ValueError(f"kv_source_layers[{layer}] = {source}: a layer can only reuse the K/V of an earlier "
                                 "layer that computes its own.")
            if self.layer_types[source] != self.layer_types[layer] or (source in self.nope_layers) != (
                layer in self.nope_layers
            ):
                raise ValueError(f"kv_source_layers[{layer}] = {source}: both layers need the same attention type "
                                 "and the same RoPE/NoPE choice (the shared keys carry the source's positions).")
        if not self.is_mla:
            return
        for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MLA (kv_lora_rank set) needs a positive {name}, got {getattr(self, name)}.")
        if self.qk_nope_head_dim < 0 or self.qk_rope_head_dim % 2 or (self.q_lora_rank is not None and self.q_lora_rank <= 0):
            raise ValueError("MLA needs qk_nope_head_dim >= 0, an even qk_rope_head_dim and a positive q_lora_rank "
                             "(or None).")
        if self.head_dim != self.qk_rope_head_dim:
            raise ValueError(f"MLA: head_dim is the rotary width and must equal qk_rope_head_dim "
                             f"({self.qk_rope_head_dim}), got {self.head_dim}.")
        if self.num_key_value_heads != self.num_attention_heads:
            raise ValueError("MLA expands its latent to one key/value per query head: num_key_value_heads must "
                             f"equal num_attention_heads ({self.num_attention_heads}).")
        if self.tie_kv or self.use_qk_norm or self.uses_alibi or self.attn_temperature_tuning:
            raise ValueError("MLA does not combine with tie_kv, use_qk_norm, ALiBi or attn_temperature_tuning.")

    def validate_mtp(self):
        """Multi-token prediction layers."""
        if not self.num_mtp_layers:
            return
        if "sparse" in self.mtp_mlp_layer_types and not self.num_experts:
            raise ValueError("mtp_mlp_layer_types has 'sparse' layers but num_experts is 0.")
        if self.uses_alibi:
            raise ValueError("MTP layers run through transformers' MtpModel, which has no ALiBi: use RoPE or none.")

    def get_mtp_config(self) -> "AgillmConfig":
        """transformers' MTP config, with every per-layer list re-indexed for the MTP layers (which count from 0)."""
        mtp_config = super().get_mtp_config()
        mtp_config.kv_source_layers = list(range(self.num_mtp_layers))  # MTP layers compute their own K/V
        mtp_config.nope_layers = []
        mtp_config.diffusion_blocks = None
        mtp_config.num_mtp_layers = 0
        return mtp_config

    def _ep_plan_for_modules(self) -> dict[str, str]:
        """Expert parallelism (transformers' `distributed_config=DistributedConfig(enable_expert_parallel=True)`)."""
        if not self.has_gated_experts:
            return {}
        return {
            "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
            "layers.*.mlp.experts.down_proj": "grouped_gemm",
            "layers.*.mlp.experts": "ep_dispatch_experts",
        }

    def _tp_plan_for_modules(self) -> dict[str, str]:
        """The class TP plan restricted to modules this config builds (transformers rejects plans naming others)."""
        absent = set()
        if not self.use_qk_norm:
            absent |= {"q_norm", "k_norm"}
        if self.tie_kv:
            absent.add("v_proj")
        absent |= {"gate_proj", "up_proj", "down_proj"}  # re-added below for the layers that have a dense MLP
        if self.qk_norm_type != "learned":
            absent |= {"q_norm", "k_norm"}
        if self.is_mla:  # the latent projections stay replicated; the per-head up-projections split by head
            absent |= {"q_proj", "k_proj", "v_proj"}
        plan = {key: value for key, value in type(self).base_model_tp_plan.items() if key.split(".")[-1] not in absent}
        if self.is_mla:
            plan["layers.*.self_attn.kv_b_proj"] = "colwise"
            plan["layers.*.self_attn.q_b_proj" if self.q_lora_rank else "layers.*.self_attn.q_proj"] = "colwise"
        if "dense" in self.mlp_layer_types:
            dense = {"gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"}
            if self.mlp_type == "plain":
                del dense["gate_proj"]
            plan.update({f"layers.*.mlp.{name}": style for name, style in dense.items()})
        if self.has_gated_experts:  # as Qwen3-MoE / DeepSeek-V3
            plan["layers.*.mlp.experts.gate_up_proj"] = "packed_colwise"
            plan["layers.*.mlp.experts.down_proj"] = "rowwise"
            plan["layers.*.mlp.experts"] = "moe_tp_experts"
        if self.num_experts and self.shared_expert_intermediate_size:
            shared = {"gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"}
            if self.mlp_type == "plain":
                del shared["gate_proj"]
            plan.update({f"layers.*.mlp.shared_expert.{name}": style for name, style in shared.items()})
        return plan

    def __setattr__(self, name, value):
        # `from_pretrained(path, diffusion_blocks={...})` assigns a dict after the config was built; loading then
        # sets the dtype of every sub-config, so the dict becomes its config at once (completed by
        # `resolve_diffusion_blocks` when the model is built).
        if name == "diffusion_blocks" and isinstance(value, dict):
            value = AgillmDiffusionBlocksConfig(**value)
        super().__setattr__(name, value)

    def resolve_diffusion_blocks(self) -> None:
        """Complete `diffusion_blocks` with what depends on this model (idempotent): `num_groups` becomes
        `layer_groups`, `objectives` default to the model's AR and SAT heads, `sigma_bands` are derived. Run at
        construction, and again when a model is built: `from_pretrained(..., diffusion_blocks={...})` sets the field
        after the config was built (call `validate()` after it then)."""
        blocks = self.diffusion_blocks
        if blocks is None:
            return
        if blocks.num_groups is not None and blocks.num_groups <= self.num_hidden_layers:
            blocks.layer_groups = uniform_layer_groups(self.num_hidden_layers, blocks.num_groups)
            blocks.num_groups = None  # one source of truth in config.json
        if blocks.objectives is None:  # AGILLM 4.x: every EDM objective the model has a head for, weight 1.0
            blocks.objectives = {name: 1.0 for name in DIFFUSION_BLOCKS_OBJECTIVES if name in self.heads}
        if blocks.sigma_bands is None and blocks.layer_groups is not None:
            blocks.sigma_bands = blocks.derived_sigma_bands()
        self.diffusion_blocks = blocks

    def validate_diffusion_blocks(self):
        """The DiffusionBlocks settings against this model: layer groups, objectives' heads, stored sigma bands."""
        blocks = self.diffusion_blocks
        if blocks is None:
            return
        num_layers = self.num_hidden_layers
        if blocks.num_groups is None and blocks.layer_groups is None:
            raise ValueError(NEEDS_ONE_PARTITION)
        if blocks.num_groups is not None:  # `resolve_diffusion_blocks` converts every count that fits
            raise ValueError(f"diffusion_blocks num_groups must lie in [1, num_hidden_layers={num_layers}], got "
                             f"{blocks.num_groups}.")
        problem = _layer_groups_problem(blocks.layer_groups, num_layers)
        if problem:
            raise ValueError(f"diffusion_blocks layer_groups must cover layers 0..{num_layers - 1} in order, without "
                             f"gaps or overlaps: {problem} (got {blocks.layer_groups!r}).")
        missing = sorted(set(blocks.objectives) - set(self.heads))
        if missing:
            raise ValueError(f"diffusion_blocks objectives {missing} need heads the model lacks (heads={self.heads}).")
        _check_diffusion_objectives(blocks.objectives)
        bands = blocks.derived_sigma_bands()
        stored = blocks.sigma_bands
        if len(stored) != len(bands) or not all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(stored, bands)):
            raise ValueError(f"diffusion_blocks sigma_bands {stored} are derived from the layer groups and the sigma "
                             f"settings ({bands}); edit those instead, and drop sigma_bands.")

    def validate_heads(self):
        """Output heads, their objectives and losses."""
        if "ar" not in self.heads or len(set(self.heads)) != len(self.heads):
            raise ValueError(f"heads must be distinct names from {list(AGILLM_HEADS)} including 'ar', got {self.heads}.")
        extra = sorted(set(self.objective_weights) - set(self.heads))
        if extra:
            raise ValueError(f"objective_weights names {extra}, which are not among heads={self.heads}.")
        if not all(in_interval(weight, "[0, inf)") for weight in self.objective_weights.values()):
            raise ValueError(f"objective_weights must be finite numbers >= 0, got {self.objective_weights}.")
        if not any(self.objective_weights.values()):
            raise ValueError(f"objective_weights must train at least one head (a weight > 0), got "
                             f"{self.objective_weights}.")
        if set(self.heads) != {"ar"} and set(self.layer_types) != {"full_attention"}:
            raise ValueError(f"heads {self.heads} need full_attention layers only (SAT and NAT attend across blocks).")
        if self.sat_block_size < 2:
            raise ValueError(f"sat_block_size must be at least 2, got {self.sat_block_size}.")
        if self.nat_block_size is not None and self.nat_block_size < 1:
            raise ValueError(f"nat_block_size must be a positive integer or None, got {self.nat_block_size}.")
        if self.nat_objective == "draft" and ("nat" not in self.heads or (self.nat_block_size or 0) < 2):
            raise ValueError(f"nat_objective='draft' trains a block NAT head: it needs 'nat' in heads and "
                             f"nat_block_size >= 2, got heads={self.heads}, nat_block_size={self.nat_block_size}.")
        if self.cross_entropy_chunk_size is not None and self.cross_entropy_chunk_size <= 0:  # the type is checked
            raise ValueError(f"cross_entropy_chunk_size must be a positive integer or None, got "
                             f"{self.cross_entropy_chunk_size}.")
        if not 0 <= self.nat_mask_token_id < self.vocab_size:
            raise ValueError(f"nat_mask_token_id ({self.nat_mask_token_id}) must be a token id below vocab_size.")
        smoothing = self.label_smoothing if isinstance(self.label_smoothing, dict) else {"all": self.label_smoothing}
        if not all(in_interval(value, "[0, 1)") for value in smoothing.values()) or set(smoothing) - {"all", *AGILLM_HEADS}:
            raise ValueError(f"label_smoothing must lie in [0, 1), per head name if a dict; got {self.label_smoothing}.")

    @property
    def rope_type(self) -> str:
        return self.rope_parameters["rope_type"]

    def label_smoothing_for(self, head: str) -> float:
        if isinstance(self.label_smoothing, dict):
            return float(self.label_smoothing.get(head, 0.0))
        return float(self.label_smoothing)

    @property
    def uses_alibi(self) -> bool:
        return self.position_embedding_type in ("alibi", "agillm_alibi")

    @property
    def uses_rope(self) -> bool:
        return self.position_embedding_type == "rope"

    @property
    def is_multimodal(self) -> bool:
        return any(c is not None for c in (self.vision_config, self.audio_config, self.vq_config))

    @property
    def image_token_range(self) -> range:
        """Token ids of the VQ codes (empty without a VQ-VAE)."""
        if self.vq_config is None:
            return range(0)
        return range(self.image_vocab_offset, self.image_vocab_offset + self.vq_config.num_embeddings)

    def validate_multimodal(self):
        """Placeholder and boundary ids, and the VQ codes' place in the vocabulary."""
        if not self.is_multimodal:
            return
        special = ("image_token_id", "image_start_token_id", "image_end_token_id", "audio_token_id",
                   "audio_start_token_id", "audio_end_token_id")
        for name in special:
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name}={getattr(self, name)} is not a token id (vocab_size={self.vocab_size}).")
        if self.vq_config is None:
            return
        codes = self.image_token_range
        if codes.start < 0 or codes.stop > self.vocab_size:
            raise ValueError(
                f"The {self.vq_config.num_embeddings} VQ codes need ids [{codes.start}, {codes.stop}) inside the "
                f"vocabulary (vocab_size={self.vocab_size}): enlarge vocab_size or move image_vocab_offset."
            )
        clashing = [name for name in special + ("pad_token_id", "bos_token_id", "nat_mask_token_id")
                    if getattr(self, name) in codes]
        if clashing:
            raise ValueError(f"Special token(s) {clashing} fall inside the VQ code ids [{codes.start}, {codes.stop}).")


__all__ = ["AgillmAudioConfig", "AgillmConfig", "AgillmVQVAEConfig", "AgillmVisionConfig"]
