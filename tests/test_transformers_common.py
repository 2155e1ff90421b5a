"""transformers' own common model tests (`ModelTesterMixin`, from the transformers sdist) on every AGILLM class.

The tester mirrors transformers' `CausalLMModelTester` (tiny config, batch 13 x seq 7). Each test class runs the whole
mixin on one config: the plain Llama-style one, AGILLM's other layer options (sliding and chunked attention, a NoPE
layer, QK-norm, LayerNorm, biases), MoE variants, and a multimodal config (image and speech encoders) whose tester
lays out inputs as `AgillmProcessor` does, as transformers' Llava / Qwen2-Audio testers do.
"""

import copy
import tempfile
import unittest
from unittest.mock import patch

import torch
from parameterized import parameterized
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    set_seed,
)
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from configuration_agillm import AgillmConfig
from modeling_agillm import (
    AgillmForCausalLM,
    AgillmForConditionalGeneration,
    AgillmForQuestionAnswering,
    AgillmForSequenceClassification,
    AgillmForTokenClassification,
    AgillmModel,
)
from multimodal_agillm import AgillmEncoderAttention
from tests.transformers_common.fetch import ensure_transformers_tests


ensure_transformers_tests()  # before the imports below: downloads the sdist on the first run, then reuses .cache/

import transformers_sdist_tests.test_modeling_common as mixin_module  # noqa: E402
from transformers_sdist_tests.generation.test_utils import GenerationTesterMixin  # noqa: E402
from transformers_sdist_tests.test_modeling_common import (  # noqa: E402
    TEST_EAGER_MATCHES_BATCHED_AND_GROUPED_INFERENCE_PARAMETERIZATION,
    ModelTesterMixin,
    _test_eager_matches_batched_and_grouped_inference,
    floats_tensor,
    ids_tensor,
    torch_device,
)


# ModelTesterMixin treats the model under test as a built-in transformers model. Two things make AGILLM read as one,
# for the duration of a test class only (`AgillmModelTest.setUpClass`), without touching how it loads as remote code:
# - Names: the mixin decides per class name which labels to build and which class is the base model by looking the
#   name up in transformers' `MODEL_*_MAPPING_NAMES` dicts (model_type -> class name), where every built-in model is
#   listed. AGILLM's names go there as a built-in "agillm" entry would read. These dicts only serve such lookups
#   here: the auto mappings built on them skip "agillm", which is absent from CONFIG_MAPPING_NAMES.
# - Auto classes: tests reload saved checkpoints with `AutoConfig`/`AutoModel*.from_pretrained(folder)` and no
#   `trust_remote_code`; for a built-in model_type that resolves locally, for a remote-code folder it would prompt.
#   `AutoConfig.register` / `AutoModel*.register` (transformers' in-process registration for custom models) make it
#   resolve locally to the same classes, as for a built-in model.
AGILLM_AUTO_CLASSES = {
    # name dict in transformers.models.auto.modeling_auto: (auto class, AGILLM class)
    "MODEL_MAPPING_NAMES": (AutoModel, AgillmModel),
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": (AutoModelForCausalLM, AgillmForCausalLM),
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": (
        AutoModelForSequenceClassification,
        AgillmForSequenceClassification,
    ),
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": (AutoModelForTokenClassification, AgillmForTokenClassification),
    "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES": (AutoModelForQuestionAnswering, AgillmForQuestionAnswering),
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES": (AutoModelForImageTextToText, AgillmForConditionalGeneration),
}


def register_agillm_as_builtin(test_class: type[unittest.TestCase]) -> None:
    """Register AGILLM as described above until `test_class`'s tests are done (then every table is restored)."""
    model_type = AgillmConfig.model_type
    test_class.enterClassContext(patch.dict(CONFIG_MAPPING._extra_content))
    AutoConfig.register(model_type, AgillmConfig)
    for names_dict_name, (auto_class, model_class) in AGILLM_AUTO_CLASSES.items():
        names_dict = getattr(modeling_auto, names_dict_name)
        test_class.enterClassContext(patch.dict(names_dict, {model_type: model_class.__name__}))
        test_class.enterClassContext(patch.dict(auto_class._model_mapping._extra_content))
        auto_class.register(AgillmConfig, model_class, exist_ok=True)


