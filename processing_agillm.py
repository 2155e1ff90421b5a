"""AgillmProcessor: one entry point that turns user input into model input.

Text-only for now: it wraps the tokenizer and its chat template. The image and audio sub-processors of the
multimodal roadmap slot in as extra `__init__` arguments (`image_processor=None, feature_extractor=None`), which is
how `ProcessorMixin` discovers sub-processors; the placeholder tokens they expand (`<|image|>`, `<|audio|>` and
their boundaries) are already reserved in the tokenizer at fixed ids.
"""

from transformers.processing_utils import ProcessorMixin


class AgillmProcessor(ProcessorMixin):
    r"""
    Wraps an AGILLM tokenizer (a `TokenizersBackend`, loadable with `AutoTokenizer`) into a processor that
    `AutoProcessor` loads and `pipeline` accepts.

    Args:
        tokenizer: the text tokenizer.
        chat_template (`str`, *optional*): a Jinja chat template; defaults to the tokenizer's.
    """

    def __init__(self, tokenizer=None, chat_template=None, **kwargs):
        if tokenizer is None:
            raise ValueError("AgillmProcessor needs a tokenizer.")
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(tokenizer, chat_template=chat_template, **kwargs)

    def __call__(self, text=None, **kwargs):
        """Tokenize `text` (a string or a batch of strings); keyword arguments go to the tokenizer."""
        if text is None:
            raise ValueError("AgillmProcessor needs `text` (images and audio arrive with the multimodal processor).")
        return self.tokenizer(text, **kwargs)

    @property
    def model_input_names(self):
        return list(self.tokenizer.model_input_names)


AgillmProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["AgillmProcessor"]
