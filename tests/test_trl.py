"""TRL (issue 11): `SFTTrainer` and `DPOTrainer` with their defaults on tiny AGILLM models and the shipped tokenizer.

Covers the three things TRL relies on: a dense config carries no router-loss coefficient (TRL turns on router logits
and Mixtral's balancing loss for any config with a non-zero one), the chat template marks assistant turns with
`{% generation %}` (`assistant_only_loss=True`) without changing a rendered byte, and what TRL's SFT loss is: the AR
head's next-token loss through TRL's fused LM head, never the model's own multi-objective loss (SAT / NAT / MTP),
which a subclass using `Trainer.compute_loss` trains instead.

Everything is in memory (literal Hamlet lines; the SmolLM2 tokenizer from its GGUF), on CPU, a few optimizer steps per
trainer: about 40 s on 2 cores.
"""

import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, Trainer
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from configuration_agillm import AgillmConfig
from convert import smollm2
from convert.smollm2 import smollm2_gguf_path
from conftest import SHIPPED_VOCAB_SIZE, build_tiny_model
from image_processing_agillm import AgillmImageProcessor
from moe_agillm import router_losses
from processing_agillm import _UNMARKED_TEXT_CHAT_TEMPLATE as UNMARKED_TEMPLATE
from processing_agillm import CHAT_TEMPLATE, TEXT_CHAT_TEMPLATE, AgillmProcessor
from tokenizer import TOKENIZER_DIR
from tokenizer.build_tokenizer import CHAT_TEMPLATE as BUILD_CHAT_TEMPLATE


MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16}

CHATS = [
    [{"role": "user", "content": "Who's there?"}, {"role": "assistant", "content": "Nay, answer me."}],
    [{"role": "system", "content": "Answer in verse."}, {"role": "user", "content": "Long live the king!"},
     {"role": "assistant", "content": "Bernardo?"}, {"role": "user", "content": "He."},
     {"role": "assistant", "content": "You come most carefully upon your hour."}],
    [{"role": "user", "content": "'Tis now struck twelve."}, {"role": "assistant", "content": "Get thee to bed."}],
    [{"role": "user", "content": "Have you had quiet guard?"},
     {"role": "assistant", "content": "Not a mouse stirring."}],
]
PREFERENCES = {
    "prompt": [[{"role": "user", "content": "Who's there?"}],
               [{"role": "user", "content": "Have you had quiet guard?"}]],
    "chosen": [[{"role": "assistant", "content": "Nay, answer me."}],
               [{"role": "assistant", "content": "Not a mouse stirring."}]],
    "rejected": [[{"role": "assistant", "content": "Bernardo."}], [{"role": "assistant", "content": "Good night."}]],
}


@pytest.fixture
def tokenizer():
    """A fresh copy per test: the trainers set attributes (pad token, padding side) on the tokenizer they get."""
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def trl_model(**overrides):
    return build_tiny_model(seed=0, vocab_size=SHIPPED_VOCAB_SIZE, max_position_embeddings=128, **overrides).train()


def train_args(config_class, tmp_path, **overrides):
    """TRL's defaults except what a CPU test needs: a few steps, short sequences, no reporting, a temp folder."""
    fields = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2, max_length=64,
                  learning_rate=1e-3, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no")
    return config_class(**{**fields, **overrides})


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.named_parameters()}


def changed(before: dict, model) -> set[str]:
    return {name for name, value in model.named_parameters() if not torch.equal(before[name], value.detach())}


# ----------------------------------------------------------------------------------------------- router losses


def test_dense_configs_carry_no_router_loss_coefficient():
    assert AgillmConfig().router_aux_loss_coef == 0.0 and AgillmConfig().router_z_loss_coef == 0.0
    # A saved dense config that still carries the old default loads without one.
    loaded = AgillmConfig.from_dict({**AgillmConfig().to_dict(), "router_aux_loss_coef": 0.001})
    assert loaded.router_aux_loss_coef == 0.0
    # Experts only in MTP layers: no decoder layer routes, so the trunk records no router logits either.
    assert AgillmConfig(**MOE, mlp_layer_types=["dense"] * 2, num_hidden_layers=2).router_aux_loss_coef == 0.0
    moe = AgillmConfig(**MOE, router_z_loss_coef=0.01)
    assert (moe.router_aux_loss_coef, moe.router_z_loss_coef) == (0.001, 0.01)


