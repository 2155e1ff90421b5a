"""Behaviour of the multimodal AGILLM (`AgillmForConditionalGeneration` with an image and a speech encoder).

Inputs are laid out as `AgillmProcessor` writes them: each image's `<|image|>` placeholder expanded to
`<|image_start|>` + `<|image|>` * num_image_tokens + `<|image_end|>`, each clip's to `<|audio_start|>` +
`<|audio|>` * ceil(valid frames / 4) + `<|audio_end|>`. Models are tiny, seeded and fp32, so every comparison is exact
up to float rounding (`ATOL`); the file runs in a few seconds.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from configuration_agillm import AgillmConfig
from modeling_agillm import AgillmForConditionalGeneration


ATOL = 1e-5  # fp32 agreement between runs of the same computation; observed differences are ~1e-7
NUM_MEL_BINS = 8
FIRST_TEXT_ID = 32  # ids below are special tokens (media placeholders and markers: 6-11)

TINY_MULTIMODAL_CONFIG = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    # 16 x 16 images in 4 x 4 patches: 16 tokens per image
    "vision_config": {"image_size": 16, "patch_size": 4, "hidden_size": 16, "intermediate_size": 32,
                      "num_attention_heads": 2, "num_hidden_layers": 2},
    # one token per 4 frames (conv stride 2, 2 frames stacked per token)
    "audio_config": {"num_mel_bins": NUM_MEL_BINS, "hidden_size": 16, "intermediate_size": 32,
                     "num_attention_heads": 2, "num_hidden_layers": 2},
}


def build_model(seed: int = 0, attn_implementation: str = "sdpa") -> AgillmForConditionalGeneration:
    torch.manual_seed(seed)
    config = AgillmConfig(**TINY_MULTIMODAL_CONFIG)
    config._attn_implementation = attn_implementation
    return AgillmForConditionalGeneration(config).eval()


def text(*token_ids: int) -> list[int]:
    return [FIRST_TEXT_ID + token_id for token_id in token_ids]


def image_run(config: AgillmConfig) -> list[int]:
    """What the processor writes for one image."""
    placeholders = [config.image_token_id] * config.vision_config.num_image_tokens
    return [config.image_start_token_id, *placeholders, config.image_end_token_id]


def audio_run(config: AgillmConfig, num_frames: int) -> list[int]:
    """What the processor writes for one clip of `num_frames` valid frames."""
    placeholders = [config.audio_token_id] * config.audio_config.num_audio_tokens(num_frames)
    return [config.audio_start_token_id, *placeholders, config.audio_end_token_id]


def left_padded(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids -> (input_ids, attention_mask), left padded as the processor does for generation."""
    length = max(len(row) for row in rows)
    input_ids = torch.tensor([[pad_token_id] * (length - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows])
    return input_ids, attention_mask


def random_images(config: AgillmConfig, count: int) -> torch.Tensor:
    size = config.vision_config.image_size
    return torch.randn(count, config.vision_config.num_channels, size, size)


def one_image_prompt(config: AgillmConfig) -> dict:
    torch.manual_seed(1)
    return {"input_ids": torch.tensor([text(1, 2) + image_run(config) + text(3, 4)]),
            "pixel_values": random_images(config, 1)}


pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")  # tiny models: one thread (conftest)


@pytest.fixture
def model():
    return build_model()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_mixed_batch_equals_items_alone(attn_implementation):
    """Image-only, audio-only and text-only rows, left padded, with the clip padded to a longer batch clip."""
    model = build_model(attn_implementation=attn_implementation)
    config = model.config
    torch.manual_seed(2)
    clip_frames, batch_frames = 13, 20  # 4 audio tokens; the batch pads the clip with 7 frames of noise
    image_row = text(1, 2) + image_run(config) + text(3)
    audio_row = text(4) + audio_run(config, clip_frames) + text(5, 6, 7)
    text_row = text(8, 9, 10)
    pixel_values = random_images(config, 1)
    clip = torch.randn(1, NUM_MEL_BINS, clip_frames)
    padded_clip = torch.cat([clip, 5 * torch.randn(1, NUM_MEL_BINS, batch_frames - clip_frames)], dim=-1)
    feature_attention_mask = (torch.arange(batch_frames) < clip_frames).long()[None]

    input_ids, attention_mask = left_padded([image_row, audio_row, text_row], config.pad_token_id)
    with torch.no_grad():
        batch_logits = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                             input_features=padded_clip, feature_attention_mask=feature_attention_mask).logits
        alone = [
            model(input_ids=torch.tensor([image_row]), pixel_values=pixel_values).logits,
            model(input_ids=torch.tensor([audio_row]), input_features=clip).logits,
            model(input_ids=torch.tensor([text_row])).logits,
        ]
    for row, row_logits in enumerate(alone):
        length = row_logits.shape[1]
        torch.testing.assert_close(batch_logits[row, -length:], row_logits[0], atol=ATOL, rtol=0)


