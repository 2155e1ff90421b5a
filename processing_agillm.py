# Copyright 2025 The AGILLM authors. Licensed under the Apache License, Version 2.0.
"""AgillmProcessor: one entry point that turns text, images and speech into AGILLM model inputs.

Modeled on transformers' multimodal processors (`processing_llava.py`, `processing_gemma3.py`,
`processing_qwen2_audio.py`): `ProcessorMixin.__call__` runs the sub-processors, expands every placeholder the text
holds into the model's feature count and tokenizes, with kwargs merged per modality (`_merge_kwargs`).

Placeholders: the text holds one `<|image|>` per image and one `<|audio|>` per clip, in the order the images / clips
are given. The processor expands them to

    <|image_start|> + <|image|> * image_seq_length + <|image_end|>
    <|audio_start|> + <|audio|> * ceil(valid_frames / audio_frames_per_token) + <|audio_end|>

where `valid_frames` counts the clip's own log-mel frames (not the padding of a batch of clips). Every `<|image|>` /
`<|audio|>` in the text stands for one item, so text that is already expanded fails the count check with a clear
error rather than being expanded twice. The boundary tokens (`<|image_start|>` ...) are ordinary text: a prompt may
end with `<|image_start|>` to ask for an image.

The image processor and the feature extractor are optional: with a tokenizer alone the processor is text-only and
tokenizes exactly as the tokenizer does (the form used by converted text models).
"""

import math

import numpy as np

from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import make_flat_list_of_images
from transformers.processing_utils import (
    MODALITY_TO_AUTOPROCESSOR_MAPPING,
    ProcessingKwargs,
    ProcessorMixin,
    _get_modality_for_attribute,
)


IMAGE_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN = "<|image|>", "<|image_start|>", "<|image_end|>"
AUDIO_TOKEN, AUDIO_START_TOKEN, AUDIO_END_TOKEN = "<|audio|>", "<|audio_start|>", "<|audio_end|>"
MEDIA_TOKENS = (IMAGE_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN, AUDIO_TOKEN, AUDIO_START_TOKEN, AUDIO_END_TOKEN)

