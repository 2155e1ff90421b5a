"""Train the AGILLM byte-level BPE tokenizer: the shipped one on Shakespeare, or one on the user's own text.

    python -m tokenizer.build_tokenizer      # rewrites the shipped tokenizer/tokenizer.json, tokenizer_config.json
    python -m tokenizer.build_tokenizer --text my_corpus/ --vocab-size 4096 --output-dir my_tokenizer
    python -m tokenizer.build_tokenizer --dataset my_saved_dataset --text-column body --output-dir my_tokenizer

The special tokens of the whole roadmap are reserved now, at fixed ids, so later features (NAT mask, chat,
image/audio placeholders and boundaries) never shift ids of a trained model; a tokenizer trained on other text keeps
them, and the chat template, so the model code and config defaults work with it unchanged. Training is deterministic
for a given corpus and `tokenizers` version; the shipped result is in the repository, so nothing is trained at run
time. User data is read by `corpus.user_data` (text files and folders, or any dataset `datasets` loads offline).
"""

import os


if __name__ == "__main__":  # offline unless the environment says otherwise; read once, at the Hugging Face imports
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
from collections.abc import Iterable  # noqa: E402
from pathlib import Path  # noqa: E402

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from corpus import user_data  # noqa: E402
from corpus.shakespeare import load_plays  # noqa: E402
from tokenizer import TOKENIZER_DIR  # noqa: E402

VOCAB_SIZE = 8192
BYTE_ALPHABET_SIZE = 256  # byte-level BPE starts from one token per byte
TRAINING_BATCH_DOCUMENTS = 1000  # documents handed to the trainer at a time, when they come from a dataset

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


def smallest_vocab_size() -> int:
    """The reserved special tokens plus the 256 bytes: a vocabulary with no merge at all."""
    return len(SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE


def train_tokenizer(texts: Iterable[str] | Iterable[list[str]], vocab_size: int = VOCAB_SIZE,
                    length: int | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of at most `vocab_size` ids trained on `texts` (strings, or batches of them;
    `length` is their number, for progress only), with `SPECIAL_TOKENS` at ids 0..31 and the ChatML template.

    The vocabulary is smaller than `vocab_size` when the text has fewer distinct merges to learn.
    """
    if vocab_size < smallest_vocab_size():
        raise ValueError(f"vocab_size must be at least {smallest_vocab_size()} ({len(SPECIAL_TOKENS)} reserved "
                         f"special tokens + {BYTE_ALPHABET_SIZE} bytes), got {vocab_size}")  # fmt: skip
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is representable: no unknown token
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    if [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError("the BPE trainer did not put the reserved special tokens at ids 0..31")
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


def train_tokenizer_on_documents(documents, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """`train_tokenizer` on a `datasets.Dataset` of documents (a `text` column), streamed in batches."""
    batches = (batch["text"] for batch in documents.iter(batch_size=TRAINING_BATCH_DOCUMENTS))
    return train_tokenizer(batches, vocab_size, length=len(documents))


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tokenizer.build_tokenizer",
        description="Train the AGILLM byte-level BPE tokenizer (reserved special tokens at ids 0..31, ChatML chat "
        "template). Without --text or --dataset: the shipped tokenizer, on Shakespeare, into tokenizer/.",
    )
    user_data.add_data_arguments(parser, required=False)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE,
                        help=f"at most this many ids (default: {VOCAB_SIZE}; at least {smallest_vocab_size()})")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="the folder to write; required with --text or --dataset (default: the shipped "
                             "tokenizer/)")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.vocab_size < smallest_vocab_size():
        parser.error(f"--vocab-size must be at least {smallest_vocab_size()} ({len(SPECIAL_TOKENS)} reserved special "
                     f"tokens + {BYTE_ALPHABET_SIZE} bytes), got {args.vocab_size}")  # fmt: skip
    own_data = args.text is not None or args.dataset is not None
    if own_data and args.output_dir is None:
        parser.error("--output-dir is required with --text or --dataset (so the shipped tokenizer is not overwritten)")
    return args


def main(argv=None) -> None:
    parser = argument_parser()
    args = parse_args(parser, argv)
    if args.text is None and args.dataset is None:
        tokenizer = train_tokenizer(list(load_plays().values()), args.vocab_size)
    else:
        try:
            documents = user_data.documents_from_args(args)
        except ValueError as error:
            parser.error(str(error))  # exits
        tokenizer = train_tokenizer_on_documents(documents, args.vocab_size)
    output_dir = args.output_dir or TOKENIZER_DIR
    tokenizer.save_pretrained(output_dir)
    note = "" if len(tokenizer) == args.vocab_size else f" (asked for {args.vocab_size}: the text has no more merges)"
    print(f"saved a {len(tokenizer)}-token tokenizer to {output_dir}{note}")


if __name__ == "__main__":
    main()