def test_eager_matches_sdpa():
    eager, sdpa = build_model(attn_implementation="eager"), build_model(attn_implementation="sdpa")
    config = eager.config
    torch.manual_seed(3)
    rows = [text(1) + image_run(config) + audio_run(config, 8) + text(2), text(3, 4) + audio_run(config, 6)]
    input_ids, attention_mask = left_padded(rows, config.pad_token_id)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": random_images(config, 1),
        "input_features": torch.randn(2, NUM_MEL_BINS, 8),
        "feature_attention_mask": torch.tensor([[1] * 8, [1] * 6 + [0] * 2]),
    }
    with torch.no_grad():
        eager_logits, sdpa_logits = eager(**inputs).logits, sdpa(**inputs).logits
    real = attention_mask.bool()
    torch.testing.assert_close(eager_logits[real], sdpa_logits[real], atol=ATOL, rtol=0)


def test_cached_generation_matches_uncached(model):
    """Greedy decoding after an image prompt: the image is encoded once (prefill) and read from the cache after."""
    config = model.config
    torch.manual_seed(4)
    input_ids, attention_mask = left_padded(
        [text(1) + image_run(config) + text(2, 3), text(4, 5, 6)], config.pad_token_id
    )
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": random_images(config, 1)}
    settings = {"max_new_tokens": 6, "do_sample": False, "output_scores": True, "return_dict_in_generate": True,
                "pad_token_id": config.pad_token_id}
    cached = model.generate(**inputs, **settings, use_cache=True)
    uncached = model.generate(**inputs, **settings, use_cache=False)
    assert cached.sequences.shape == (2, input_ids.shape[1] + 6)
    assert torch.equal(cached.sequences, uncached.sequences)
    for cached_scores, uncached_scores in zip(cached.scores, uncached.scores, strict=True):
        torch.testing.assert_close(cached_scores, uncached_scores, atol=ATOL, rtol=0)


def test_placeholder_feature_count_mismatch_names_both_numbers(model):
    config = model.config
    prompt = one_image_prompt(config)
    num_image_tokens = config.vision_config.num_image_tokens
    with pytest.raises(ValueError, match=rf"{num_image_tokens} image placeholder.* {2 * num_image_tokens} features"):
        model(input_ids=prompt["input_ids"], pixel_values=random_images(config, 2))  # two images, one placeholder run
    with pytest.raises(ValueError, match=rf"{num_image_tokens} image placeholder.* 0 features"):
        model(input_ids=prompt["input_ids"])  # placeholders without pixel_values
    audio_ids = torch.tensor([text(1) + audio_run(config, 8) + text(2)])  # 2 audio tokens
    with pytest.raises(ValueError, match=r"2 audio placeholder.* 3 features"):
        model(input_ids=audio_ids, input_features=torch.randn(1, NUM_MEL_BINS, 12))  # 12 frames = 3 tokens


def test_image_tokens_attend_bidirectionally(model):
    """A change to the last image feature reaches the first image position in the decoder; text before the image is
    unchanged. Only the projected feature of the last patch changes (a hook on the projector), because a changed
    pixel would reach every patch feature through the ViT's own attention, with or without the decoder's."""
    config = model.config
    prompt = one_image_prompt(config)

    def change_last_patch_feature(module, args, features):
        return torch.cat([features[:, :-1], features[:, -1:] + 1.0], dim=1)

    with torch.no_grad():
        hidden = model.model(**prompt).last_hidden_state
        with model.model.multi_modal_projector.register_forward_hook(change_last_patch_feature):
            changed_hidden = model.model(**prompt).last_hidden_state
    first = (prompt["input_ids"][0] == config.image_token_id).nonzero()[0].item()
    assert torch.equal(hidden[:, :first], changed_hidden[:, :first])
    assert (hidden[0, first] - changed_hidden[0, first]).abs().max() > 1e-3


