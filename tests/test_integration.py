"""AGILLM inside the transformers ecosystem: save/load, Hub remote code, pipeline, PEFT, Trainer, bitsandbytes.

Models are tiny and random, so the checks compare paths against each other (saved vs in memory, remote vs local,
batched vs alone, quantized vs fp32) rather than against text quality.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import pipeline

from modeling_agillm import (
    AgillmForCausalLM,
    AgillmForQuestionAnswering,
    AgillmForSequenceClassification,
    AgillmForTokenClassification,
    AgillmModel,
)


def random_ids(vocab_size: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("tie_word_embeddings", [True, False], ids=["tied", "untied"])
def test_save_load_round_trip(make_model, tmp_path, tie_word_embeddings):
    model = make_model(tie_word_embeddings=tie_word_embeddings, layer_types=["sliding_attention", "full_attention"],
                       sliding_window=4, use_qk_norm=True)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie_word_embeddings
    input_ids = random_ids(model.config.vocab_size, (2, 10))
    with torch.no_grad():
        expected = model(input_ids).logits

    model.save_pretrained(tmp_path)
    loaded = AgillmForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        logits = loaded(input_ids).logits

    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert loaded.config.tie_word_embeddings is tie_word_embeddings
    shares_storage = loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert shares_storage is tie_word_embeddings
    with safe_open(tmp_path / "model.safetensors", framework="pt") as checkpoint:
        assert ("lm_head.weight" in checkpoint.keys()) is not tie_word_embeddings  # tied: stored once
    if not tie_word_embeddings:
        assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
        assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)


# --------------------------------------------------------------------------------------------- remote code

# Runs in a fresh interpreter that cannot see this repository: it must load everything from the saved folders.
REMOTE_LOAD_SCRIPT = r"""
import importlib.util, json, sys
import torch
import transformers

folders, input_ids = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2]))
text, output_path = sys.argv[3], sys.argv[4]
for module in ("configuration_agillm", "modeling_agillm", "processing_agillm"):
    assert importlib.util.find_spec(module) is None, f"{module} is importable: the repository leaked onto sys.path"

results = {"classes": {}, "outputs": {}}
config = transformers.AutoConfig.from_pretrained(folders["AutoModelForCausalLM"], trust_remote_code=True)
results["classes"]["AutoConfig"] = f"{type(config).__module__}.{type(config).__name__}"
for auto_class, folder in folders.items():
    model = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True).eval()
    results["classes"][auto_class] = f"{type(model).__module__}.{type(model).__name__}"
    with torch.no_grad():
        outputs = model(input_ids)
    results["outputs"][auto_class] = {key: value for key, value in outputs.items() if key != "past_key_values"}