ORIGINAL_SET_CONFIG_ROPE_PARAMS = mixin_module._set_config_rope_params


def set_config_rope_params(config, rope_parameters: dict):
    """The mixin's `_set_config_rope_params`, which recurses into every `config.sub_configs` entry, passing over the
    absent ones: AGILLM's towers are optional sub-configs (transformers' `SubConfigSpec(optional=True)`), `None` on a
    text-only config, and the mixin's helper would set `None.rope_parameters`. The encoders have no RoPE; the helper
    only adds the (unread) field to their configs."""
    if config is None:
        return None
    return ORIGINAL_SET_CONFIG_ROPE_PARAMS(config, rope_parameters)


class AgillmModelTester:
    """Builds tiny AGILLM configs and inputs, as transformers' `CausalLMModelTester` does for built-in decoders."""

    config_class = AgillmConfig
    base_model_class = AgillmModel
    causal_lm_class = AgillmForCausalLM
    sequence_classification_class = AgillmForSequenceClassification
    token_classification_class = AgillmForTokenClassification
    question_answering_class = AgillmForQuestionAnswering
    all_model_classes = (
        base_model_class,
        causal_lm_class,
        sequence_classification_class,
        token_classification_class,
        question_answering_class,
    )

    def __init__(
        self,
        parent,
        batch_size=13,
        seq_length=7,
        is_training=True,
        use_input_mask=True,
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        hidden_act="silu",
        max_position_embeddings=512,
        initializer_range=0.02,
        num_labels=3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **config_overrides,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.num_labels = num_labels
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.config_overrides = config_overrides  # AGILLM-specific fields of a variant (layer types, norms, ...)

    def get_config(self):
        return self.config_class(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range,
            num_labels=self.num_labels,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            **self.config_overrides,
        )

    def text_ids_tensor(self, shape: list[int]) -> torch.Tensor:
        """Random ids that read as text to this tester's config (any id here; the multimodal tester avoids media)."""
        return ids_tensor(shape, self.vocab_size)

    def prepare_config_and_inputs(self):
        input_ids = self.text_ids_tensor([self.batch_size, self.seq_length])
        # Row i keeps its first i + 1 tokens (right padding), as in transformers' testers: masks of every length.
        input_mask = torch.tril(torch.ones_like(input_ids)).to(torch_device) if self.use_input_mask else None
        return self.get_config(), input_ids, input_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}

    def create_and_check_model(self, config, input_ids, input_mask):
        model = self.base_model_class(config).to(torch_device).eval()
        with torch.no_grad():
            masked = model(input_ids, attention_mask=input_mask)
            unmasked = model(input_ids)
        expected_shape = (self.batch_size, self.seq_length, self.hidden_size)
        self.parent.assertEqual(masked.last_hidden_state.shape, expected_shape)
        self.parent.assertEqual(unmasked.last_hidden_state.shape, expected_shape)