def test_audio_clip_padding_does_not_change_features(model):
    torch.manual_seed(5)
    clip = torch.randn(1, NUM_MEL_BINS, 10)
    padded = torch.cat([clip, 3 * torch.randn(1, NUM_MEL_BINS, 9)], dim=-1)
    mask = (torch.arange(19) < 10).long()[None]
    with torch.no_grad():
        alone = model.get_audio_features(clip)
        batched = model.get_audio_features(padded, mask)
    num_tokens = model.config.audio_config.num_audio_tokens(10)
    assert int(alone.feature_mask.sum()) == int(batched.feature_mask.sum()) == num_tokens
    torch.testing.assert_close(
        batched.pooler_output[batched.feature_mask], alone.pooler_output[alone.feature_mask], atol=ATOL, rtol=0
    )


def test_wrong_media_shapes_raise(model):
    config = model.config
    prompt = one_image_prompt(config)
    size = config.vision_config.image_size
    with pytest.raises(ValueError, match=r"pixel_values must have shape \[num_images, 3, 16, 16\]"):
        model(input_ids=prompt["input_ids"], pixel_values=torch.randn(1, 3, 2 * size, 2 * size))
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(input_ids=prompt["input_ids"], pixel_values=torch.randn(3, size, size))  # no image dimension
    audio_ids = torch.tensor([text(1) + audio_run(config, 8) + text(2)])
    with pytest.raises(ValueError, match=rf"input_features must have shape \[num_clips, {NUM_MEL_BINS}, num_frames\]"):
        model(input_ids=audio_ids, input_features=torch.randn(1, NUM_MEL_BINS + 1, 8))
    with pytest.raises(ValueError, match="feature_attention_mask must have shape"):
        model(input_ids=audio_ids, input_features=torch.randn(1, NUM_MEL_BINS, 8),
              feature_attention_mask=torch.ones(1, 9, dtype=torch.long))


def test_media_with_inputs_embeds_raises(model):
    """Placeholders are found by token id, so images and audio need `input_ids` (not `inputs_embeds`)."""
    prompt = one_image_prompt(model.config)
    inputs_embeds = model.get_input_embeddings()(prompt["input_ids"])
    with pytest.raises(ValueError, match="pixel_values / input_features need input_ids"):
        model(inputs_embeds=inputs_embeds, pixel_values=prompt["pixel_values"])


def test_save_and_reload_gives_identical_logits(model, tmp_path):
    config = model.config
    torch.manual_seed(6)
    inputs = {"input_ids": torch.tensor([text(1) + image_run(config) + audio_run(config, 8) + text(2)]),
              "pixel_values": random_images(config, 1), "input_features": torch.randn(1, NUM_MEL_BINS, 8)}
    model.save_pretrained(tmp_path)
    reloaded = AgillmForConditionalGeneration.from_pretrained(tmp_path).eval()
    for name in ("vision_config", "audio_config"):  # (loading records the dtype it loaded in: not compared)
        saved, loaded = getattr(config, name).to_dict(), getattr(reloaded.config, name).to_dict()
        assert type(getattr(reloaded.config, name)) is type(getattr(config, name))
        assert {k: v for k, v in loaded.items() if k != "dtype"} == {k: v for k, v in saved.items() if k != "dtype"}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)


def test_loss_backpropagates_into_both_towers(model):
    """The AR loss over text positions (placeholders labelled -100, as the processor's labels do) trains both
    encoders and their projectors through the merged features."""
    config = model.config
    torch.manual_seed(7)
    rows = [text(1) + image_run(config) + text(2, 3), text(4) + audio_run(config, 7) + text(5, 6, 7)]
    input_ids, attention_mask = left_padded(rows, config.pad_token_id)
    media_ids = [config.image_token_id, config.audio_token_id]
    labels = input_ids.masked_fill(torch.isin(input_ids, torch.tensor(media_ids)) | (attention_mask == 0), -100)
    model.train()
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                    pixel_values=random_images(config, 1), input_features=torch.randn(1, NUM_MEL_BINS, 7))
    expected_loss = F.cross_entropy(outputs.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(outputs.loss, expected_loss)
    assert math.isfinite(outputs.loss.item())
    outputs.loss.backward()
    for part in ("vision_tower", "multi_modal_projector", "audio_tower", "audio_projector"):
        for name, parameter in getattr(model.model, part).named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"{part}.{name} got no gradient"
