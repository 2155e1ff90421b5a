"""Shared fixtures of the AGILLM test suite: tiny configs, the shipped tokenizer and a saved, Hub-ready model folder.

Everything runs offline on CPU. Models are a few thousand parameters so that the whole suite stays in minutes on a
2-core machine; numerical checks use fp32 and seeded weights, so a failure is a behaviour change, not noise.
"""

import os
from pathlib import Path

import pytest


# Must be set before transformers is imported: the suite never touches the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from configuration_agillm import AgillmConfig  # noqa: E402
from modeling_agillm import AgillmForCausalLM  # noqa: E402
from processing_agillm import AgillmProcessor  # noqa: E402
from tokenizer import TOKENIZER_DIR  # noqa: E402


SHIPPED_VOCAB_SIZE = 8192  # ids of the shipped tokenizer; models that read real text need this vocab

# The smallest model that still exercises every code path: GQA (4 query heads, 2 kv heads, head_dim 8) and two
# layers, so that a per-layer setting (a NoPE layer, a sliding layer) always sits next to a plain one.
TINY_CONFIG_DEFAULTS = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def build_tiny_config(**overrides) -> AgillmConfig:
    """A tiny `AgillmConfig`; keyword arguments override `TINY_CONFIG_DEFAULTS` or set any other config field."""
    return AgillmConfig(**{**TINY_CONFIG_DEFAULTS, **overrides})


def build_tiny_model(seed: int = 0, **overrides) -> AgillmForCausalLM:
    """A seeded tiny `AgillmForCausalLM` in eval mode (fp32, sdpa attention unless overridden)."""
    torch.manual_seed(seed)
    return AgillmForCausalLM(build_tiny_config(**overrides)).eval()


class TinyRows(torch.utils.data.Dataset):
    """Eight rows of 12 ids in 4..63 (labels = inputs): a causal-LM training set small enough for `Trainer` tests."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        row = (torch.arange(12) * (index + 1)) % 60 + 4
        return {"input_ids": row, "labels": row}


def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Tiny models gain nothing from intra-op threads: a second thread costs more than it saves, and on a busy 2-core
# machine an OpenMP barrier can cost tens of milliseconds per op. Restored afterwards.
one_torch_thread = pytest.fixture(_one_torch_thread, name="one_torch_thread")  # per test
one_torch_thread_per_module = pytest.fixture(_one_torch_thread, scope="module", name="one_torch_thread_per_module")


@pytest.fixture(scope="module", autouse=True)
def no_module_patches_leak():
    """`kernels.enable()` swaps AGILLM classes in every model loaded afterwards: a test module that enables it must
    disable it again, or later files' remote-code models silently run the patched classes."""
    yield
    from transformers.monkey_patching import get_patch_mapping, unregister_patch_mapping

    leaked = [name for name in get_patch_mapping() if name.startswith("Agillm")]
    if leaked:
        unregister_patch_mapping(leaked)
        pytest.fail(f"module patches {leaked} were left registered (call kernels.disable())")


@pytest.fixture
def make_config():
    """Factory fixture: `make_config(**overrides) -> AgillmConfig`."""
    return build_tiny_config


@pytest.fixture
def make_model():
    """Factory fixture: `make_model(seed=0, **config_overrides) -> AgillmForCausalLM` in eval mode."""
    return build_tiny_model


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    return TOKENIZER_DIR


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    return AutoTokenizer.from_pretrained(tokenizer_path)


@pytest.fixture(scope="session")
def saved_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A Hub-ready folder: tiny causal LM (sliding + full layer, tied embeddings), code files, tokenizer, processor.

    The vocabulary is the shipped tokenizer's so that the folder works with `pipeline` and `AutoProcessor`.
    Session-scoped and read-only by convention: tests load from it and write anywhere else.
    """
    folder = tmp_path_factory.mktemp("agillm-tiny")
    model = build_tiny_model(
        seed=0,
        vocab_size=SHIPPED_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
        max_position_embeddings=256,
    )
    model.save_pretrained(folder)
    # The processor saves its tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja) with it.
    AgillmProcessor(tokenizer=tokenizer).save_pretrained(folder)
    return folder