tokenizer = transformers.AutoTokenizer.from_pretrained(folders["AutoModelForCausalLM"], trust_remote_code=True)
processor = transformers.AutoProcessor.from_pretrained(folders["AutoModelForCausalLM"], trust_remote_code=True)
results["classes"]["AutoProcessor"] = f"{type(processor).__module__}.{type(processor).__name__}"
results["tokenizer_ids"] = tokenizer(text)["input_ids"]
results["processor_ids"] = processor(text=text)["input_ids"]
results["chat"] = processor.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)
torch.save(results, output_path)
"""

# Head classes and their in-process twins; the heads are saved from the causal-LM folder with fresh task layers.
REMOTE_CLASSES = {
    "AutoModel": AgillmModel,
    "AutoModelForCausalLM": AgillmForCausalLM,
    "AutoModelForSequenceClassification": AgillmForSequenceClassification,
    "AutoModelForTokenClassification": AgillmForTokenClassification,
    "AutoModelForQuestionAnswering": AgillmForQuestionAnswering,
}


def save_task_heads(saved_model_dir, root) -> dict[str, str]:
    """One Hub-ready folder per auto class: the causal-LM folder itself, plus each head saved on top of its trunk."""
    folders = {"AutoModelForCausalLM": str(saved_model_dir)}
    for auto_class, model_class in REMOTE_CLASSES.items():
        if auto_class != "AutoModelForCausalLM":
            torch.manual_seed(0)
            model_class.from_pretrained(saved_model_dir, num_labels=3).save_pretrained(root / auto_class)
            folders[auto_class] = str(root / auto_class)
    return folders


def run_isolated(script: str, args: list[str], cwd) -> None:
    """Run `script` in a fresh interpreter that sees neither this repository nor its environment overrides."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "hf_modules"))
    # -I: isolated mode (no script dir or cwd on sys.path, PYTHON* variables and user site-packages ignored)
    completed = subprocess.run(
        [sys.executable, "-I", "-c", script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, f"isolated load failed:\n{completed.stderr[-4000:]}"


def test_remote_code_load_in_fresh_process(saved_model_dir, tokenizer, tmp_path):
    folders = save_task_heads(saved_model_dir, tmp_path)
    input_ids = random_ids(tokenizer.vocab_size, (2, 12))
    text = "To be, or not to be: that is the question."
    output_path = tmp_path / "remote.pt"
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    run_isolated(REMOTE_LOAD_SCRIPT, [json.dumps(folders), json.dumps(input_ids.tolist()), text, str(output_path)],
                 cwd=workdir)
    remote = torch.load(output_path)

    # Everything came from the folders' own code files, loaded as a `transformers_modules` package.
    for name, qualified_name in remote["classes"].items():
        assert qualified_name.startswith("transformers_modules."), f"{name} loaded {qualified_name}"
    assert remote["classes"]["AutoConfig"].endswith(".configuration_agillm.AgillmConfig")
    assert remote["classes"]["AutoProcessor"].endswith(".processing_agillm.AgillmProcessor")
    for auto_class, model_class in REMOTE_CLASSES.items():
        assert remote["classes"][auto_class].endswith(f".modeling_agillm.{model_class.__name__}")

    # Same numbers as the in-process classes on the same folders.
    for auto_class, model_class in REMOTE_CLASSES.items():
        local = model_class.from_pretrained(folders[auto_class]).eval()
        with torch.no_grad():
            expected = local(input_ids)
        remote_outputs = remote["outputs"][auto_class]
        assert remote_outputs.keys() == {key for key in expected.keys() if key != "past_key_values"}
        for key, value in remote_outputs.items():
            torch.testing.assert_close(value, expected[key], msg=lambda m: f"{auto_class}.{key}: {m}")

    assert remote["tokenizer_ids"] == tokenizer(text)["input_ids"]
    assert remote["processor_ids"] == remote["tokenizer_ids"]
    assert remote["chat"] == tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    assert remote["chat"].endswith("<|im_start|>assistant\n")


# --------------------------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def text_generator(saved_model_dir):
    return pipeline("text-generation", model=str(saved_model_dir), trust_remote_code=True)


def greedy_new_ids(model, input_ids: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([input_ids])
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens)
    return generated[0, len(input_ids) :].tolist()


def test_pipeline_plain_text_matches_generate(text_generator):
    prompt = "Now is the winter of our discontent"
    output = text_generator(prompt, max_new_tokens=8, do_sample=False, return_tensors=True)
    prompt_ids = text_generator.tokenizer(prompt)["input_ids"]
    expected_new_ids = greedy_new_ids(text_generator.model, prompt_ids, new_tokens=8)

    assert output[0]["generated_token_ids"] == prompt_ids + expected_new_ids
    text = text_generator(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text == prompt + text_generator.tokenizer.decode(expected_new_ids, skip_special_tokens=True)


def test_pipeline_chat_messages_use_chat_template(text_generator):
    messages = [{"role": "user", "content": "Who is there?"}]
    output = text_generator(messages, max_new_tokens=6, do_sample=False)
    conversation = output[0]["generated_text"]

    prompt_ids = text_generator.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert text_generator.tokenizer.convert_ids_to_tokens(prompt_ids[:1]) == ["<|im_start|>"]
    expected_reply = text_generator.tokenizer.decode(
        greedy_new_ids(text_generator.model, prompt_ids, new_tokens=6), skip_special_tokens=True
    )
    assert conversation[:-1] == messages
    assert conversation[-1] == {"role": "assistant", "content": expected_reply}


def test_pipeline_padded_batch_matches_single_prompts(text_generator):
    prompts = ["Friends,", "Romans, countrymen, lend me your ears;", "I come to bury Caesar"]
    batched = text_generator(prompts, batch_size=3, max_new_tokens=6, do_sample=False)
    assert text_generator.tokenizer.padding_side == "left"
    for prompt, result in zip(prompts, batched):
        alone = text_generator(prompt, max_new_tokens=6, do_sample=False)
        assert result[0]["generated_text"] == alone[0]["generated_text"]


# --------------------------------------------------------------------------------------------- PEFT

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_lora_training_save_load_and_merge(make_model, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    lora_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(make_model(seed=0), lora_config)
    input_ids = random_ids(peft_model.config.vocab_size, (2, 10))
    before = {name: param.detach().clone() for name, param in peft_model.named_parameters()}
    trainable = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)

    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # lora_B starts at zero, so lora_A only gets a gradient from the second step on
        optimizer.zero_grad()
        peft_model(input_ids, labels=input_ids).loss.backward()
        optimizer.step()

    for name, param in peft_model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), f"adapter {name} did not train"
        else:
            assert torch.equal(param, before[name]), f"base weight {name} changed"

    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids).logits
    assert (adapted - base).abs().max() > 1e-3, "the trained adapter has no effect"

    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(make_model(seed=0), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, adapted, rtol=0, atol=0)

    merged = reloaded.merge_and_unload()
    assert isinstance(merged, AgillmForCausalLM)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, adapted, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------- Trainer


def shakespeare_blocks(tokenizer, text: str, block_size: int, num_blocks: int) -> list[list[int]]:
    ids = tokenizer(text)["input_ids"]
    assert len(ids) >= block_size * num_blocks, "not enough text for the requested blocks"
    return [ids[i * block_size : (i + 1) * block_size] for i in range(num_blocks)]


def test_trainer_lowers_loss(make_model, tokenizer, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from corpus.shakespeare import train_and_held_out

    train_texts, held_out_texts = train_and_held_out()
    train_blocks = shakespeare_blocks(tokenizer, train_texts[0][:40_000], block_size=32, num_blocks=64)
    eval_blocks = shakespeare_blocks(tokenizer, held_out_texts[0][:10_000], block_size=32, num_blocks=16)
    train_set = Dataset.from_dict({"input_ids": train_blocks, "labels": train_blocks})
    eval_set = Dataset.from_dict({"input_ids": eval_blocks, "labels": eval_blocks})

    model = make_model(seed=0, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128).train()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=24,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=3e-3,
        warmup_steps=0,
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set)
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]

    train_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert train_losses[-1] < train_losses[0]
    # Held-out loss must fall well below the random-init level (~ln(8192) = 9.0), not just wiggle.
    assert loss_after < loss_before - 1.0, f"held-out loss {loss_before:.3f} -> {loss_after:.3f}"
    assert not any(path.suffix in {".safetensors", ".bin"} for path in tmp_path.rglob("*")), "Trainer saved weights"


