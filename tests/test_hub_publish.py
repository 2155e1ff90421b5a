"""Publishing to the Hub, offline: every saved folder carries a model card, and what `upload_folder` / `push_to_hub`
would upload is a complete remote-code folder (the upload itself is replaced by a recorder of its commit)."""

from pathlib import Path

import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from configuration_agillm import AgillmConfig
from convert.converter import MODEL_CODE_FILES
from model_card_agillm import GENERATED_MARKER
from modeling_agillm import AgillmForConditionalGeneration
from test_multimodal_model import TINY_MULTIMODAL_CONFIG


class RecordedCommit:
    """What a commit to the Hub would have added: `{path_in_repo: bytes}`."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.repo_id = None

    def create_commit(self, repo_id, operations, **kwargs):
        self.repo_id = repo_id
        for operation in operations:
            source = operation.path_or_fileobj
            self.files[operation.path_in_repo] = Path(source).read_bytes() if isinstance(source, str) else source
        return f"https://huggingface.co/{repo_id}/commit/recorded"

    def write_to(self, folder: Path) -> Path:
        for name, content in self.files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(content)
        return folder


def card_of(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def test_saved_text_model_gets_a_card_that_loads_and_describes_it(make_model, tmp_path):
    model = make_model(heads=["ar", "sat"], num_mtp_layers=1)
    model.save_pretrained(tmp_path)
    card = card_of(tmp_path)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"agillm", "custom_code"} <= set(card.data.tags)
    parameters = sum(p.numel() for p in model.parameters())
    assert f"AgillmForCausalLM, {parameters:,} parameters" in card.text
    assert "| heads | ar, sat |" in card.text and "1 MTP layer(s)" in card.text
    assert "AutoModelForCausalLM.from_pretrained" in card.text and "trust_remote_code=True" in card.text


def test_saved_multimodal_model_card_names_its_towers(tmp_path):
    torch.manual_seed(0)
    vq_config = {"image_size": 8, "hidden_channels": [8, 16], "embed_dim": 8, "num_embeddings": 32}
    config = AgillmConfig(**{**TINY_MULTIMODAL_CONFIG, "vocab_size": 96, "vq_config": vq_config})
    model = AgillmForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path)
    card = card_of(tmp_path)
    assert card.data.pipeline_tag == "image-text-to-text" and "multimodal" in card.data.tags
    for row in ("| image encoder | ViT", "| speech encoder |", "| image tokenizer (VQ-VAE) |"):
        assert row in card.text
    assert "AutoModelForImageTextToText.from_pretrained" in card.text and "AutoProcessor" in card.text
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(reloaded).__name__ == "AgillmForConditionalGeneration"


def test_a_later_save_rewrites_its_own_card_and_keeps_anyone_elses(make_model, tmp_path):
    make_model(heads=["ar"]).save_pretrained(tmp_path)
    make_model(heads=["ar", "nat"]).save_pretrained(tmp_path)  # the generated card follows the model
    assert GENERATED_MARKER in card_of(tmp_path).text and "| heads | ar, nat |" in card_of(tmp_path).text
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# Hand-written card\n")
    make_model(heads=["ar"]).save_pretrained(tmp_path)
    assert card_of(tmp_path).text.strip() == "# Hand-written card"


def test_upload_folder_publishes_a_complete_remote_code_folder(make_model, tmp_path, monkeypatch):
    """The documented path: `save_pretrained` (+ tokenizer), then `HfApi().upload_folder` of that folder."""
    recorder, validated_cards = RecordedCommit(), []
    monkeypatch.setattr("huggingface_hub.hf_api.is_xet_available", lambda: False)  # the single-commit upload
    # The Hub checks README.md's metadata before an upload; here its YAML is parsed locally instead.
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda api, content, **kw: validated_cards.append(ModelCard(content)))
    monkeypatch.setattr(HfApi, "create_commit", lambda api, repo_id, operations, **kw: recorder.create_commit(
        repo_id, operations, **kw))
    model = make_model(heads=["ar", "sat"])
    model.save_pretrained(tmp_path / "saved")
    HfApi().upload_folder(repo_id="someone/agillm-tiny", folder_path=tmp_path / "saved", repo_type="model")

    assert recorder.repo_id == "someone/agillm-tiny" and validated_cards[0].data.library_name == "transformers"
    uploaded = set(recorder.files)
    assert set(MODEL_CODE_FILES) <= uploaded and {"config.json", "model.safetensors", "README.md"} <= uploaded
    published = recorder.write_to(tmp_path / "uploaded_folder")
    reloaded = AutoModelForCausalLM.from_pretrained(published, trust_remote_code=True).eval()
    assert type(reloaded).__module__.startswith("transformers_modules.")  # the uploaded code, not this repository
    ids = torch.randint(4, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_push_to_hub_uploads_code_config_and_weights(make_model, tmp_path, monkeypatch):
    """`model.push_to_hub` (transformers' own path) uploads the code files and `auto_map` too; its README.md is
    the Hub's card or transformers' generic one, as for every model (see `save_pretrained`)."""
    recorder = RecordedCommit()

    class FakeHubApi:
        def create_repo(self, repo_id, **kwargs):
            return type("RepoUrl", (), {"repo_id": repo_id})()

        create_commit = staticmethod(recorder.create_commit)

    def no_card_yet(repo_id, **kwargs):
        raise EntryNotFoundError("no README.md in a new repo")

    monkeypatch.setattr("transformers.utils.hub.hf_api", lambda: FakeHubApi())
    monkeypatch.setattr("transformers.utils.hub.ModelCard.load", no_card_yet)
    model = make_model()
    model.push_to_hub("someone/agillm-pushed")
    assert set(MODEL_CODE_FILES) <= set(recorder.files) and "model.safetensors" in recorder.files
    published = recorder.write_to(tmp_path / "pushed_folder")
    config = AgillmConfig.from_pretrained(published)
    assert config.auto_map["AutoModelForCausalLM"] == "modeling_agillm.AgillmForCausalLM"
    reloaded = AutoModelForCausalLM.from_pretrained(published, trust_remote_code=True)
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)

