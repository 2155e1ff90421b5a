"""The AGILLM byte-level BPE tokenizer: files in this folder, built by `build_tokenizer.py`."""