# Tests skipped on this CPU-only stack, per test class (by the mixin itself unless marked "by this file"):
# - Needs a GPU/accelerator (`require_torch_accelerator`, `require_torch_multi_accelerator`, flash-attn, MPS, hub
#   `kernels`): test_can_load_with_device_context_manager, test_can_load_with_global_device_set, test_cpu_offload,
#   test_disk_offload_bin, test_disk_offload_safetensors, test_flex_attention_with_grads, test_model_parallelism,
#   test_sdpa_can_compile_dynamic, test_sdpa_can_dispatch_on_flash, test_torch_compile_for_training (also `@slow`),
#   test_kernels_can_load_without_crashing, test_flash_attn_kernels_inference_equivalence,
#   test_flash_attn_kernels_mps_inference_equivalence and the 14 test_flash_attn_{2,3,4}_* tests.
# - Needs DeepSpeed (not a dependency; multi-GPU for two of them): test_resize_tokens_embeddings_with_deepspeed,
#   test_resize_embeddings_untied_with_deepspeed and their *_multi_gpu twins.
# - A feature the text-only configs do not have (AgillmMultimodalModelTest, with an image and a speech encoder, runs
#   them all):
#   composite (multi-modal) models: test_attn_implementation_composite_models, test_sdpa_can_dispatch_composite_models,
#     test_can_set_attention_dynamically_composite_model, test_internal_model_config_and_subconfig_are_same
#     (in AgillmMultimodalModelTest, test_sdpa_can_dispatch_non_composite_models skips instead);
#   encoders: the test_get_image_features_* and test_get_audio_features_* tests (skipped by this file: `AgillmModel`
#     has both methods for every config and raises without the tower);
#   MoE experts: the 3 test_eager_matches_batched_and_grouped_inference_*, test_moe_models_record_router_logits,
#     test_output_router_logits_from_config;
#   an encoder-decoder: test_encoder_decoder_loss_no_double_shift;
#   learned position embeddings: test_resize_position_vector_embeddings;
#   partial / axial (vision) RoPE: test_model_rope_with_partial_rotation, test_vision_axial_rope;
#   a global `use_sliding_window` switch (Qwen2): test_sliding_window_mask. AGILLM sets windows per layer through
#     `layer_types`; AgillmLayerOptionsModelTest runs every other test with sliding and chunked layers.
# - test_eager_matches_sdpa_inference_24_fp32_pad_left_output_attentions compares AgillmModel and AgillmForCausalLM,
#   then skips at AgillmForSequenceClassification: the forward of transformers' `GenericFor*` heads carries a string
#   annotation that the mixin's `_can_output_attn` cannot read (the same happens for Llama's heads).
# - AgillmMultimodalModelTest skips (by this file) test_inputs_embeds(_matches_input_ids): media placeholders are found
#   by token id, so pixel_values / input_features need input_ids.
# Subtests skipped inside passing tests: test_keep_in_fp32_modules(_exist) (AGILLM keeps no module in fp32; its RMSNorm
# upcasts internally) and test_reverse_loading_mapping / test_can_load_from_already_mapped_keys (no checkpoint
# conversion mapping is registered for "agillm": its weight names already are transformers' Llama/Qwen3 names).
class AgillmModelTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    """All of `ModelTesterMixin` on the default (Llama-style: full attention, RoPE everywhere, RMSNorm) config."""

    all_model_classes = AgillmModelTester.all_model_classes
    tester_overrides = {}
    # The mixin runs `test_can_init_all_missing_weights` only for models whose config file carries a copyright year of
    # 2023 or later (older ones are exempt until fixed); AGILLM is new and its `_init_weights` must cover every weight.
    test_can_init_all_missing_weights_before_2023 = True

    @classmethod
    def setUpClass(cls):
        register_agillm_as_builtin(cls)
        # The mixin's RoPE tests (and the helper's own recursion) look the helper up in the mixin's module.
        cls.enterClassContext(patch.object(mixin_module, "_set_config_rope_params", set_config_rope_params))
        # The models are tiny: handing each op to a second thread costs more than it saves, and on a busy 2-core
        # machine an OpenMP barrier can cost tens of milliseconds per op. Restored after the class.
        cls.addClassCleanup(torch.set_num_threads, torch.get_num_threads())
        torch.set_num_threads(1)

    def setUp(self):
        self.model_tester = AgillmModelTester(self, **self.tester_overrides)

    @parameterized.expand(TEST_EAGER_MATCHES_BATCHED_AND_GROUPED_INFERENCE_PARAMETERIZATION)
    def test_eager_matches_batched_and_grouped_inference(self, name, dtype):
        """The mixin's test; a config without MoE layers has no experts to dispatch (the MoE classes below run it)."""
        if not self.model_tester.get_config().num_experts:
            self.skipTest("This config has no MoE layers; AgillmMoeModelTest and AgillmNativeLayoutModelTest run it.")
        _test_eager_matches_batched_and_grouped_inference(self, name, dtype)

    def test_output_router_logits_from_config(self):
        """The mixin's test; a config without MoE layers has no routers (every config has the field)."""
        if not self.model_tester.get_config().num_experts:
            self.skipTest("This config has no MoE layers, so no router logits.")
        super().test_output_router_logits_from_config()

    def _image_features_prepare_config_and_inputs(self):
        """The mixin's helper for its test_get_image_features_* tests, which `AgillmModel` has for every config
        (it raises without an image encoder): they run where the config has a vision tower."""
        config, inputs_dict = super()._image_features_prepare_config_and_inputs()
        if config.vision_config is None:
            self.skipTest("This config has no vision_config (no image encoder); AgillmMultimodalModelTest runs it.")
        return config, inputs_dict

    def _audio_features_prepare_config_and_inputs(self):
        """As `_image_features_prepare_config_and_inputs`, for the test_get_audio_features_* tests."""
        config, inputs_dict = super()._audio_features_prepare_config_and_inputs()
        if config.audio_config is None:
            self.skipTest("This config has no audio_config (no speech encoder); AgillmMultimodalModelTest runs it.")
        return config, inputs_dict

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def check_training_gradient_checkpointing(self, gradient_checkpointing_kwargs=None):
        """The mixin's check, on the AR head alone.

        The mixin counts the checkpointed runs of one layer and replays the last one on backward; the multi-objective
        loss runs every layer once per objective, so the replay would mix patterns up. tests/test_heads.py checks the
        multi-objective loss under gradient checkpointing instead (identical gradients with and without).
        """
        overrides = self.model_tester.config_overrides
        self.model_tester.config_overrides = {**overrides, "heads": ["ar"], "objective_weights": None}
        super().check_training_gradient_checkpointing(gradient_checkpointing_kwargs)

    @parameterized.expand([("linear",), ("dynamic",), ("yarn",)])
    def test_model_rope_scaling_from_config(self, scaling_type):
        """The mixin's test of this name, with a context long enough for its long input on the non-dynamic models.

        The mixin feeds 1.5x max_position_embeddings tokens to a default-RoPE model, and AGILLM rejects positions past
        max_position_embeddings with `ValueError` unless rope_type is "dynamic". So the default, linear and yarn models
        here get max_position_embeddings = the long input's length, which leaves their RoPE unchanged (default and
        linear ignore it, yarn reads only `factor` and original_max_position_embeddings). The dynamic model keeps the
        tester's value, so the long input runs past it and triggers the rescaling, as in the mixin. Inputs, seeds and
        assertions are the mixin's.
        """
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        if config.position_embedding_type != "rope":
            self.skipTest(f"position_embedding_type={config.position_embedding_type!r}: this config has no RoPE.")
        short_input = self.model_tester.text_ids_tensor([1, 10])
        long_input = self.model_tester.text_ids_tensor([1, int(config.max_position_embeddings * 1.5)])

        def run_model(rope_parameters):
            model_config = copy.deepcopy(config)
            set_config_rope_params(model_config, rope_parameters)
            if rope_parameters["rope_type"] != "dynamic":
                model_config.max_position_embeddings = long_input.shape[1]
            set_seed(42)  # the same random weights for both models
            model = AgillmModel(model_config).to(torch_device).eval()
            with torch.no_grad():
                return model(short_input).last_hidden_state, model(long_input).last_hidden_state

        # The mixin sets both on one config, so the scaled model inherits original_max_position_embeddings=16384.
        reference_rope = {"rope_type": "default", "rope_theta": 10_000.0, "original_max_position_embeddings": 16384}
        original_short_output, original_long_output = run_model(reference_rope)
        scaled_short_output, scaled_long_output = run_model(
            {**reference_rope, "rope_type": scaling_type, "factor": 10.0}
        )

        # Dynamic scaling does not change the RoPE embeddings until it receives an input longer than the original
        # maximum sequence length, so the outputs for the short input should match.
        if scaling_type == "dynamic":
            torch.testing.assert_close(original_short_output, scaled_short_output, rtol=1e-5, atol=1e-5)
        else:
            self.assertFalse(torch.allclose(original_short_output, scaled_short_output, atol=1e-5))
        # The output should be different for long inputs
        self.assertFalse(torch.allclose(original_long_output, scaled_long_output, atol=1e-5))