def test_dense_model_asked_for_router_logits_adds_no_loss():
    model = build_tiny_model().train()
    model.config.output_router_logits = True  # what TRL sets on an MoE config; here on a dense one
    input_ids = torch.randint(32, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with_flag = model(input_ids=input_ids, labels=input_ids, output_router_logits=True)
    plain = model(input_ids=input_ids, labels=input_ids, output_router_logits=False)
    assert with_flag.router_logits == () and with_flag.aux_loss is None
    torch.testing.assert_close(with_flag.loss, plain.loss)
    balance, z_loss = router_losses((), (), num_experts=4, sigmoid_scores=False, attention_mask=torch.ones(2, 10))
    assert balance.item() == 0.0 and z_loss.item() == 0.0


# ----------------------------------------------------------------------------------------------- chat template


def test_chat_template_copies_agree_and_render_as_before(tokenizer):
    assert tokenizer.chat_template == TEXT_CHAT_TEMPLATE == BUILD_CHAT_TEMPLATE
    assert (TOKENIZER_DIR / "chat_template.jinja").read_text() == BUILD_CHAT_TEMPLATE
    processor = AgillmProcessor(tokenizer=tokenizer)
    assert processor.chat_template == CHAT_TEMPLATE
    # A tokenizer saved with the template before the markers still gets the multimodal one.
    old = AutoTokenizer.from_pretrained(TOKENIZER_DIR, chat_template=UNMARKED_TEMPLATE)
    assert AgillmProcessor(tokenizer=old).chat_template == CHAT_TEMPLATE
    conversations = [*CHATS, [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}],
                     [{"role": "assistant", "content": " Speak to it, Horatio.\n\n"}]]
    for conversation in conversations:
        for add_generation_prompt in (False, True):
            settings = dict(tokenize=False, add_generation_prompt=add_generation_prompt)
            before = tokenizer.apply_chat_template(conversation, chat_template=UNMARKED_TEMPLATE, **settings)
            assert before == tokenizer.apply_chat_template(conversation, **settings)
            assert before == processor.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)


def expected_assistant_mask(tokenizer, conversation, preamble: str = "") -> list[int]:
    """1 on each assistant turn's content and closing `<|im_end|>`, found by tokenizing the rendered prefixes.

    ChatML puts special tokens or a newline around every turn's content, so the tokens of a prefix that ends at a
    turn boundary are a prefix of the whole conversation's tokens. `preamble`: text the template puts first.
    """
    def length(text):
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    mask, rendered = [0] * length(preamble), preamble
    for message in conversation:
        header = f"<|im_start|>{message['role']}\n"
        body = message["content"] + "<|im_end|>"
        start, end = length(rendered + header), length(rendered + header + body)
        mask += [0] * (start - len(mask)) + [int(message["role"] == "assistant")] * (end - start)
        rendered += header + body + "\n"
    return mask + [0] * (length(rendered) - len(mask))


