"""AGILLM decoder: the trunk every AGILLM head stands on.

Data flow (top to bottom of this file):
    token ids -> embed_tokens -> N x AgillmDecoderLayer(pre-norm attention, pre-norm MLP or MoE) -> norm -> heads

A layer's attention is `AgillmAttention` (MHA/GQA/MQA, optionally reusing an earlier layer's K/V) or
`AgillmMLAttention` (DeepSeek's latent attention), in `attention_agillm.py`; its MLP is dense (`AgillmMLP`,
`layers_agillm.py`, with the norms, RoPE and ALiBi) or an `AgillmSparseMoeBlock` (router + experts, `moe_agillm.py`).
`AgillmForCausalLM` adds the heads (AR, SAT, NAT) and, after the last decoder layer, DeepSeek-V3-style MTP modules;
every objective's loss (and the SAT head) is in `objectives_agillm.py`.

Multimodal configs add towers to the trunk (`vision_tower` ViT, `audio_tower` log-mel conv + encoder, each with a
projector, from `multimodal_agillm.py`; `vqmodel`, the VQ-VAE image tokenizer of `vqvae_agillm.py`):
`AgillmModel.merge_media` puts their features in place of the `<|image|>` / `<|audio|>` placeholders, whose runs
attend to themselves both ways.
`AgillmForConditionalGeneration` reads images and speech and writes text, or VQ image tokens (`generate_images`).

Attention goes through transformers' `ALL_ATTENTION_FUNCTIONS` (eager / sdpa / flex / flash, plus anything
`kernels/` registers), masks come from `masking_utils` (one mask per layer type: full, sliding, chunked), and the
KV cache is a transformers `Cache` whose per-layer kind follows `config.layer_types`. Only sibling files imported
as `from .x import y` travel with a saved model, so this file depends on nothing from this repo but its siblings.
"""

import os
import shutil
import sys

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.generation import (
    GenerationMixin,
    LogitsProcessorList,
    PrefixConstrainedLogitsProcessor,
    SuppressTokensLogitsProcessor,
)
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs


try:  # a saved model folder (remote code): sibling modules of the same package
    from .attention_agillm import (
        MASK_BUILDERS,
        AttentionBackendSupport,
        AgillmAttention,
        AgillmMLAttention,
        SharedKV,
        attention_function_declares,
    )
    from .configuration_agillm import AgillmConfig
    from .diffusion_blocks_agillm import DiffusionBlocksState, diffusion_blocks_training_step, diffusion_euler_generate
    from .generation_agillm import GENERATION_MODES, agillm_generate
    from .model_card_agillm import write_saved_model_card
    from .layers_agillm import AgillmMLP, AgillmRotaryEmbedding, add_bias_to_mask, alibi_bias, alibi_slopes, build_norm
    from .moe_agillm import (
        AgillmExperts,
        AgillmPlainExperts,
        AgillmRouter,
        AgillmSparseMoeBlock,
        DocumentRouting,
        ROUTER_CLASSES,
        router_losses,
    )
    from .multimodal_agillm import (
        AgillmAudioModel,
        AgillmMediaFeaturesOutput,
        AgillmMultimodalProjector,
        AgillmVisionModel,
        media_block_ids,
        stack_frames,
    )
    from .objectives_agillm import (
        OBJECTIVES,
        AgillmCausalLMOutputWithPast,
        AgillmSATHead,
        head_loss,
        multi_objective_forward,
        nat_forward,
        trained_objectives,
        uses_chunked_cross_entropy,
    )
    from .vqvae_agillm import AgillmVQVAE
except ImportError:  # this repository, imported as top-level modules
    from attention_agillm import (
        MASK_BUILDERS,
        AttentionBackendSupport,
        AgillmAttention,
        AgillmMLAttention,
        SharedKV,
        attention_function_declares,
    )
    from configuration_agillm import AgillmConfig
    from diffusion_blocks_agillm import DiffusionBlocksState, diffusion_blocks_training_step, diffusion_euler_generate
    from generation_agillm import GENERATION_MODES, agillm_generate
    from model_card_agillm import write_saved_model_card
    from layers_agillm import AgillmMLP, AgillmRotaryEmbedding, add_bias_to_mask, alibi_bias, alibi_slopes, build_norm
    from moe_agillm import (
        AgillmExperts,
        AgillmPlainExperts,
        AgillmRouter,
        AgillmSparseMoeBlock,
        DocumentRouting,
        ROUTER_CLASSES,
        router_losses,
    )
    from multimodal_agillm import (
        AgillmAudioModel,
        AgillmMediaFeaturesOutput,
        AgillmMultimodalProjector,
        AgillmVisionModel,
        media_block_ids,
        stack_frames,
    )
    from objectives_agillm import (
        OBJECTIVES,
        AgillmCausalLMOutputWithPast,
        AgillmSATHead,
        head_loss,
        multi_objective_forward,
        nat_forward,
        trained_objectives,
        uses_chunked_cross_entropy,
    )
    from vqvae_agillm import AgillmVQVAE


logger = logging.get_logger(__name__)

# --------------------------------------------------------------------------------------------------- layers


class AgillmDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))` (dense MLP or MoE, per `mlp_layer_types`)."""

    def __init__(self, config: AgillmConfig, layer_idx: int):
        super().__init__()
        self.attention_type = config.layer_type_at(layer_idx)
        attention_class = AgillmMLAttention if config.is_mla else AgillmAttention
        self.self_attn = attention_class(config=config, layer_idx=layer_idx)
        self.is_sparse = config.mlp_layer_type_at(layer_idx) == "sparse"
        self.mlp = AgillmSparseMoeBlock(config, layer_idx) if self.is_sparse else AgillmMLP(config)
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)  # AGILLM 4.x: on the attention output only
        self.input_layernorm = build_norm(config, config.hidden_size)
        self.post_attention_layernorm = build_norm(config, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        document_routing: DocumentRouting | None = None,
        shared_kv_states: SharedKV | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            shared_kv_states=shared_kv_states,
            **kwargs,
        )
        hidden_states = residual + self.hidden_dropout(hidden_states)
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states, document_routing) if self.is_sparse else self.mlp(hidden_states)
        return residual + hidden_states


class AgillmMTPLayer(AgillmDecoderLayer):
    """A DeepSeek-V3 multi-token-prediction module: a decoder block fed `eh_proj([enorm(emb(t+k+1)) ; hnorm(h_t)])`.

    It sits in `model.layers` after the last decoder layer, so checkpoints have DeepSeek-V3's layout
    (`model.layers.{num_hidden_layers + k}.{enorm,hnorm,eh_proj,shared_head.norm,self_attn,mlp,...}`), which
    transformers' `MtpModel` loads for `generate(use_mtp=True)`. `MtpModel` builds its blocks as
    `type(model.layers[-1])(mtp_config, k)` and adds its own enorm/hnorm/eh_proj/post_norm, so with an MTP config's
    index (below `num_hidden_layers`) this class is a plain decoder block.
    """

    def __init__(self, config: AgillmConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.is_mtp_module = layer_idx >= config.num_hidden_layers
        if self.is_mtp_module:
            self.enorm = build_norm(config, config.hidden_size)
            self.hnorm = build_norm(config, config.hidden_size)
            self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
            self.shared_head = nn.Module()  # DeepSeek-V3 keeps the output norm under `shared_head`
            self.shared_head.norm = build_norm(config, config.hidden_size)

    def predict(self, inputs_embeds: torch.Tensor, previous_hidden: torch.Tensor, **block_kwargs) -> torch.Tensor:
        """This depth's normed hidden state (fed to `lm_head` and to the next depth), as transformers' `MtpLayer`."""
        hidden_states = self.eh_proj(torch.cat([self.enorm(inputs_embeds), self.hnorm(previous_hidden)], dim=-1))
        return self.shared_head.norm(self(hidden_states, **block_kwargs))


# --------------------------------------------------------------------------------------------------- models


@auto_docstring
class AgillmPreTrainedModel(AttentionBackendSupport, PreTrainedModel):
    config: AgillmConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["AgillmDecoderLayer", "AgillmMTPLayer", "AgillmEncoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": AgillmDecoderLayer,
        "attentions": [OutputRecorder(AgillmAttention, index=1), OutputRecorder(AgillmMLAttention, index=1)],
        "router_logits": OutputRecorder(AgillmRouter, index=0),
        "router_indices": OutputRecorder(AgillmRouter, index=2),  # the chosen experts, for the balancing losses
    }

    # transformers allows `set_experts_implementation` only where it finds `@use_experts_implementation` in the model
    # class's own file; AGILLM's experts are in moe_agillm.py (the attention twin: `AttentionBackendSupport`).
    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True

    def save_pretrained(self, save_directory, is_main_process: bool = True, **kwargs):
        """transformers' `save_pretrained`, plus a model card (`model_card_agillm.py`) when the folder has none.

        With `push_to_hub=True` transformers uploads during the save, before the card exists (as `push_to_hub`, it
        then publishes the Hub's card or its generic one); `upload_folder` on the saved folder publishes this card.
        """
        result = self._save_with_agillm_code(save_directory, is_main_process, **kwargs)
        if self.should_save_on_this_rank(is_main_process):
            write_saved_model_card(self, save_directory)
        return result

    def _save_with_agillm_code(self, save_directory, is_main_process: bool, **kwargs):
        """transformers' save, shipping AGILLM's code and `auto_map` even when an engine re-classed us.

        FSDP2's `fully_shard` swaps the instance's class for a subclass it builds at run time (`FSDPAgillmForCausalLM`,
        module `torch.distributed.fsdp._fully_shard._fsdp_init`). transformers' `custom_object_save` exports the
        instance's class, so it would copy torch's `_fsdp_*.py` files and name the wrapper in `auto_map`, and the
        folder would not reload. The code is exported for the class registered for the auto class instead, the first
        one in the MRO, so a folder saved from any engine reloads with `trust_remote_code=True`.
        """
        instance_class = type(self)
        code_class = next((cls for cls in instance_class.__mro__ if vars(cls).get("_auto_class")), None)
        if code_class is None or code_class is instance_class:
            return super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        # What `custom_object_save` does, for `code_class`: its `auto_map` entry, its file and its relative imports.
        # The files go in first, so that a `push_to_hub` from the save below uploads them.
        module_file = sys.modules[code_class.__module__].__file__
        module_name = code_class.__module__.rsplit(".", 1)[-1]
        self.config.auto_map = dict(self.config.auto_map or {})
        self.config.auto_map[code_class._auto_class] = f"{module_name}.{code_class.__name__}"
        if self.should_save_on_this_rank(is_main_process):
            os.makedirs(save_directory, exist_ok=True)
            for source in (module_file, *get_relative_import_files(module_file)):
                shutil.copyfile(source, os.path.join(save_directory, os.path.basename(source)))
        instance_class._auto_class = None  # stops transformers' own export of the run-time class, for this save only
        try:
            return super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        finally:
            del instance_class._auto_class

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, AgillmRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.e_score_correction_bias is not None:
                init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, (AgillmExperts, AgillmPlainExperts)):
            for name, parameter in module.named_parameters(recurse=False):
                if name.endswith("_bias"):
                    init.zeros_(parameter)
                else:
                    init.normal_(parameter, mean=0.0, std=std)

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys=None):
        """transformers' loading, after checking that every safetensors weight file is whole (`check_weight_files`)."""
        if state_dict is None:
            check_weight_files(checkpoint_files)
        return PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys)


def check_weight_files(checkpoint_files) -> None:
    """Raise `OSError` naming the first safetensors file (or shard) that is empty, truncated or corrupt.

    transformers 5.23 reports such a file as a bare `SafetensorError` ("incomplete metadata, file not fully
    covered") that does not say which of the folder's shards is broken. Opening a file reads only its header, which
    safetensors checks against the file's size, so this costs one small read per shard.
    """
    for path in checkpoint_files or ():
        if not str(path).endswith(".safetensors"):
            continue
        with open(path, "rb") as file:  # an unreadable file fails here, with its name and "Permission denied"
            if os.fstat(file.fileno()).st_size == 0:
                raise OSError(f"Cannot load the weights file {path}: it is empty (0 bytes).")
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError as error:
            raise OSError(
                f"Cannot load the weights file {path}: not a valid safetensors file, truncated or corrupt "
                f"({' '.join(str(error).split())})."
            ) from error


def parameter_count_lower_bound(config: AgillmConfig) -> int:
    """Parameters the decoder needs at least: embeddings, untied head projections, attention and MLP weights.

    Norms, biases, routers and media towers are left out; they never decide whether a model fits in memory.
    """
    hidden, vocab = config.hidden_size, config.vocab_size
    head_projections = 0 if config.tie_word_embeddings else len(config.heads)
    attention = 2 * hidden * config.num_attention_heads * config.head_dim  # q and o (MLA compresses k/v)
    if not config.is_mla:
        attention += 2 * hidden * config.num_key_value_heads * config.head_dim
    matrices_per_mlp = 3 if config.mlp_type == "gated" else 2
    mlp = {
        "dense": matrices_per_mlp * hidden * config.intermediate_size,
        "sparse": matrices_per_mlp * hidden * config.moe_intermediate_size * config.num_experts,
    }
    layers = sum(attention + mlp[kind] for kind in config.mlp_layer_types)
    return vocab * hidden * (1 + head_projections) + layers


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory of `device` (CPU: the kernel's MemAvailable, capped by a cgroup limit), or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as limit, open("/sys/fs/cgroup/memory.current") as used:
            available = min(available, int(limit.read()) - int(used.read()))
    except (OSError, ValueError):  # no cgroup v2 limit ("max") or not Linux
        pass
    return available


def check_fits_in_memory(config: AgillmConfig) -> None:
    """Refuse a model whose weights cannot fit before allocating them (rather than swapping or dying for minutes).

    Skipped on the meta device, where `from_pretrained` and `init_empty_weights` build models without memory.
    """
    device = torch.empty(0).device  # where new parameters go: the default device or a `with torch.device(...)`
    if device.type == "meta":
        return
    element_size = torch.empty((), dtype=torch.get_default_dtype()).element_size()
    needed = parameter_count_lower_bound(config) * element_size
    available = available_memory_bytes(device)
    if available is not None and needed > available:
        raise MemoryError(
            f"This config needs at least {needed / 2**30:,.1f} GiB for its parameters "
            f"({parameter_count_lower_bound(config):,} x {element_size} bytes, {torch.get_default_dtype()}) but only "
            f"{available / 2**30:,.1f} GiB of {device.type} memory are available. Use a smaller config, a lower "
            "precision (dtype=torch.bfloat16), or from_pretrained(..., device_map='auto') to offload."
        )


def mtp_checkpoint_patterns(config: AgillmConfig, prefix: str) -> list[str]:
    """Checkpoint keys of the MTP modules (`layers.{num_hidden_layers + k}.`), for `_keys_to_ignore_on_load_unexpected`."""
    return [rf"{prefix}layers\.{config.num_hidden_layers + k}\." for k in range(config.num_mtp_layers)]


@auto_docstring
class AgillmModel(AgillmPreTrainedModel):
    """The AGILLM trunk: embeddings, decoder layers and final norm; returns hidden states and the KV cache."""

    def __init__(self, config: AgillmConfig):
        super().__init__(config)
        check_fits_in_memory(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [AgillmDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        if "sparse" in config.mlp_layer_types and ROUTER_CLASSES[config.router_type].has_balancing_bias(
            config
        ):  # DeepSeek-V3's balancing bias decides expert choices by small margins: fp32 in any dtype, as transformers
            self._keep_in_fp32_modules_strict = ["e_score_correction_bias"]
        if config.num_mtp_layers:  # only AgillmForCausalLM builds (and trains) the MTP modules; elsewhere they are unused
            self._keys_to_ignore_on_load_unexpected = mtp_checkpoint_patterns(config, prefix="")
        self.norm = build_norm(config, config.hidden_size)
        self.rotary_emb = AgillmRotaryEmbedding(config=config)
        self._build_media_encoders(config)
        self.gradient_checkpointing = False
        self.post_init()

    def _build_media_encoders(self, config: AgillmConfig) -> None:
        """The towers the config asks for (LLaVA / Chameleon names): each turns its input into decoder-width features."""
        if config.vision_config is not None:
            self.vision_tower = AgillmVisionModel(config.vision_config)
            self.multi_modal_projector = AgillmMultimodalProjector(
                config.vision_config.hidden_size, config.hidden_size, config.vision_config.hidden_act
            )
        if config.audio_config is not None:
            audio = config.audio_config
            self.audio_tower = AgillmAudioModel(audio)
            self.audio_projector = AgillmMultimodalProjector(
                audio.frames_per_token * audio.hidden_size, config.hidden_size, audio.hidden_act
            )
        if config.vq_config is not None:
            self.vqmodel = AgillmVQVAE(config.vq_config)

    # ------------------------------------------------------------------------------------------ multimodal input

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> AgillmMediaFeaturesOutput:
        """Images [images, 3, H, W] -> the vision tower's output, with `pooler_output` the decoder-width features
        [images, num_image_tokens, hidden_size], one per `<|image|>` placeholder."""
        if not hasattr(self, "vision_tower"):
            raise ValueError("This model has no image encoder (config.vision_config is None); it cannot take pixel_values.")
        outputs = self.vision_tower(pixel_values, return_dict=True, **kwargs)
        outputs.pooler_output = self.multi_modal_projector(outputs.last_hidden_state)
        return outputs

    @can_return_tuple
    def get_audio_features(
        self, input_features: torch.Tensor, feature_attention_mask=None, **kwargs: Unpack[TransformersKwargs]
    ) -> AgillmMediaFeaturesOutput:
        """Log-mel clips -> the audio tower's output, with `pooler_output` the decoder-width features [clips, tokens,
        hidden_size] (`frames_per_token` frames stacked per token) and `feature_mask` marking the real tokens."""
        if not hasattr(self, "audio_tower"):
            raise ValueError("This model has no audio encoder (config.audio_config is None); it cannot take "
                             "input_features.")
        # Shapes alone tell whether the longest clip fits the context: refuse before the tower spends time on it.
        num_tokens = self.config.audio_config.num_audio_tokens(input_features.shape[-1])
        if num_tokens > self.config.max_position_embeddings:
            raise ValueError(
                f"An audio clip of {input_features.shape[-1]} log-mel frames becomes {num_tokens} <|audio|> tokens, "
                f"more than the model's context (max_position_embeddings={self.config.max_position_embeddings}); "
                "split the audio into shorter clips."
            )
        outputs = self.audio_tower(input_features, feature_attention_mask, return_dict=True, **kwargs)
        stacked, valid = stack_frames(outputs.last_hidden_state, outputs.feature_mask,
                                      self.config.audio_config.frames_per_token)
        outputs.pooler_output, outputs.feature_mask = self.audio_projector(stacked), valid
        return outputs

    def _placeholder_token_ids(self) -> dict[str, int]:
        """The placeholder id of each tower this model has, e.g. `{"image": 6, "audio": 9}`."""
        towers = {"image": (self.config.vision_config, self.config.image_token_id),
                  "audio": (self.config.audio_config, self.config.audio_token_id)}
        return {name: token_id for name, (tower, token_id) in towers.items() if tower is not None}

    def _placeholder_mask(self, input_ids, token_id: int, features: torch.Tensor | None, name: str) -> torch.Tensor:
        """Where `features` go; refuses a count mismatch (which would shift every feature) with both numbers.

        Skipped while compiling, like `check_token_ids` (the count is a tensor value)."""
        mask = input_ids == token_id
        if torch.compiler.is_compiling():
            return mask
        num_placeholders, num_features = int(mask.sum()), 0 if features is None else features.shape[0]
        if num_placeholders != num_features:
            raise ValueError(
                f"input_ids hold {num_placeholders} {name} placeholder tokens (id {token_id}) but the {name} input gives "
                f"{num_features} features. Build inputs with AgillmProcessor, which expands each placeholder to the "
                "model's feature count."
            )
        return mask

    def merge_media(self, input_ids, inputs_embeds, pixel_values=None, input_features=None, feature_attention_mask=None):
        """Replace the `<|image|>` / `<|audio|>` placeholder embeddings by the encoders' features (LLaVA's merge)."""
        features = {}  # per modality: [placeholders, hidden_size], in order over the batch
        if pixel_values is not None:  # (raises if the model has no vision tower)
            features["image"] = self.get_image_features(pixel_values).pooler_output.flatten(0, 1)
        if input_features is not None:
            outputs = self.get_audio_features(input_features, feature_attention_mask)
            features["audio"] = outputs.pooler_output[outputs.feature_mask]  # the real tokens, clip after clip
        for name, token_id in self._placeholder_token_ids().items():
            mask = self._placeholder_mask(input_ids, token_id, features.get(name), name)
            if name in features:
                inputs_embeds = inputs_embeds.masked_scatter(mask[..., None], features[name].to(inputs_embeds.dtype))
        return inputs_embeds

    def _media_block_ids(self, input_ids, past_key_values) -> torch.Tensor | None:
        """`block_sequence_ids` making each image's (each clip's) placeholders attend both ways, if any are here."""
        media_ids = tuple(self._placeholder_token_ids().values())
        if not (self.config.media_bidirectional_attention and media_ids) or input_ids is None:
            return None
        if torch.compiler.is_compiling() or not torch.isin(input_ids, torch.tensor(media_ids, device=input_ids.device)).any():
            return None  # decoding steps: text only, plain causal masks
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        return media_block_ids(input_ids, media_ids, past_length)

    def check_token_ids(self, input_ids: torch.Tensor | None) -> None:
        """Out-of-range ids would be an index error on CPU and a device assert on GPU: say what is wrong instead.

        Skipped while compiling (both checks read tensor values, which would break a full-graph capture).
        """
        if input_ids is None or input_ids.numel() == 0 or torch.compiler.is_compiling():
            return
        low, high = torch.aminmax(input_ids)
        if ((low < 0) | (high >= self.config.vocab_size)).item():  # one host sync, not two
            raise ValueError(
                f"input_ids must lie in [0, {self.config.vocab_size}) (vocab_size), got values in "
                f"[{int(low)}, {int(high)}]. Is the tokenizer the one this model was trained with?"
            )

    def check_last_position(self, last_position: int | torch.Tensor) -> None:
        """Positions past the trained context silently degrade RoPE models; refuse them (dynamic RoPE extrapolates)."""
        extrapolates = self.config.rope_type == "dynamic" or not self.config.uses_rope  # ALiBi/NoPE: no table to run off
        if extrapolates or torch.compiler.is_compiling():
            return
        last_position = int(last_position)
        if last_position >= self.config.max_position_embeddings:
            raise ValueError(
                f"Input reaches position {last_position}, beyond max_position_embeddings="
                f"{self.config.max_position_embeddings}. Shorten the input (prompt + new tokens), or use a "
                "config with a longer context (e.g. rope_type='dynamic', 'yarn' or 'llama3')."
            )


    def _check_input_shapes(self, input_ids, inputs_embeds, attention_mask, position_ids, past_key_values) -> None:
        """Refuse input the mask builders would silently broadcast, slice or pad into a different answer.

        An empty batch or sequence has nothing to predict; a 2-D `attention_mask` covers the cached tokens and the
        new ones (`[batch, past + new]`, as `generate` builds it); `position_ids` are `[batch or 1, new]`;
        `inputs_embeds` given by the caller must be finite (a NaN would spread to every later position).
        """
        batch, seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if batch == 0 or seq_len == 0:
            shape = tuple((input_ids if input_ids is not None else inputs_embeds).shape)
            raise ValueError(f"Empty input: {'input_ids' if input_ids is not None else 'inputs_embeds'} has shape "
                             f"{shape}; give at least one sequence of at least one token.")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            if tuple(attention_mask.shape) != (batch, past + seq_len):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch}, {past + seq_len}): "
                    f"one row per sequence and one column per token ({past} cached + {seq_len} new)."
                )
        if position_ids is not None and (position_ids.ndim != 2 or position_ids.shape[0] not in (1, batch)
                                         or position_ids.shape[1] != seq_len):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected ({batch}, {seq_len}) or "
                             f"(1, {seq_len}), one position per new token.")
        if input_ids is None and not torch.compiler.is_compiling() and not torch.isfinite(inputs_embeds).all():
            raise ValueError("inputs_embeds contains NaN or infinite values.")

    def _key_positions(self, attention_mask, past_key_values, position_ids, batch_size: int, kv_length: int):
        """Absolute position of every key index `[batch, kv_length]` (left padding shifts them, as `position_ids`)."""
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        elif past_length == 0:
            positions = position_ids
        else:  # cached keys sit at 0 .. past - 1; new ones where `position_ids` put them (a draft layout repeats some)
            cached = torch.arange(past_length, device=position_ids.device)[None].expand(position_ids.shape[0], -1)
            positions = torch.cat([cached, position_ids], dim=-1)
        positions = positions.expand(batch_size, -1)
        if positions.shape[-1] < kv_length:  # a static cache has room for more keys than were seen yet
            extra = torch.arange(1, kv_length - positions.shape[-1] + 1, device=positions.device)
            positions = torch.cat([positions, positions[:, -1:] + extra], dim=-1)
        return positions[:, :kv_length]

    def attention_masks(
        self, objective, inputs_embeds, attention_mask, past_key_values, position_ids, block_sequence_ids=None,
        fold_alibi: bool = True,
    ) -> dict:
        """The mask of every layer type for `objective`, with ALiBi folded in: what the decoder layers receive.

        `block_sequence_ids` (AR only) lets each image's / clip's placeholder tokens see each other both ways.
        `generate` with a compileable cache passes the masks pre-built (a dict), which are used as they are.
        `fold_alibi=False` (what `forward` passes when the attention function `computes_alibi`) leaves ALiBi out:
        `alibi_kwargs` hands it to the kernel instead. Other callers get the bias folded in, which every backend
        that takes ALiBi accepts.
        """
        masks = attention_mask
        if not isinstance(masks, dict):
            masks = self._objective_masks(
                objective, inputs_embeds, attention_mask, past_key_values, position_ids, block_sequence_ids
            )
        if self._needs_alibi(objective) and fold_alibi:
            bias = self._alibi_bias(inputs_embeds, attention_mask, past_key_values, position_ids, masks)
            masks = {kind: add_bias_to_mask(mask, bias) for kind, mask in masks.items()}
        return masks

    def _objective_masks(
        self, objective, inputs_embeds, attention_mask, past_key_values, position_ids, block_sequence_ids=None
    ) -> dict:
        """One mask per layer type for the objective's attention pattern, built by `masking_utils`."""
        config = self.config
        attention = OBJECTIVES[objective].attention(config)
        mask_kwargs = {
            "config": config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
        }
        if attention == "causal":
            layer_types = set(config.layer_types)
        else:
            layer_types = {"full_attention"}  # the config allows SAT/NAT heads only on full-attention models
        if attention == "bidirectional":  # AGILLM 4.x NAT: every token sees every token
            no_skip = {"allow_is_bidirectional_skip": False} if config.uses_alibi and attention_mask is not None else {}
            return {"full_attention": create_bidirectional_mask(**mask_kwargs, **no_skip)}
        mask_kwargs["position_ids"] = position_ids
        if config.uses_alibi:  # the bias is added to the mask, so it must exist even where sdpa could skip it
            mask_kwargs["allow_is_causal_skip"] = False
        if block_sequence_ids is not None:  # AR with images/audio: their placeholder runs are bidirectional blocks
            mask_kwargs["block_sequence_ids"] = block_sequence_ids
        if attention == "block_causal":  # SAT, block NAT: tokens of one block see each other, earlier blocks causally
            block_size = OBJECTIVES[objective].block_size(config)
            kv_length = self._kv_length(inputs_embeds, attention_mask, past_key_values)
            batch_size = inputs_embeds.shape[0]
            key_positions = self._key_positions(attention_mask, past_key_values, position_ids, batch_size, kv_length)
            mask_kwargs["block_sequence_ids"] = key_positions // block_size
        return {kind: MASK_BUILDERS[kind](**mask_kwargs) for kind in layer_types}

    @staticmethod
    def _kv_length(inputs_embeds, attention_mask, past_key_values) -> int:
        if past_key_values is not None:
            return past_key_values.get_mask_sizes(inputs_embeds.shape[1], 0)[0]
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
            return attention_mask.shape[-1]
        return inputs_embeds.shape[1]

    def _needs_alibi(self, objective: str) -> bool:
        """Whether `objective` attends with an ALiBi bias (AGILLM 4.x's clamped ALiBi is exactly zero on every key a
        causal query sees, so causal attention skips it)."""
        config = self.config
        causal = OBJECTIVES[objective].attention(config) == "causal"
        return config.uses_alibi and not (config.position_embedding_type == "agillm_alibi" and causal)

    @property
    def _kernel_computes_alibi(self) -> bool:
        return self.config.uses_alibi and attention_function_declares(self.config, "computes_alibi")

    def _alibi_positions(self, inputs_embeds, attention_mask, past_key_values, position_ids, masks):
        """Absolute query positions `[batch, q]` and key positions `[batch, kv]` the ALiBi distances are taken from."""
        kv_length = next((m.shape[-1] for m in masks.values() if m is not None), None)
        kv_length = kv_length or self._kv_length(inputs_embeds, attention_mask, past_key_values)
        batch_size = inputs_embeds.shape[0]
        key_positions = self._key_positions(attention_mask, past_key_values, position_ids, batch_size, kv_length)
        return position_ids.expand(batch_size, -1), key_positions

    def _alibi_bias(self, inputs_embeds, attention_mask, past_key_values, position_ids, masks) -> torch.Tensor:
        if self.config._attn_implementation not in ("eager", "sdpa") and not self._kernel_computes_alibi:
            raise ValueError(
                f"position_embedding_type={self.config.position_embedding_type!r} adds ALiBi to the attention mask, "
                f"which needs attn_implementation 'eager' or 'sdpa' (or a kernel that computes ALiBi itself, e.g. "
                f"'agillm' from `kernels`), not {self.config._attn_implementation!r}."
            )
        positions = self._alibi_positions(inputs_embeds, attention_mask, past_key_values, position_ids, masks)
        slopes = alibi_slopes(self.config.num_attention_heads)  # H floats: cheaper to rebuild than to keep in sync
        bias = alibi_bias(slopes, *positions, self.config.position_embedding_type)
        return bias.to(inputs_embeds.dtype)

    def alibi_kwargs(self, objective, inputs_embeds, attention_mask, past_key_values, position_ids, masks) -> dict:
        """ALiBi as an attention function that `computes_alibi` reads it: slopes, kind and absolute positions.

        Built once per forward; the kernel adds `-m_h |j - i|` (`alibi`) or `-m_h max(j - i, 0)` (`agillm_alibi`)
        itself, exactly the bias `alibi_bias` would have folded into the mask.
        """
        if not (self._kernel_computes_alibi and self._needs_alibi(objective)):
            return {}
        query_positions, key_positions = self._alibi_positions(
            inputs_embeds, attention_mask, past_key_values, position_ids, masks
        )
        return {
            "alibi_slopes": alibi_slopes(self.config.num_attention_heads).to(inputs_embeds.device),
            "alibi_query_positions": query_positions,
            "alibi_key_positions": key_positions,
            "alibi_kind": self.config.position_embedding_type,
        }

    @merge_with_config_defaults
    @capture_outputs
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        objective: str = "ar",
        pixel_values: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        r"""
        objective (`str`, *optional*, defaults to `"ar"`):
            Which attention pattern the trunk runs with: `"ar"` (causal), `"sat"` (block-causal over blocks of
            `config.sat_block_size`) or `"nat"` (bidirectional, or block-causal over `config.nat_block_size`).
            `None` means `"ar"`, as in `AgillmForCausalLM.forward`.
        pixel_values (`torch.FloatTensor` of shape `(num_images, 3, image_size, image_size)`, *optional*):
            Images, in order of their `<|image|>` placeholders over the batch (from `AgillmProcessor`).
        input_features (`torch.FloatTensor` of shape `(num_clips, num_mel_bins, num_frames)`, *optional*):
            Log-mel speech clips, in order of their `<|audio|>` placeholders over the batch.
        feature_attention_mask (`torch.Tensor` of shape `(num_clips, num_frames)`, *optional*):
            1 for real frames, 0 for padding frames of `input_features`.
        """
        # None reads as the head's default: transformers' pipeline parallelism binds the head's forward signature,
        # defaults included, and hands those arguments to the trunk on the stages that do not run the head.
        objective = "ar" if objective is None else objective
        has_media = pixel_values is not None or input_features is not None
        self._check_inputs(objective, input_ids, inputs_embeds, attention_mask, position_ids, past_key_values, has_media)
        if inputs_embeds is None:
            inputs_embeds = self._embed(input_ids, pixel_values, input_features, feature_attention_mask)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            position_ids = self._next_positions(inputs_embeds, past_key_values)
        elif position_ids.numel() > 0:
            self.check_last_position(position_ids.max())

        causal = OBJECTIVES[objective].attention(self.config) == "causal"
        block_sequence_ids = self._media_block_ids(input_ids, past_key_values) if causal else None
        mask_per_layer_type = self.attention_masks(
            objective, inputs_embeds, attention_mask, past_key_values, position_ids, block_sequence_ids,
            fold_alibi=not self._kernel_computes_alibi,
        )
        kwargs.update(self.alibi_kwargs(  # {} unless the attention function computes ALiBi itself
            objective, inputs_embeds, attention_mask, past_key_values, position_ids, mask_per_layer_type
        ))

        if not causal:
            self._check_block_attention(objective)
            kwargs["is_causal"] = False  # sdpa would read a skipped (None) bidirectional mask as causal

        document_routing = None
        if self.config.num_experts and self.config.router_scope == "document":
            document_routing = DocumentRouting.build(
                self.config, attention_mask, position_ids, past_key_values, *inputs_embeds.shape[:2]
            )
        shared_kv_states = SharedKV() if self.config.shares_kv else None

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        # The layer's attention type comes from the config, not the module: pipeline parallelism replaces the layers
        # another stage owns with `PipelineIdentityLayer`s, which have no attributes of ours.
        for layer_idx, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=mask_per_layer_type[self.config.layer_types[layer_idx]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                document_routing=document_routing,
                shared_kv_states=shared_kv_states,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)

    def _check_inputs(self, objective, input_ids, inputs_embeds, attention_mask, position_ids, past_key_values,
                      has_media: bool) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)} or None, got {objective!r}.")
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        self._check_input_shapes(input_ids, inputs_embeds, attention_mask, position_ids, past_key_values)
        if has_media and (input_ids is None or objective != "ar"):
            raise ValueError("pixel_values / input_features need input_ids (their placeholders mark where the features "
                             "go) and the 'ar' objective.")

    def _embed(self, input_ids, pixel_values, input_features, feature_attention_mask) -> torch.Tensor:
        """Token embeddings, with the media features in place of their placeholders on multimodal configs."""
        self.check_token_ids(input_ids)
        inputs_embeds = self.embed_tokens(input_ids)
        if self.config.is_multimodal:
            inputs_embeds = self.merge_media(input_ids, inputs_embeds, pixel_values, input_features, feature_attention_mask)
        return inputs_embeds

    def _next_positions(self, inputs_embeds: torch.Tensor, past_key_values: Cache | None) -> torch.Tensor:
        """`[1, seq]` positions following the cached ones, checked against `max_position_embeddings`."""
        past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
        position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
        self.check_last_position(past_seen_tokens + inputs_embeds.shape[1] - 1)  # known on the host: no sync
        return position_ids.unsqueeze(0)

    def _check_block_attention(self, objective: str) -> None:
        """SAT / NAT masks need an attention function that takes any boolean mask."""
        if self.config._attn_implementation not in ("eager", "sdpa", "flex_attention") and not (
            attention_function_declares(self.config, "supports_block_masks")
        ):
            raise ValueError(
                f"objective={objective!r} attends in blocks / both ways, which needs attn_implementation 'eager', "
                f"'sdpa' or 'flex_attention', not {self.config._attn_implementation!r}."
            )


@auto_docstring
class AgillmForCausalLM(AgillmPreTrainedModel, GenerationMixin):
    """The trunk with its heads: AR (`lm_head`, next token) and, per `config.heads`, SAT and NAT.

    `forward(objective=...)` picks the head and its attention pattern; with `labels` and no objective it returns the
    weighted sum of every head's loss, which is what `Trainer` optimises. `generate`, `pipeline("text-generation")`
    and PEFT see a standard causal LM; `generate(generation_mode=...)` reaches the SAT/NAT/staged decoders.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}
    # A checkpoint trained without DiffusionBlocks has no group statistics; switching the mode on starts them fresh.
    _keys_to_ignore_on_load_missing = [r"diffusion_blocks_state\._extra_state"]

    def __init__(self, config: AgillmConfig):
        super().__init__(config)
        self.model = AgillmModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.head_bias)
        head_projections = ["lm_head"]
        if "sat" in config.heads:
            self.sat_head = AgillmSATHead(config)
            head_projections.append("sat_head.proj")
        if "nat" in config.heads:
            self.nat_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.head_bias)
            head_projections.append("nat_head")
        # Per instance: tying and the parallel plans may only name heads this model has.
        self._tied_weights_keys = {f"{name}.weight": "model.embed_tokens.weight" for name in head_projections}
        self._tp_plan = {name: "colwise_gather_output" for name in head_projections}
        if config.diffusion_blocks is not None:  # group-choice statistics, saved with the weights (resumes keep them)
            self.diffusion_blocks_state = DiffusionBlocksState(config)
        if config.num_mtp_layers:
            # DeepSeek-V3 layout: the MTP modules follow the decoder layers in `model.layers` (the trunk's forward
            # runs only the first `num_hidden_layers`). transformers' MtpModel finds their weights in a checkpoint
            # through these patterns.
            first = config.num_hidden_layers
            self.model.layers.extend(AgillmMTPLayer(config, first + k) for k in range(config.num_mtp_layers))
            self._keys_to_ignore_on_load_unexpected = mtp_checkpoint_patterns(config, prefix="model\\.")
        self.post_init()

    def _resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of=None, mean_resizing=True):
        """transformers resizes the embedding and `lm_head`; the SAT and NAT projections follow the same vocabulary."""
        embeddings = super()._resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        vocab_size = embeddings.weight.shape[0]
        if "sat" in self.config.heads:
            self.sat_head.proj = self._get_resized_lm_head(self.sat_head.proj, vocab_size, mean_resizing=mean_resizing)
        if "nat" in self.config.heads:
            self.nat_head = self._get_resized_lm_head(self.nat_head, vocab_size, mean_resizing=mean_resizing)
        return embeddings

    @property
    def accepts_loss_kwargs(self) -> bool:
        """`Trainer` passes `num_items_in_batch` only where the loss honours it: the plain AR loss."""
        plain_ar = trained_objectives(self.config) == ["ar"] and not self.config.label_smoothing_for("ar")
        extra_losses = self.config.num_mtp_layers or (self.config.num_experts and self.config.output_router_logits)
        # DiffusionBlocks, MTP and router losses are per-batch means
        return plain_ar and self.config.diffusion_blocks is None and not extra_losses

    def _head(self, objective: str) -> nn.Module:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)} or None, got {objective!r}.")
        if objective not in self.config.heads:
            raise ValueError(f"This model has no {objective!r} head (config.heads={self.config.heads}).")
        return getattr(self, OBJECTIVES[objective].head)

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        objective: str | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> AgillmCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Target ids, aligned with `input_ids` (each objective shifts them itself); `-100` positions are ignored.
            AR predicts `labels[t + 1]` at t, SAT `labels[t + sat_block_size]`, NAT re-predicts the tokens it hides
            (the model draws the NAT mask itself, so `Trainer` needs no special collator).
        objective (`str`, *optional*):
            `"ar"`, `"sat"` or `"nat"`: run that head with its attention pattern. `None` means `"ar"` without
            labels, and the multi-objective loss (`config.objective_weights`) with labels.

        Example:

        ```python
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> model = AutoModelForCausalLM.from_pretrained("path/to/agillm", trust_remote_code=True)
        >>> tokenizer = AutoTokenizer.from_pretrained("path/to/agillm", trust_remote_code=True)
        >>> ids = tokenizer("To be, or not to be", return_tensors="pt")
        >>> tokenizer.decode(model.generate(**ids, max_new_tokens=20)[0])
        ```"""
        labels = self._aligned_labels(labels, input_ids if input_ids is not None else inputs_embeds, kwargs)
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "inputs_embeds": inputs_embeds,
        }
        if labels is not None and objective is None:  # training: every objective the config weights
            if self.training and self.config.diffusion_blocks is not None:
                return diffusion_blocks_training_step(self, inputs, labels, **kwargs)  # one layer group per step
            if trained_objectives(self.config) != ["ar"]:
                return multi_objective_forward(self, inputs, labels, **kwargs)
        objective = objective or "ar"
        head = self._head(objective)
        if labels is not None and objective == "nat":  # NAT hides tokens itself and runs its own pass
            return nat_forward(self, inputs, labels, **kwargs)

        wants_aux_loss, updates_router_bias = self._request_router_outputs(kwargs)
        outputs: BaseModelOutputWithPast = self.model(
            **inputs, past_key_values=past_key_values, use_cache=use_cache, objective=objective, **kwargs
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits, gate_logits = self._head_logits(objective, head, hidden_states, computes_loss=labels is not None)

        loss, objective_losses = None, {}
        if labels is not None:
            loss, objective_losses = head_loss(
                self, objective, inputs, labels, logits, gate_logits, hidden_states, outputs.last_hidden_state, **kwargs
            )
        if updates_router_bias:
            self._update_router_biases(outputs.router_indices, attention_mask)
        aux_loss = self._router_aux_loss(outputs, attention_mask) if wants_aux_loss else None
        if aux_loss is not None and loss is not None:
            loss = loss + aux_loss
        return AgillmCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            objective_losses=objective_losses or None,
            gate_logits=gate_logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.get("router_logits"),
            aux_loss=aux_loss,
        )

    @staticmethod
    def _aligned_labels(labels, tokens, kwargs: dict):
        """`labels` aligned with the input tokens, checked; rebuilt from `shift_labels` under sequence parallelism."""
        if labels is not None and kwargs.get("shift_labels") is not None:
            # Sequence-parallel training hands over next-token targets already aligned (`shift_labels[t]` is the
            # token at t + 1); every objective then reads its targets from them, never from the unsharded `labels`.
            labels = F.pad(kwargs["shift_labels"][:, :-1], (1, 0), value=-100)
        if labels is not None and tokens is not None and tuple(labels.shape) != tuple(tokens.shape[:2]):
            raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {tuple(tokens.shape[:2])}: one "
                             "target per input token, aligned with input_ids (the objectives shift them).")
        return labels

    def _head_logits(self, objective: str, head: nn.Module, hidden_states, computes_loss: bool):
        """(logits, SAT gate logits or None). Training with chunked cross-entropy makes no logits: the loss projects
        `hidden_states` chunk by chunk."""
        if computes_loss and uses_chunked_cross_entropy(self):
            return None, head.gate(hidden_states) if objective == "sat" else None
        if objective == "sat":
            return head(hidden_states)
        return head(hidden_states), None

    # ----------------------------------------------------------------------------------------------- MoE, MTP

    def _request_router_outputs(self, kwargs: dict) -> tuple[bool, bool]:
        """(wants the router losses, updates the balancing bias), asking the trunk for the chosen experts if either.

        Router losses only where a decoder layer routes: a dense model asked for router logits (TRL asks any config
        with the flag) records an empty tuple and adds no loss.
        """
        routes = "sparse" in self.config.mlp_layer_types
        wants_aux_loss = routes and kwargs.get("output_router_logits", self.config.output_router_logits)
        updates_router_bias = self.training and routes and self.config.router_bias_update_rate > 0
        if wants_aux_loss or updates_router_bias:
            kwargs["output_router_indices"] = True  # which experts were chosen, for the losses and the bias update
        return wants_aux_loss, updates_router_bias

    def _routers(self) -> list[AgillmRouter]:
        """The routers of the decoder layers, in the order they run (= the order their outputs are recorded)."""
        return [layer.mlp.gate for layer in self.model.layers[: self.config.num_hidden_layers] if layer.is_sparse]

    def _update_router_biases(self, router_indices: tuple[torch.Tensor, ...], attention_mask=None) -> None:
        if not router_indices:  # no sparse decoder layer: nothing was routed
            return
        real = None  # padding tokens are routed too, but their choices are no load to balance
        if attention_mask is not None and attention_mask.dim() == 2:
            real = attention_mask[:, -(router_indices[0].shape[0] // attention_mask.shape[0]) :].reshape(-1).bool()
        for router, top_index in zip(self._routers(), router_indices):
            router.update_bias(top_index if real is None else top_index[real], self.config.router_bias_update_rate)

    def _router_aux_loss(self, outputs: BaseModelOutputWithPast, attention_mask) -> torch.Tensor:
        balance, z_loss = router_losses(
            outputs.router_logits,
            outputs.router_indices,
            self.config.num_experts,
            sigmoid_scores=ROUTER_CLASSES[self.config.router_type].sigmoid_scores,
            attention_mask=attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None,
        )
        return self.config.router_aux_loss_coef * balance + self.config.router_z_loss_coef * z_loss


    # ----------------------------------------------------------------------------------------------- decoding

    def generate(self, *args, generation_mode: str | None = None, **kwargs):
        r"""
        `GenerationMixin.generate`, plus `generation_mode` for AGILLM's parallel decoders (see
        `generation_agillm.py`): `"sat"`, `"nat_mask_predict"`, `"nat_block"`, `"staged"`, `"verify_and_draft"`
        (one forward verifies the last drafts with AR and drafts the next with NAT), and the DiffusionBlocks
        Euler sampler `"diffusion_euler"` (`diffusion_blocks_agillm.py`). `None` or `"ar"` is
        standard autoregressive generation (greedy, sampling, beam search, assisted, ...).
        """
        if generation_mode in (None, "ar"):
            generation_config = kwargs.get("generation_config")
            if kwargs.get("use_mtp") or getattr(generation_config, "use_mtp", False):
                self._check_mtp_generation()
            return super().generate(*args, **kwargs)
        if generation_mode not in (*GENERATION_MODES, "diffusion_euler"):
            raise ValueError(
                f"Unknown generation_mode {generation_mode!r}; choose 'ar', {', '.join(map(repr, GENERATION_MODES))} "
                "or 'diffusion_euler'."
            )
        if generation_mode == "diffusion_euler":
            return diffusion_euler_generate(self, *args, **kwargs)
        return agillm_generate(self, *args, generation_mode=generation_mode, **kwargs)


    def _check_mtp_generation(self) -> None:
        """transformers' `use_mtp=True` reads the MTP weights back from the folder the model was loaded from."""
        if not self.config.num_mtp_layers:
            raise ValueError("use_mtp=True needs MTP modules: this model has num_mtp_layers=0.")
        if not self.config.name_or_path:
            raise ValueError(
                "use_mtp=True loads the MTP modules from the checkpoint the model was loaded from, and this model was "
                "not loaded from one: save_pretrained it and load it back with from_pretrained."
            )


# --------------------------------------------------------------------------------------------------- multimodal


class AgillmForConditionalGeneration(AgillmForCausalLM):
    """AGILLM that reads images and speech and writes text or images: the AR model over a multimodal trunk.

    Inputs come from `AgillmProcessor`: `<|image|>` / `<|audio|>` placeholders in `input_ids` plus `pixel_values` /
    `input_features`, merged in `AgillmModel.merge_media`. Text generation never emits VQ image codes;
    `generate_images` emits nothing else and decodes them to pixels with the VQ-VAE (`config.vq_config`).
    Works with `pipeline("image-text-to-text")` and `pipeline("any-to-any")` (audio in).
    """

    _media_inputs = ("pixel_values", "input_features", "feature_attention_mask")

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        objective: str | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> AgillmCausalLMOutputWithPast:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(num_images, 3, image_size, image_size)`, *optional*):
            Images, in order of their `<|image|>` placeholders over the batch (from `AgillmProcessor`).
        input_features (`torch.FloatTensor` of shape `(num_clips, num_mel_bins, num_frames)`, *optional*):
            Log-mel speech clips, in order of their `<|audio|>` placeholders over the batch.
        feature_attention_mask (`torch.Tensor` of shape `(num_clips, num_frames)`, *optional*):
            1 for real frames, 0 for padding frames of `input_features`.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets as for [`AgillmForCausalLM`]; put -100 on placeholder positions (the processor's
            `labels` helpers do). Media inputs train and run the AR head only.
        objective (`str`, *optional*): as [`AgillmForCausalLM`]; with media only `None` / `"ar"`.
        """
        media = {"pixel_values": pixel_values, "input_features": input_features,
                 "feature_attention_mask": feature_attention_mask}
        media = {name: value for name, value in media.items() if value is not None}
        if media and (objective not in (None, "ar") or (labels is not None and trained_objectives(self.config) != ["ar"])):
            raise ValueError("Images and audio run through the AR head only: use objective='ar' and "
                             "config.objective_weights with only 'ar' when training on media.")
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
            logits_to_keep=logits_to_keep, objective=objective, **media, **kwargs,
        )

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.model.get_image_features(pixel_values, **kwargs)

    def get_audio_features(self, input_features: torch.Tensor, feature_attention_mask=None, **kwargs) -> torch.Tensor:
        return self.model.get_audio_features(input_features, feature_attention_mask, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, use_cache=True, is_first_iteration=False, **kwargs):
        """Images and audio are encoded once, in the prefill; later steps read their keys/values from the cache."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, use_cache=use_cache, is_first_iteration=is_first_iteration, **kwargs
        )
        if not (is_first_iteration or not use_cache):
            for name in self._media_inputs:
                model_inputs.pop(name, None)
        return model_inputs

    # ---------------------------------------------------------------------------------------------- writing

    def generate(self, *args, logits_processor=None, **kwargs):
        """Text generation (any `generation_mode` of [`AgillmForCausalLM.generate`]), never emitting VQ codes."""
        codes = self.config.image_token_range
        if len(codes) and kwargs.get("generation_mode") in (None, "ar"):
            logits_processor = LogitsProcessorList(logits_processor or [])
            logits_processor.append(SuppressTokensLogitsProcessor(list(codes), device=self.device))
        return super().generate(*args, logits_processor=logits_processor, **kwargs)

    def _vqmodel(self):
        if self.config.vq_config is None:
            raise ValueError("This model has no VQ-VAE (config.vq_config is None): it cannot read or write image tokens.")
        return self.model.vqmodel

    @torch.no_grad()
    def encode_images_to_tokens(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """Images -> their VQ token ids in this model's vocabulary, `[images, vq_config.num_image_tokens]`."""
        return self._vqmodel().encode(pixel_values) + self.config.image_vocab_offset

    @torch.no_grad()
    def decode_image_tokens(self, image_token_ids: torch.LongTensor) -> torch.Tensor:
        """VQ token ids (as `generate_images` writes them) -> pixels in [-1, 1], `[images, 3, size, size]`."""
        codes = self.config.image_token_range
        if image_token_ids.numel() and not ((image_token_ids >= codes.start) & (image_token_ids < codes.stop)).all():
            raise ValueError(f"Image token ids must lie in [{codes.start}, {codes.stop}) (the VQ codes).")
        return self._vqmodel().decode(image_token_ids - self.config.image_vocab_offset)

    @torch.no_grad()
    def generate_images(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Write one image per prompt: `vq_config.num_image_tokens` VQ tokens after `<|image_start|>`, decoded.

        The prompt (e.g. a chat asking for a picture) gets `<|image_start|>` appended where it does not already end
        with it; every step may pick only VQ codes. Keyword arguments go to `generate` (`do_sample`, `temperature`,
        `top_k`, ...). Returns `(pixels [B, 3, size, size] in [-1, 1], image token ids [B, num_image_tokens])`.
        """
        self._vqmodel()
        if not (input_ids[:, -1] == self.config.image_start_token_id).all():
            start = input_ids.new_full((input_ids.shape[0], 1), self.config.image_start_token_id)
            input_ids = torch.cat([input_ids, start], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
        num_tokens = self.config.vq_config.num_image_tokens
        allowed = list(self.config.image_token_range)
        only_codes = PrefixConstrainedLogitsProcessor(lambda batch_id, ids: allowed, num_beams=kwargs.get("num_beams", 1))
        sequences = GenerationMixin.generate(
            self, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=num_tokens,
            min_new_tokens=num_tokens, logits_processor=LogitsProcessorList([only_codes]), **kwargs,
        )
        image_tokens = sequences[:, input_ids.shape[1]:]
        return self.decode_image_tokens(image_tokens), image_tokens


# The task heads reuse transformers' generic forward passes (pooling, losses). Their constructors are spelled out
# because the generic ones build the trunk with `AutoModel.from_config`, which cannot resolve a remote-code config
# class without touching the global auto registry.


class AgillmForSequenceClassification(GenericForSequenceClassification, AgillmPreTrainedModel):
    """Scores the last non-padding token of each sequence."""

    def __init__(self, config: AgillmConfig):
        AgillmPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = AgillmModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()


class AgillmForTokenClassification(GenericForTokenClassification, AgillmPreTrainedModel):
    """Scores every token (NER-style tagging)."""

    def __init__(self, config: AgillmConfig):
        AgillmPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = AgillmModel(config)
        classifier_dropout = getattr(config, "classifier_dropout", None)  # not a core field; users may add it
        self.dropout = nn.Dropout(0.1 if classifier_dropout is None else classifier_dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()


class AgillmForQuestionAnswering(GenericForQuestionAnswering, AgillmPreTrainedModel):
    """Predicts answer span start/end logits over the tokens."""

    def __init__(self, config: AgillmConfig):
        AgillmPreTrainedModel.__init__(self, config)
        self.model = AgillmModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()


# Saved folders carry these `.py` files and a complete `auto_map` (`AGILLM_AUTO_MAP` in configuration_agillm.py).
AgillmConfig.register_for_auto_class()
AgillmModel.register_for_auto_class("AutoModel")
AgillmForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AgillmForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
AgillmForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
AgillmForQuestionAnswering.register_for_auto_class("AutoModelForQuestionAnswering")
AgillmForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")


__all__ = [
    "AgillmPreTrainedModel",
    "AgillmModel",
    "AgillmForCausalLM",
    "AgillmForSequenceClassification",
    "AgillmForTokenClassification",
    "AgillmForQuestionAnswering",
    "AgillmForConditionalGeneration",
]