class AgillmLayerOptionsModelTest(AgillmModelTest):
    """All of `ModelTesterMixin` again, on a config using AGILLM's other layer options.

    Layer 0 is sliding-window attention (window 4 < seq 7, so the window bites), layer 1 chunked attention
    (chunks of 4) without RoPE (NoPE); QK-norm and LayerNorm replace plain RMSNorm; q/k/v carry a bias, o_proj none.
    """

    tester_overrides = {
        "layer_types": ["sliding_attention", "chunked_attention"],
        "sliding_window": 4,
        "attention_chunk_size": 4,
        "nope_layers": [1],
        "use_qk_norm": True,
        "norm_type": "layer_norm",
        "attention_bias": True,
        "attention_output_bias": False,
    }


class AgillmMoeModelTest(AgillmModelTest):
    """All of `ModelTesterMixin` on an MoE config with every head: gated experts (softmax top-2, renormalised) plus a
    shared expert, standard ALiBi instead of RoPE, and the SAT and NAT heads (block NAT) beside the AR head."""

    tester_overrides = {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24,
        "position_embedding_type": "alibi",
        "heads": ["ar", "sat", "nat"],
        "nat_block_size": 4,
    }


class AgillmNativeLayoutModelTest(AgillmModelTest):
    """All of `ModelTesterMixin` on the AGILLM 4.x layout converted checkpoints use: LayerNorm, AGILLM's clamped ALiBi,
    tie_kv, plain ReLU experts with biases routed top-1 straight-through plus a shared expert, untied biased heads."""

    tester_overrides = {
        "num_key_value_heads": 4,
        "norm_type": "layer_norm",
        "rms_norm_eps": 1e-5,
        "position_embedding_type": "agillm_alibi",
        "tie_kv": True,
        "mlp_type": "plain",
        "hidden_act": "relu",
        "mlp_bias": True,
        "num_experts": 4,
        "num_experts_per_tok": 1,
        "router_type": "top1_straight_through",
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 32,
        "heads": ["ar", "sat", "nat"],
        "head_bias": True,
        "tie_word_embeddings": False,
        "nat_block_size": None,
        "nat_mask_token_id": 0,
        "sat_gate_loss": False,
    }