# --------------------------------------------------------------------------------------------- bitsandbytes

QUANTIZATION = {
    # (config kwargs, expected bitsandbytes layer class, min cosine to fp32 logits, min top-1 agreement);
    # observed on the tiny saved model: 4-bit cosine >= 0.978, top-1 0.97; 8-bit cosine >= 0.9999, top-1 1.0.
    "4bit": ({"load_in_4bit": True}, "Linear4bit", 0.9, 0.8),
    "8bit": ({"load_in_8bit": True}, "Linear8bitLt", 0.99, 0.9),
}


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@pytest.mark.parametrize("bits", QUANTIZATION.keys())
def test_bitsandbytes_quantized_model_runs_close_to_fp32(saved_model_dir, bits):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    quant_kwargs, layer_class, min_cosine, min_top1 = QUANTIZATION[bits]
    reference = AgillmForCausalLM.from_pretrained(saved_model_dir).eval()
    quantized = AgillmForCausalLM.from_pretrained(
        saved_model_dir, quantization_config=BitsAndBytesConfig(**quant_kwargs)
    ).eval()

    projections = [module for name, module in quantized.named_modules() if name.endswith(tuple(LORA_TARGETS))]
    assert len(projections) == 7 * quantized.config.num_hidden_layers
    assert all(isinstance(module, getattr(bnb.nn, layer_class)) for module in projections)

    input_ids = random_ids(quantized.config.vocab_size, (2, 16))
    with torch.no_grad():
        expected = reference(input_ids).logits
        logits = quantized(input_ids).logits
    cosine = torch.nn.functional.cosine_similarity(logits.flatten(0, 1), expected.flatten(0, 1), dim=-1)
    top1 = (logits.argmax(-1) == expected.argmax(-1)).float().mean()
    assert cosine.min() > min_cosine, f"{bits}: cosine to fp32 logits {cosine.min():.4f}"
    assert top1 >= min_top1, f"{bits}: top-1 agreement with fp32 {top1:.3f}"

    generated = quantized.generate(
        input_ids[:1, :5], attention_mask=torch.ones(1, 5, dtype=torch.long), do_sample=False,
        max_new_tokens=5, min_new_tokens=5,
    )
    assert generated.shape == (1, 10)
    assert torch.equal(generated[:, :5], input_ids[:1, :5])
