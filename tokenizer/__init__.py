"""The AGILLM byte-level BPE tokenizer: files in this folder, built by `build_tokenizer.py`."""

from pathlib import Path

# Load with `AutoTokenizer.from_pretrained(TOKENIZER_DIR)`.
TOKENIZER_DIR = Path(__file__).resolve().parent