class AgillmDeepseekStyleModelTest(AgillmModelTest):
    """All of `ModelTesterMixin` on a DeepSeek-V3-style config: multi-head latent attention (compressed query and
    key/value latents) whose second layer reuses the first layer's cached latent (cross-layer KV sharing), a dense
    first layer, then sigmoid group-limited top-2 routing (2 of 4 groups, scaled weights) with a shared expert, and
    one MTP module after the last layer."""

    tester_overrides = {
        "num_key_value_heads": 4,
        "kv_lora_rank": 16,
        "q_lora_rank": 24,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 12,
        "kv_source_layers": [0, 0],
        "mlp_layer_types": ["dense", "sparse"],
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "router_type": "sigmoid_group_topk",
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 16,
        "num_mtp_layers": 1,
    }


class AgillmLlama4StyleModelTest(AgillmModelTest):
    """All of `ModelTesterMixin` on a Llama-4-style config: a chunked-attention RoPE layer with weightless post-RoPE
    QK-norm, then a full-attention NoPE layer with attention temperature tuning, a dense first layer and a top-1
    MoE layer whose expert input is scaled by the sigmoid router score, plus a gated shared expert."""

    tester_overrides = {
        "layer_types": ["chunked_attention", "full_attention"],
        "attention_chunk_size": 4,
        "nope_layers": [1],
        "use_qk_norm": True,
        "qk_norm_type": "unweighted_post_rope",
        "attn_temperature_tuning": True,
        "floor_scale": 2,
        "mlp_layer_types": ["dense", "sparse"],
        "num_experts": 4,
        "num_experts_per_tok": 1,
        "router_type": "sigmoid_top1_scaled_input",
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 16,
        "shared_expert_gate": True,
    }


