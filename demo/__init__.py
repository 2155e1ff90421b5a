"""The AGILLM main job (`python -m demo`, `make demo`).

Three parts, each skippable from the command line (`python -m demo --help`):

1. `smollm2_chat`: convert the real SmolLM2-135M-Instruct into an AGILLM Hub-ready folder, then load that folder
   in a fresh Python process that cannot import this repository (`chat_in_fresh_process`) and chat with it
   through `pipeline("text-generation")`.
2. `pretrain_shakespeare`: pre-train a small AGILLM with AR, SAT and NAT heads from scratch on Shakespeare with
   `Trainer` + `datasets` on CPU, report each head's held-out loss and the AR perplexity before and after, plot
   the loss curves and save a Hub-ready folder (the model `python -m bench decoding` measures).
3. `multimodal`: train one small AGILLM that reads digits and emoji from images and digits from speech (held-out
   voices) and draws digits as VQ image tokens (`vqvae` trains the image tokenizer first); report held-out
   accuracies and save example images. Needs `make data-multimodal` (npm and Debian packages, fetched once).

Everything runs offline: the model weights and the corpus come from installed packages.

`python -m demo.pretrain --text FILE_OR_DIR...` (or `--dataset NAME_OR_PATH`) runs the pre-training of part 2 on your
own text instead; `python -m tokenizer.build_tokenizer --text ... --output-dir DIR` trains a tokenizer on it first.
"""
