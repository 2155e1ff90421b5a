"""AGILLM model configuration.

Every field is documented once, here, in the order the model reads it. Field names follow transformers'
conventions (the Llama/Qwen3/Llama4 names), so configs of those families map onto AGILLM one to one
(see `convert/`). Invalid combinations raise `ValueError` when the config is built, never later in a forward.
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


# Attention kinds a layer can have; names are transformers' own layer types, so `DynamicCache(config=...)`,
# `StaticCache` and `masking_utils` pick the right cache layer and mask per layer without extra code.
AGILLM_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
AGILLM_NORM_TYPES = ("rms_norm", "layer_norm")
AGILLM_POSITION_TYPES = ("rope", "alibi", "agillm_alibi", "none")
AGILLM_MLP_TYPES = ("gated", "plain")
AGILLM_ROUTER_TYPES = ("softmax_topk", "top1_straight_through")
AGILLM_HEADS = ("ar", "sat", "nat")
# Written into every saved config.json so a folder loads through any of these auto classes as remote code.
# (`save_pretrained` on its own records only the class of the object being saved.)
AGILLM_AUTO_MAP = {
    "AutoConfig": "configuration_agillm.AgillmConfig",
    "AutoModel": "modeling_agillm.AgillmModel",
    "AutoModelForCausalLM": "modeling_agillm.AgillmForCausalLM",
    "AutoModelForSequenceClassification": "modeling_agillm.AgillmForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_agillm.AgillmForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_agillm.AgillmForQuestionAnswering",
}


@strict(accept_kwargs=True)
class AgillmConfig(PreTrainedConfig):
    r"""
    Configuration of an AGILLM decoder ([`AgillmModel`] and its task heads).

    Vocabulary and sizes:
        vocab_size (`int`): number of token ids; ids must lie in `[0, vocab_size)`.
        hidden_size (`int`): width of the residual stream.
        intermediate_size (`int`): width of the gated MLP (SwiGLU when `hidden_act="silu"`).
        num_hidden_layers (`int`): number of decoder layers.
        num_attention_heads (`int`): query heads per layer.
        num_key_value_heads (`int`, *optional*): key/value heads; `None` means MHA (= query heads), 1 means MQA,
            anything in between GQA. Must divide `num_attention_heads`.
        head_dim (`int`, *optional*): per-head width. `None` means `hidden_size // num_attention_heads`, which
            then must divide evenly. Set explicitly (as Qwen3 does) to decouple it from `hidden_size`.
        max_position_embeddings (`int`): longest sequence (prompt + generated) the model accepts. Longer input
            raises `ValueError`, except with `rope_type="dynamic"`, which is built to extrapolate.

    Positions:
        rope_parameters (`dict`, *optional*): transformers' RoPE dict: `rope_type` (`default`, `linear`,
            `dynamic`, `yarn`, `longrope`, `llama3`), `rope_theta` and the type's own keys.
            Validated by transformers; an unknown type raises `ValueError`.
        nope_layers (`list[int]`, *optional*): indices of layers that apply no rotary embedding at all (NoPE,
            as in Llama 4): their attention is position-free and relies on causality and the other layers.
        position_embedding_type (`str`): how positions enter attention. `rope` (rotary, `rope_parameters`);
            `alibi` (standard ALiBi: a per-head linear penalty `-m_h * |i - j|` on the attention scores);
            `agillm_alibi` (AGILLM 4.x's variant, `-m_h * max(j - i, 0)`: only keys *after* the query are
            penalised, so under the causal AR mask it is exactly zero and AR has no positional signal: kept for
            converted checkpoints, whose SAT/NAT passes depend on it); `none` (no positions, NoPE everywhere).
            ALiBi slopes follow AGILLM 4.x (= the ALiBi paper's rule, also for non-power-of-two head counts).
            ALiBi needs `full_attention` layers and an attention backend that takes an additive mask (eager, sdpa).

    Attention:
        layer_types (`list[str]`, *optional*): per-layer attention kind, one of `full_attention`,
            `sliding_attention` (each token sees the previous `sliding_window` tokens) or `chunked_attention`
            (tokens see only their own `attention_chunk_size` block, causally). `None` means every layer is
            `sliding_attention` when `sliding_window` is set (Mistral), else `full_attention`.
        sliding_window (`int`, *optional*): window of `sliding_attention` layers.
        attention_chunk_size (`int`, *optional*): block size of `chunked_attention` layers.
        attention_bias (`bool`): bias on the q/k/v projections (Qwen2 sets it).
        attention_output_bias (`bool`, *optional*): bias on the output projection; `None` follows
            `attention_bias` (Llama's convention, where one flag covers all four projections).
        attention_dropout (`float`): dropout on attention probabilities while training.
        use_qk_norm (`bool`): RMSNorm over `head_dim` on queries and keys before RoPE (Qwen3).
        tie_kv (`bool`): one projection serves as both key and value (AGILLM 4.x `--tie_kv`): there is no
            `v_proj`; values are the key projection before RoPE and QK-norm.
        hidden_dropout (`float`): dropout on the attention block's output (after `o_proj`) while training.

    MLP and norms:
        mlp_type (`str`): `gated` (`down(act(gate(x)) * up(x))`, SwiGLU with silu) or `plain`
            (`down(act(up(x)))`, e.g. AGILLM 4.x's ReLU MLP with biases).
        hidden_act (`str`): activation of the MLP, any key of `transformers.activations.ACT2FN`.
        mlp_bias (`bool`): bias on the MLP projections (also on the experts of an MoE layer).
        num_experts (`int`): routed experts per MoE layer; 0 means every layer has a dense MLP.
        num_experts_per_tok (`int`): experts each token is routed to (top-k).
        moe_intermediate_size (`int`, *optional*): hidden width of one routed expert (default:
            `intermediate_size`).
        router_type (`str`): `softmax_topk` (softmax over the router logits, top-k, renormalised over the chosen
            experts when `norm_topk_prob`; equal to AGILLM 4.x's top-k>1 rule) or `top1_straight_through`
            (AGILLM 4.x top-1: the chosen expert's output is used unscaled in the forward pass, while the router
            probability carries the gradient: `y = expert(x) * p / p.detach()`).
        norm_topk_prob (`bool`): renormalise the top-k routing weights to sum to one.
        shared_expert_intermediate_size (`int`): hidden width of the always-on shared expert added to every
            MoE layer's output, unweighted (several AGILLM 4.x shared experts are one wider one); 0 means none.
        norm_type (`str`): `rms_norm` (Llama) or `layer_norm` (with bias, as GPT-style and AGILLM 4.x models).
        rms_norm_eps (`float`): epsilon of every norm (either type).

    Heads and objectives ([`AgillmForCausalLM`]):
        heads (`list[str]`): output heads over the trunk. `ar` (next token, causal mask; always present),
            `sat` (semi-autoregressive: block-causal mask over blocks of `sat_block_size`, position t predicts
            token t + `sat_block_size`, plus a stride gate), `nat` (non-autoregressive: a masked token predicts
            itself, with bidirectional or block-causal attention).
        head_bias (`bool`): bias on the head projections (AGILLM 4.x untied heads have one).
        objective_weights (`dict[str, float]`, *optional*): weight of each head's loss in the training loss
            (`forward(labels=...)` without `objective`); default 1.0 for every head.
        label_smoothing (`float`): label smoothing of every head's cross-entropy (0 = none).
        sat_block_size (`int`): tokens a SAT step emits; the SAT mask is block-causal over blocks of this size.
        sat_gate_loss (`bool`): train the SAT stride gate on a real target: class `s - 1` where `s` is the
            number of leading SAT predictions of a block that are correct (the longest prefix safe to emit).
            Off for converted AGILLM 4.x checkpoints, whose gate was trained without one.
        nat_mask_token_id (`int`): the id NAT replaces hidden tokens with (`<|mask|>` = 3 in the shipped
            tokenizer; AGILLM 4.x used its pad id).
        nat_block_size (`int`, *optional*): `None` is AGILLM 4.x's NAT, fully bidirectional over the whole
            sequence. An integer makes NAT block-causal (each block sees earlier blocks and itself) and trains it
            the way it decodes: block by block, with an exact KV cache of finished blocks.
        diffusion_blocks (`dict`, *optional*): the DiffusionBlocks layer-group structure and EDM noise settings
            the model was trained with (see `AgillmForCausalLM.diffusion_blocks_loss`); the sampler reads the
            same structure, so training and inference cannot disagree.

    Embeddings, init, generation:
        tie_word_embeddings (`bool`): the LM head (and every other head projection) shares the input
            embedding matrix.
        initializer_range (`float`): std of the normal init of linear and embedding weights.
        use_cache (`bool`): return a KV cache from forward by default.
        pad_token_id / bos_token_id / eos_token_id: special ids; the shipped tokenizer uses 0 / 1 / 2.
    """

    model_type = "agillm"
    keys_to_ignore_at_inference = ["past_key_values"]
    # Tensor-parallel plan of `AgillmModel`: column-split q/k/v and gate/up, row-split o and down, as Llama.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 8192
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048

    rope_parameters: RopeParameters | dict | None = None
    nope_layers: list[int] | None = None

    layer_types: list[str] | None = None
    sliding_window: int | None = None
    attention_chunk_size: int | None = None
    attention_bias: bool = False
    attention_output_bias: bool | None = None
    attention_dropout: float | int = 0.0
    use_qk_norm: bool = False
    position_embedding_type: str = "rope"
    tie_kv: bool = False
    hidden_dropout: float | int = 0.0

    mlp_type: str = "gated"
    hidden_act: str = "silu"
    mlp_bias: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int | None = None
    router_type: str = "softmax_topk"
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    norm_type: str = "rms_norm"
    rms_norm_eps: float = 1e-6

    heads: list[str] | None = None
    head_bias: bool = False
    objective_weights: dict[str, float] | None = None
    label_smoothing: float | int = 0.0
    sat_block_size: int = 2
    sat_gate_loss: bool = True
    nat_mask_token_id: int = 3
    nat_block_size: int | None = 8
    diffusion_blocks: dict | None = None

    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}), or set head_dim explicitly."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.attention_output_bias is None:
            self.attention_output_bias = self.attention_bias
        if self.layer_types is None:
            default = "sliding_attention" if self.sliding_window is not None else "full_attention"
            self.layer_types = [default] * self.num_hidden_layers
        if self.nope_layers is None:
            self.nope_layers = []
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.heads is None:
            self.heads = ["ar"]
        if self.objective_weights is None:
            self.objective_weights = {head: 1.0 for head in self.heads}
        if not self.use_qk_norm:  # the TP plan may name only modules the model has: q/k_norm come with QK-norm
            self.base_model_tp_plan = {
                k: v for k, v in type(self).base_model_tp_plan.items() if not k.endswith(("q_norm", "k_norm"))
            }
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:  # a loaded config keeps its own (it may carry a Hub repo prefix)
            self.auto_map = dict(AGILLM_AUTO_MAP)
        self._check_agillm_fields()

    def _check_agillm_fields(self):
        """Reject combinations the model cannot run, with the field that is wrong in the message."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}."
            )
        unknown = sorted(set(self.layer_types) - set(AGILLM_LAYER_TYPES))
        if unknown:
            raise ValueError(f"Unknown layer type(s) {unknown}; AGILLM supports {list(AGILLM_LAYER_TYPES)}.")
        if "sliding_attention" in self.layer_types and not (self.sliding_window and self.sliding_window > 0):
            raise ValueError("sliding_attention layers need a positive sliding_window.")
        if "chunked_attention" in self.layer_types and not (self.attention_chunk_size and self.attention_chunk_size > 0):
            raise ValueError("chunked_attention layers need a positive attention_chunk_size.")
        bad_nope = [i for i in self.nope_layers if not 0 <= i < self.num_hidden_layers]
        if bad_nope:
            raise ValueError(f"nope_layers {bad_nope} are not layer indices (0..{self.num_hidden_layers - 1}).")
        if self.norm_type not in AGILLM_NORM_TYPES:
            raise ValueError(f"norm_type must be one of {list(AGILLM_NORM_TYPES)}, got {self.norm_type!r}.")
        self._check_choice("position_embedding_type", AGILLM_POSITION_TYPES)
        self._check_choice("mlp_type", AGILLM_MLP_TYPES)
        self._check_choice("router_type", AGILLM_ROUTER_TYPES)
        if self.uses_alibi and set(self.layer_types) != {"full_attention"}:
            raise ValueError(
                f"position_embedding_type={self.position_embedding_type!r} needs full_attention layers only "
                f"(ALiBi distances are absolute positions; windowed caches drop them), got {sorted(set(self.layer_types))}."
            )
        if self.num_experts < 0 or (self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts):
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must lie in [1, num_experts={self.num_experts}]."
            )
        if self.num_experts and self.router_type == "top1_straight_through" and self.num_experts_per_tok != 1:
            raise ValueError("router_type='top1_straight_through' routes each token to exactly one expert "
                             f"(num_experts_per_tok=1), got {self.num_experts_per_tok}.")
        if self.num_experts and (self.mlp_type == "plain") != bool(self.mlp_bias):
            raise ValueError("MoE experts are either gated without biases (mlp_type='gated', mlp_bias=False) or "
                             "plain with biases as AGILLM 4.x (mlp_type='plain', mlp_bias=True).")
        if self.moe_intermediate_size <= 0 or self.shared_expert_intermediate_size < 0:
            raise ValueError("moe_intermediate_size must be positive and shared_expert_intermediate_size >= 0.")
        self._check_heads()
        try:  # transformers' own check; a missing key surfaces as KeyError there
            self.validate_rope()
        except KeyError as error:
            raise ValueError(f"Invalid rope_parameters {self.rope_parameters!r}: {error}") from error
        if self.rope_parameters is None or "rope_type" not in self.rope_parameters:
            raise ValueError(f"rope_parameters must name a rope_type, got {self.rope_parameters!r}.")
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rope_type = self.rope_parameters["rope_type"]
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"Unknown rope_type {rope_type!r}; choose 'default' or one of {sorted(ROPE_INIT_FUNCTIONS)}."
            )

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}.")

    def _check_heads(self) -> None:
        unknown = [head for head in self.heads if head not in AGILLM_HEADS]
        if unknown or "ar" not in self.heads or len(set(self.heads)) != len(self.heads):
            raise ValueError(f"heads must be distinct names from {list(AGILLM_HEADS)} including 'ar', got {self.heads}.")
        extra = sorted(set(self.objective_weights) - set(self.heads))
        if extra:
            raise ValueError(f"objective_weights names {extra}, which are not among heads={self.heads}.")
        if any(weight < 0 for weight in self.objective_weights.values()):
            raise ValueError(f"objective_weights must be >= 0, got {self.objective_weights}.")
        if set(self.heads) != {"ar"} and set(self.layer_types) != {"full_attention"}:
            raise ValueError(f"heads {self.heads} need full_attention layers only (SAT and NAT attend across blocks).")
        if self.sat_block_size < 2:
            raise ValueError(f"sat_block_size must be at least 2, got {self.sat_block_size}.")
        if self.nat_block_size is not None and self.nat_block_size < 1:
            raise ValueError(f"nat_block_size must be a positive integer or None, got {self.nat_block_size}.")
        if not 0 <= self.nat_mask_token_id < self.vocab_size:
            raise ValueError(f"nat_mask_token_id ({self.nat_mask_token_id}) must be a token id below vocab_size.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}.")

    @property
    def rope_type(self) -> str:
        return self.rope_parameters["rope_type"]

    @property
    def uses_alibi(self) -> bool:
        return self.position_embedding_type in ("alibi", "agillm_alibi")

    @property
    def uses_rope(self) -> bool:
        return self.position_embedding_type == "rope"


__all__ = ["AgillmConfig"]