class AgillmMultimodalModelTester(AgillmModelTester):
    """Tiny AGILLM with an image and a speech encoder, and inputs laid out as `AgillmProcessor` writes them.

    Like transformers' Llava / Qwen2-Audio testers: every row holds one image and one clip, each placeholder already
    expanded to its feature count (`<|image_start|>` + `<|image|>` * num_image_tokens + `<|image_end|>`, the same with
    `<|audio|>` * ceil(valid frames / 4)), between random text tokens that avoid the special ids. The last clip ends
    in padding frames (its token count stays the same) and rows are left padded by 0, 1, 2, ... text tokens.
    """

    all_model_classes = (AgillmModel, AgillmForConditionalGeneration)

    # batch_size 7 = the mixin's eager-vs-sdpa batch, which it would otherwise fill up with rows lacking placeholders
    def __init__(self, parent, batch_size=7, text_length=3, num_frames=8, padded_frames=3, **config_overrides):
        # Encoder depths differ from the decoder's (2), so the mixin's per-tower layer counts are checked for real.
        self.vision_config = {
            "image_size": 8,
            "patch_size": 4,
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        }
        self.audio_config = {
            "num_mel_bins": 8,
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
        }
        config_overrides = {"vision_config": self.vision_config, "audio_config": self.audio_config, **config_overrides}
        super().__init__(parent, batch_size=batch_size, **config_overrides)
        config = self.get_config()
        self.text_length = text_length  # text tokens before the image and after the clip
        self.num_frames = num_frames
        self.padded_frames = padded_frames  # trailing padding frames of the last clip
        self.num_image_tokens = config.vision_config.num_image_tokens
        self.num_audio_tokens = config.audio_config.num_audio_tokens(num_frames)
        if config.audio_config.num_audio_tokens(num_frames - padded_frames) != self.num_audio_tokens:
            raise ValueError("The padded clip must keep the token count of the others: rows have one length.")
        image_run = [config.image_token_id] * self.num_image_tokens
        audio_run = [config.audio_token_id] * self.num_audio_tokens
        self.media_run = [
            config.image_start_token_id, *image_run, config.image_end_token_id,
            config.audio_start_token_id, *audio_run, config.audio_end_token_id,
        ]
        self.first_text_id = 32  # ids below are special tokens in the shipped tokenizer (media placeholders: 6-11)
        self.seq_length = 2 * text_length + len(self.media_run)

    def text_ids_tensor(self, shape: list[int]) -> torch.Tensor:
        return ids_tensor(shape, self.vocab_size - self.first_text_id) + self.first_text_id

    def prepare_config_and_inputs(self):
        config = self.get_config()
        before = self.text_ids_tensor([self.batch_size, self.text_length])
        after = self.text_ids_tensor([self.batch_size, self.text_length])
        media = torch.tensor(self.media_run, device=torch_device).expand(self.batch_size, -1)
        input_ids = torch.cat([before, media, after], dim=1)
        # Row i is left padded by min(i, text_length) tokens: pad id under a zero mask, as a tokenizer pads.
        num_pads = torch.arange(self.batch_size, device=torch_device).clamp(max=self.text_length)
        input_mask = (torch.arange(self.seq_length, device=torch_device)[None] >= num_pads[:, None]).long()
        input_ids = input_ids.masked_fill(input_mask == 0, self.pad_token_id)
        vision = config.vision_config
        pixel_values = floats_tensor([self.batch_size, vision.num_channels, vision.image_size, vision.image_size])
        input_features = floats_tensor([self.batch_size, config.audio_config.num_mel_bins, self.num_frames])
        feature_attention_mask = torch.ones(self.batch_size, self.num_frames, dtype=torch.long, device=torch_device)
        feature_attention_mask[-1, self.num_frames - self.padded_frames :] = 0
        return config, input_ids, input_mask, pixel_values, input_features, feature_attention_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask, pixel_values, input_features, feature_attention_mask = (
            self.prepare_config_and_inputs()
        )
        return config, {
            "input_ids": input_ids,
            "attention_mask": input_mask,
            "pixel_values": pixel_values,
            "input_features": input_features,
            "feature_attention_mask": feature_attention_mask,
        }

    def create_and_check_model(self, config, input_ids, input_mask, pixel_values, input_features, feature_mask):
        model = self.base_model_class(config).to(torch_device).eval()
        with torch.no_grad():
            with_media = model(
                input_ids,
                attention_mask=input_mask,
                pixel_values=pixel_values,
                input_features=input_features,
                feature_attention_mask=feature_mask,
            ).last_hidden_state
            with self.parent.assertRaisesRegex(ValueError, "placeholder tokens"):  # placeholders, but no features
                model(input_ids, attention_mask=input_mask)
        self.parent.assertEqual(with_media.shape, (self.batch_size, self.seq_length, self.hidden_size))