def test_assistant_tokens_mask_is_the_assistant_turns(tokenizer):
    for conversation in CHATS:
        out = tokenizer.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
        assert out["assistant_masks"] == expected_assistant_mask(tokenizer, conversation)
    # The multimodal processor: its template marks the same span, and the image's placeholder expansion before the
    # assistant turn shifts the mask with it.
    processor = AgillmProcessor(image_processor=AgillmImageProcessor(), tokenizer=tokenizer)
    conversation = [{"role": "user", "content": [{"type": "image", "image": torch.zeros(3, 8, 8, dtype=torch.uint8)},
                                                 {"type": "text", "text": "What is this?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "A ghost."}]}]
    out = processor.apply_chat_template([conversation], tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True, return_tensors="pt")
    masked = out["input_ids"][0][out["assistant_masks"][0].bool()]
    assert tokenizer.decode(masked) == "A ghost.<|im_end|>"


def test_smollm2_conversion_marks_assistant_turns(monkeypatch):
    path = smollm2_gguf_path()
    gguf_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    passed = {}
    # What the converter hands on to `convert_to_agillm` (the conversion itself: tests/test_smollm2.py).
    monkeypatch.setattr(smollm2, "convert_to_agillm", lambda *_, tokenizer, **__: passed.update(tokenizer=tokenizer))
    smollm2.convert_smollm2("unused", tokenizer=gguf_tokenizer)
    marked = passed["tokenizer"]
    assert gguf_tokenizer.chat_template == smollm2.SMOLLM2_CHAT_TEMPLATE  # the caller's tokenizer is left as loaded
    assert marked.chat_template == smollm2.SMOLLM2_TRAINING_CHAT_TEMPLATE
    default_system = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n")
    for conversation in CHATS:
        for add_generation_prompt in (False, True):
            settings = dict(tokenize=False, add_generation_prompt=add_generation_prompt)
            assert marked.apply_chat_template(conversation, **settings) == gguf_tokenizer.apply_chat_template(
                conversation, **settings
            )
        out = marked.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
        preamble = "" if conversation[0]["role"] == "system" else default_system
        assert out["assistant_masks"] == expected_assistant_mask(marked, conversation, preamble)


# ----------------------------------------------------------------------------------------------- SFT


@pytest.mark.parametrize("layout", ["dense", "moe"])
def test_sft_trainer_with_defaults(layout, tokenizer, tmp_path):
    model = trl_model(**(MOE if layout == "moe" else {}))
    before = snapshot(model)
    trainer = SFTTrainer(model=model, args=train_args(SFTConfig, tmp_path), processing_class=tokenizer,
                         train_dataset=Dataset.from_dict({"messages": CHATS}))
    # TRL turns router logits on exactly when the model routes.
    assert trainer.aux_loss_enabled == (layout == "moe") == model.config.output_router_logits
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(math.isfinite(entry["loss"]) for entry in logs)
    if layout == "moe":
        assert all(math.isfinite(entry["aux_loss"]) and entry["aux_loss"] > 0 for entry in logs)
    updated = changed(before, model)
    assert "model.embed_tokens.weight" in updated and "model.layers.1.self_attn.q_proj.weight" in updated
    if layout == "moe":
        assert {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj"} <= updated


def test_sft_assistant_only_loss_masks_everything_else(tokenizer, tmp_path):
    trainer = SFTTrainer(model=trl_model(), args=train_args(SFTConfig, tmp_path, assistant_only_loss=True),
                         processing_class=tokenizer, train_dataset=Dataset.from_dict({"messages": CHATS}))
    rows = list(trainer.train_dataset)
    batch = trainer.data_collator(rows)
    for row, conversation, input_ids, labels in zip(rows, CHATS, batch["input_ids"], batch["labels"]):
        expected = expected_assistant_mask(tokenizer, conversation)
        assert row["input_ids"] == tokenizer.apply_chat_template(conversation, return_dict=True)["input_ids"]
        padded = torch.tensor(expected + [0] * (len(labels) - len(expected)), dtype=torch.bool)
        assert torch.equal(labels, input_ids.masked_fill(~padded, -100))
    trainer.train()
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


class AgillmSFTTrainer(SFTTrainer):
    """SFT's data handling (chat template, `assistant_only_loss`, packing) with AGILLM's own multi-objective loss.

    The README's recipe: `transformers.Trainer.compute_loss` calls the model with the labels, so a model with SAT /
    NAT heads (or MTP, or router losses) returns the weighted sum of all of them, as under a plain `Trainer`.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def test_sft_trains_the_ar_head_only_unless_the_model_computes_its_loss(tokenizer, tmp_path):
    heads = dict(heads=["ar", "sat", "nat"], tie_word_embeddings=False)
    dataset = Dataset.from_dict({"messages": CHATS})
    plain = SFTTrainer(model=trl_model(**heads), args=train_args(SFTConfig, tmp_path / "plain"),
                       processing_class=tokenizer, train_dataset=dataset)
    model = plain.model
    batch = plain.data_collator(list(plain.train_dataset))
    # Before training, so no autocast wrapper: TRL's loss is the AR head's mean next-token cross-entropy.
    with torch.no_grad():
        sft_loss = plain.compute_loss(model, dict(batch))
        model_inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
        ar_loss = model(**model_inputs, objective="ar").loss
        torch.manual_seed(0)  # NAT draws its mask
        full = model(**model_inputs)
    torch.testing.assert_close(sft_loss, ar_loss)
    assert set(full.objective_losses) == {"ar", "sat", "nat"} and not torch.isclose(sft_loss, full.loss)
    before = snapshot(model)
    plain.train()
    untouched = {name for name in before if name.startswith(("sat_head.", "nat_head."))}
    assert untouched and not untouched & changed(before, model)

    full_trainer = AgillmSFTTrainer(model=trl_model(**heads), args=train_args(SFTConfig, tmp_path / "full"),
                                    processing_class=tokenizer, train_dataset=dataset)
    with torch.no_grad():
        torch.manual_seed(0)
        torch.testing.assert_close(full_trainer.compute_loss(full_trainer.model, dict(batch)), full.loss)
    before = snapshot(full_trainer.model)
    full_trainer.train()
    assert untouched <= changed(before, full_trainer.model)


# ----------------------------------------------------------------------------------------------- DPO


@pytest.mark.parametrize("layout", ["dense", "moe"])
def test_dpo_trainer_with_defaults(layout, tokenizer, tmp_path):
    folder = tmp_path / "policy"
    trl_model(**(MOE if layout == "moe" else {})).save_pretrained(folder)  # with its code: a remote-code folder
    args = train_args(DPOConfig, tmp_path, trust_remote_code=True, per_device_train_batch_size=2)
    # The model as a path, as TRL's docs do: the reference model is loaded from the same folder.
    trainer = DPOTrainer(model=str(folder), args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_dict(PREFERENCES))
    before = snapshot(trainer.model)
    reference = snapshot(trainer.ref_model)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(math.isfinite(entry["loss"]) for entry in logs)
    # At the first step the policy is the reference: every implicit reward is 0 and the sigmoid loss is log 2 (plus,
    # for MoE, the config's coefficient times the balancing loss).
    aux_loss = trainer.router_aux_loss_coef * logs[0]["aux_loss"] if layout == "moe" else 0.0
    assert logs[0]["loss"] == pytest.approx(math.log(2) + aux_loss, abs=1e-4)
    assert logs[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-3)
    assert logs[-1]["rewards/margins"] != 0.0
    assert "model.embed_tokens.weight" in changed(before, trainer.model)
    assert not changed(reference, trainer.ref_model)
    if layout == "moe":
        assert all(math.isfinite(entry["aux_loss"]) for entry in logs)
