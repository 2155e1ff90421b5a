"""Train the AGILLM byte-level BPE tokenizer on the Shakespeare corpus and save it next to this file.

    python -m tokenizer.build_tokenizer      # rewrites tokenizer/tokenizer.json, tokenizer_config.json, ...

The special tokens of the whole roadmap are reserved now, at fixed ids, so later features (NAT mask, chat,
image/audio placeholders and boundaries) never shift ids of a trained model. Training is deterministic for a
given corpus and `tokenizers` version; the result ships in the repository, so nothing is trained at run time.
"""


from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from corpus.shakespeare import load_plays
from tokenizer import TOKENIZER_DIR

VOCAB_SIZE = 8192

# Fixed ids 0..31. Names follow the ChatML / Qwen convention so chat templates read naturally.
SPECIAL_TOKENS = [
    "<|pad|>",  # 0: padding
    "<|bos|>",  # 1: beginning of a document
    "<|eos|>",  # 2: end of a document
    "<|mask|>",  # 3: NAT / masked-diffusion mask
    "<|im_start|>",  # 4: chat turn start
    "<|im_end|>",  # 5: chat turn end
    "<|image|>",  # 6: one image-feature placeholder
    "<|image_start|>",  # 7
    "<|image_end|>",  # 8
    "<|audio|>",  # 9: one audio-feature placeholder
    "<|audio_start|>",  # 10
    "<|audio_end|>",  # 11
] + [f"<|reserved_{i}|>" for i in range(20)]  # 12..31: kept free for later heads and modalities

# ChatML. `{% generation %}` marks what the model writes in an assistant turn (its content and the closing
# `<|im_end|>`, so it learns to stop): `apply_chat_template(..., return_assistant_tokens_mask=True)` returns it as
# `assistant_masks`, which TRL's `SFTConfig(assistant_only_loss=True)` trains on. The markers render nothing.
# processing_agillm.TEXT_CHAT_TEMPLATE is a copy (remote code cannot import this file); tests keep them equal.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is representable: no unknown token
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        mask_token="<|mask|>",
        additional_special_tokens=SPECIAL_TOKENS[4:12],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def main() -> None:
    tokenizer = train_tokenizer(list(load_plays().values()))
    tokenizer.save_pretrained(TOKENIZER_DIR)
    print(f"saved a {len(tokenizer)}-token tokenizer to {TOKENIZER_DIR}")


if __name__ == "__main__":
    main()