class AgillmMultimodalModelTest(AgillmModelTest):
    """All of `ModelTesterMixin` on a config with an image and a speech encoder (`AgillmModel` and
    `AgillmForConditionalGeneration`): the mixin's composite-model and get_*_features tests run here."""

    all_model_classes = AgillmMultimodalModelTester.all_model_classes
    _is_composite = True  # the mixin runs its composite-model (sub-config) tests only when a test class says so

    # Inputs the mixin's eager-vs-sdpa test passes beside `input_ids` (it drops every other key otherwise).
    additional_model_inputs = ["pixel_values", "input_features", "feature_attention_mask"]

    def setUp(self):
        self.model_tester = AgillmMultimodalModelTester(self, **self.tester_overrides)

    def test_inputs_embeds(self):
        self.skipTest(
            "AGILLM finds media placeholders by token id: pixel_values / input_features with inputs_embeds and no "
            "input_ids raise ValueError by design (tests/test_multimodal_model.py checks it); AgillmModelTest runs "
            "this test on text."
        )

    def test_inputs_embeds_matches_input_ids(self):
        self.test_inputs_embeds()

    def test_sdpa_can_dispatch_composite_models(self):
        """The mixin's test, for AGILLM's layout: the mixin looks for a `language_model` sub-model beside the towers,
        while AGILLM's trunk is the language model itself (Llama's names, the top-level config). The checks are the
        mixin's: a reloaded model resolves every part to sdpa, `attn_implementation="eager"` reaches every part, and
        no attention module of the eager model reads "sdpa"."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            with tempfile.TemporaryDirectory() as tmpdirname:
                model_class(config).save_pretrained(tmpdirname)
                for requested in (None, "eager"):
                    base_model = model_class.from_pretrained(tmpdirname, attn_implementation=requested).base_model
                    expected = requested or "sdpa"
                    for part in (base_model, base_model.vision_tower, base_model.audio_tower):
                        self.assertEqual(part.config._attn_implementation, expected, type(part).__name__)
                attention_modules = [
                    module for module in base_model.modules()
                    if type(module).__name__.endswith("Attention") and getattr(module, "config", None) is not None
                ]
                self.assertTrue(any(isinstance(module, AgillmEncoderAttention) for module in attention_modules))
                for module in attention_modules:
                    self.assertEqual(module.config._attn_implementation, "eager", type(module).__name__)