# The shipped tokenizer's text-only ChatML (a copy of tokenizer/build_tokenizer.py's CHAT_TEMPLATE). A processor
# built on it uses `CHAT_TEMPLATE` instead; any other tokenizer (a converted model's) keeps its own template.
# `{% generation %}` marks an assistant turn's content and closing `<|im_end|>` (what the model writes, stop included)
# for `return_assistant_tokens_mask=True` / TRL's `assistant_only_loss`; the markers render nothing.
TEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The shipped tokenizer's template before it had generation markers (tokenizers saved then still get `CHAT_TEMPLATE`).
_UNMARKED_TEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# ChatML that renders string contents byte for byte as `TEXT_CHAT_TEMPLATE`, and list contents (transformers'
# multimodal chat format) item by item: text as is, each image as `<|image|>`, each audio clip as `<|audio|>`. The
# content goes through a macro so that the assistant branch can wrap it in `{% generation %}` without a second copy.
CHAT_TEMPLATE = (
    "{% macro render_content(content) %}"
    "{% if content is string %}{{ content }}"
    "{% else %}{% for item in content %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif item['type'] == 'audio' %}{{ '<|audio|>' }}"
    "{% else %}{{ raise_exception('AGILLM chat messages hold text, image and audio items, got ' + item['type']) }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{% endmacro %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ render_content(message['content']) + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ render_content(message['content']) + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The sub-processors a processor may lack (text-only, image-only or audio-only use).
OPTIONAL_SUB_PROCESSORS = ("image_processor", "feature_extractor")
# What `AgillmFeatureExtractor.__call__` takes from the merged audio kwargs: `_merge_kwargs` also copies the text
# side's `padding` / `truncation` / `max_length` there (they are valid audio kwargs in general), but the extractor
# always pads a batch of clips to its longest one and returns the frame mask the placeholder count needs.
FEATURE_EXTRACTOR_KWARGS = ("sampling_rate", "return_tensors")


class AgillmProcessorKwargs(ProcessingKwargs, total=False):
    """The kwargs `AgillmProcessor.__call__` takes: transformers' text / images / audio kwargs, merged per modality."""


class _SubProcessorNames:
    """`get_attributes` of a processor whose image processor and feature extractor are optional.

    `ProcessorMixin` discovers sub-processors from the `__init__` signature and expects every one of them. On the class
    (loading) this lists them all; on an instance only those it holds, so that `ProcessorMixin.__init__`'s checks and
    `save_pretrained` skip an absent one and a text-only processor saves and loads as before.
    """

    def __get__(self, instance, owner):
        every_name = ProcessorMixin.__dict__["get_attributes"].__get__(None, owner)
        if instance is None or "_present_sub_processors" not in instance.__dict__:
            return every_name
        present = list(instance.__dict__["_present_sub_processors"])
        return lambda: present


class AgillmProcessor(ProcessorMixin):
    r"""
    Combines an [`AgillmImageProcessor`], an [`AgillmFeatureExtractor`] and the AGILLM tokenizer (a
    `TokenizersBackend`) into one processor that `AutoProcessor` loads and `pipeline("image-text-to-text")` accepts.

    Args:
        image_processor (`AgillmImageProcessor`, *optional*): turns images into `pixel_values`; without it the
            processor refuses images.
        feature_extractor (`AgillmFeatureExtractor`, *optional*): turns mono waveforms into `input_features` and
            `feature_attention_mask`; without it the processor refuses audio.
        tokenizer: the text tokenizer (required).
        chat_template (`str`, *optional*): a Jinja chat template. Defaults to `CHAT_TEMPLATE` (ChatML with image and
            audio items) for AGILLM's own tokenizer, and to the tokenizer's template for any other.
        image_seq_length (`int`, *optional*, defaults to 16): `<|image|>` tokens per image; must equal the vision
            config's `num_image_tokens` (`(image_size // patch_size) ** 2`).
        audio_frames_per_token (`int`, *optional*, defaults to 4): log-mel frames behind one `<|audio|>` token; must
            equal the audio config's `frames_per_audio_token` (`conv_stride * frames_per_token`).
    """

    valid_processor_kwargs = AgillmProcessorKwargs
    get_attributes = _SubProcessorNames()

    def __init__(
        self,
        image_processor=None,
        feature_extractor=None,
        tokenizer=None,
        chat_template=None,
        image_seq_length: int = 16,
        audio_frames_per_token: int = 4,
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError("AgillmProcessor needs a tokenizer.")
        for name, value in (("image_seq_length", image_seq_length), ("audio_frames_per_token", audio_frames_per_token)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"AgillmProcessor: {name} must be a positive integer, got {value!r}")
        self.image_seq_length = image_seq_length
        self.audio_frames_per_token = audio_frames_per_token
        self._set_media_tokens(tokenizer, image_processor, feature_extractor)
        if chat_template is None:
            chat_template = _default_chat_template(tokenizer)

        sub_processors = {"image_processor": image_processor, "feature_extractor": feature_extractor,
                          "tokenizer": tokenizer}
        present = {name: value for name, value in sub_processors.items() if value is not None}
        self._present_sub_processors = list(present)
        super().__init__(**present, chat_template=chat_template, **kwargs)
        for name in OPTIONAL_SUB_PROCESSORS:  # absent ones read as None rather than raising AttributeError
            if name not in present:
                setattr(self, name, None)

    def _set_media_tokens(self, tokenizer, image_processor, feature_extractor) -> None:
        """Placeholder tokens and ids, from the tokenizer (a converted model's tokenizer may have none of them)."""
        vocab = tokenizer.get_vocab()
        missing = [token for token in MEDIA_TOKENS if token not in vocab]
        if missing and (image_processor is not None or feature_extractor is not None):
            raise ValueError(f"The tokenizer lacks the multimodal placeholder tokens {missing}; AgillmProcessor needs "
                             "them (AGILLM's tokenizer reserves them at ids 6-11) to take images or audio.")
        if missing:  # text-only processor: nothing to expand
            self.image_token = self.audio_token = None
            return
        self.image_token, self.image_start_token, self.image_end_token = IMAGE_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN
        self.audio_token, self.audio_start_token, self.audio_end_token = AUDIO_TOKEN, AUDIO_START_TOKEN, AUDIO_END_TOKEN
        self.image_token_id, self.audio_token_id = vocab[IMAGE_TOKEN], vocab[AUDIO_TOKEN]

    # ------------------------------------------------------------------------------------------------ __call__

    def __call__(self, text=None, images=None, audio=None, **kwargs) -> BatchFeature:
        """
        Build model inputs.

        Args:
            text (`str` or `list[str]`): prompts with one `<|image|>` per image and one `<|audio|>` per clip.
            images: PIL images, NumPy arrays or torch tensors (or paths/URLs), flat in order of appearance over the
                batch, or nested as one list per prompt.
            audio: mono waveforms (1-D NumPy arrays), flat or nested like `images`. Pass `sampling_rate=` when they
                are not at the feature extractor's rate (16 kHz): they are resampled.
            **kwargs: per-modality options, flat (`padding_side="left"`, `return_tensors="pt"`, `sampling_rate=`) or
                as `text_kwargs={...}` / `images_kwargs={...}` / `audio_kwargs={...}`.

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask`, plus `pixel_values` [n_images, 3, H, W] with images
            and `input_features` [n_clips, n_mels, frames] + `feature_attention_mask` [n_clips, frames] with audio.
            Text alone is tokenized exactly as the tokenizer does (a single string stays unbatched).
        """
        if kwargs.get("videos") is not None:
            raise ValueError("AgillmProcessor takes text, images and audio, not videos.")
        kwargs.pop("videos", None)
        if images is None and audio is None:
            return self._call_text_only(text, **kwargs)
        self._check_sub_processors(images, audio)
        self._check_counts_per_sample(text, images, audio)
        return super().__call__(images=images, text=text, audio=audio, **kwargs)

    def _call_text_only(self, text, **kwargs) -> BatchFeature:
        if text is None:
            raise ValueError("AgillmProcessor needs text, images or audio.")
        self.validate_inputs(text=[text] if isinstance(text, str) else text)  # placeholders need their media
        text_kwargs = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)["text_kwargs"]
        for key in ("return_mm_token_type_ids", "return_text_replacement_offsets"):  # no placeholders to report
            text_kwargs.pop(key, None)
        # A BatchFeature as `ProcessorMixin.__call__` returns (pipelines call `.to(dtype=...)` on it).
        return BatchFeature(dict(self.tokenizer(text, **text_kwargs)))

    def _check_sub_processors(self, images, audio) -> None:
        if images is not None and self.image_processor is None:
            raise ValueError("AgillmProcessor got images but has no image processor: build it with "
                             "`image_processor=AgillmImageProcessor()`.")
        if audio is not None and self.feature_extractor is None:
            raise ValueError("AgillmProcessor got audio but has no feature extractor: build it with "
                             "`feature_extractor=AgillmFeatureExtractor()`.")

    def _check_counts_per_sample(self, text, images, audio) -> None:
        """Nested media (one list per prompt) must match each prompt's own placeholders; flat media are checked in
        total by `ProcessorMixin.validate_inputs`."""
        if text is None:
            return
        texts = [text] if isinstance(text, str) else list(text)
        for media, token, name in ((images, self.image_token, "images"), (audio, self.audio_token, "audio clips")):
            if not _is_nested(media):
                continue
            if len(media) != len(texts):
                raise ValueError(f"Got {name} nested in {len(media)} lists for {len(texts)} prompts: nest them one "
                                 "list per prompt, or pass them flat in order of appearance.")
            in_text = [sample.count(token) for sample in texts]
            given = [len(items) for items in media]
            if in_text != given:
                raise ValueError(f"Each prompt needs one {token} per item: the prompts hold {in_text} {token} "
                                 f"placeholders but got {given} {name} per prompt.")

    def _process_images(self, images, **kwargs):
        # Nested (per-prompt) images are flattened: `pixel_values` hold them in order of appearance over the batch.
        return super()._process_images(make_flat_list_of_images(images), **kwargs)

    def _process_audio(self, audio, **kwargs):
        extractor_kwargs = {key: kwargs[key] for key in FEATURE_EXTRACTOR_KWARGS if key in kwargs}
        audio_inputs = self.feature_extractor(audio, return_attention_mask=True, **extractor_kwargs)
        # The decoder's attention_mask is the tokenizer's; the frame mask travels under its own name.
        audio_inputs["feature_attention_mask"] = audio_inputs.pop("attention_mask")
        replacements = [self.replace_audio_token(audio_inputs, audio_idx=index) for index in range(len(audio))]
        return audio_inputs, replacements

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_start_token + self.image_token * self.image_seq_length + self.image_end_token

    def replace_audio_token(self, audio_inputs: dict, audio_idx: int, **kwargs) -> str:
        valid_frames = int(np.asarray(audio_inputs["feature_attention_mask"][audio_idx]).sum())
        return self.audio_start_token + self.audio_token * self.num_audio_tokens(valid_frames) + self.audio_end_token

    def num_audio_tokens(self, num_frames: int) -> int:
        """`<|audio|>` tokens for a clip of `num_frames` log-mel frames (the model's `num_audio_tokens`)."""
        return math.ceil(num_frames / self.audio_frames_per_token)

    # -------------------------------------------------------------------------------------------- save / load

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """Load the sub-processors the saved processor had: a text-only folder has no image or audio config."""
        processor_dict = processor_dict or {}
        subfolder = kwargs.pop("subfolder", "")
        args = []
        for name in cls.get_attributes():
            if name in OPTIONAL_SUB_PROCESSORS and not processor_dict.get(name):
                args.append(None)
            elif _get_modality_for_attribute(name) == "tokenizer":
                args.append(cls._load_tokenizer_from_pretrained(name, pretrained_model_name_or_path,
                                                                subfolder=subfolder, **kwargs))
            else:
                auto_class = MODALITY_TO_AUTOPROCESSOR_MAPPING[name]
                args.append(auto_class.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs))
        return args

    @property
    def model_input_names(self) -> list[str]:
        names = list(self.tokenizer.model_input_names)
        if self.image_processor is not None:
            names += self.image_processor.model_input_names
        if self.feature_extractor is not None:
            names += ["input_features", "feature_attention_mask"]
        return list(dict.fromkeys(names))


def _default_chat_template(tokenizer) -> str | None:
    own_template = getattr(tokenizer, "chat_template", None)
    return CHAT_TEMPLATE if own_template in (TEXT_CHAT_TEMPLATE, _UNMARKED_TEXT_CHAT_TEMPLATE) else own_template


def _is_nested(media) -> bool:
    return isinstance(media, list | tuple) and len(media) > 0 and all(isinstance(m, list | tuple) for m in media)


AgillmProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["AgillmProcessor"]
