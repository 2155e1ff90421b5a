"""AGILLM's parallel decoders, reached through `AgillmForCausalLM.generate(generation_mode=...)`.

`generation_mode=None` / `"ar"` is plain `GenerationMixin.generate`. The other modes take the same inputs and
generation parameters (`max_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`, `eos_token_id`, ...), merged
over `model.generation_config` as `generate` does, and return the same `[batch, prompt + new]` ids, or with
`return_dict_in_generate=True` an `AgillmGenerateOutput` with `sequences` and `num_forward_passes`: every trunk forward
(prefill, denoising step, verification, cache re-encode) counts once, whatever its length.

* `"sat"` (SAT head, AGILLM 4.x `infer --mode sat`): prefill with the block-causal SAT mask. While the length is not
  a multiple of b = `sat_block_size`, the AR head (on the SAT-masked hidden, as AGILLM 4.x aligns odd prompts) adds
  a token. At a block boundary, the SAT head on the last block's b hidden states gives the next b tokens and the
  gate how many to keep (`sat_stride="gate"`: argmax under greedy, sampled otherwise; `"fixed"`: always b, the
  original `--no-var`); the mask id is banned. Emitted tokens go through the KV cache with the SAT mask.
  Fix over AGILLM 4.x, which fed the alignment token alone: the earlier tokens of its block kept states that never
  saw it (block partners see each other under the SAT mask), and after a stride < b the following steps read
  positions the SAT head was never trained at. Here each AR token's forward re-encodes the whole unfinished block
  over its stale cache slots (same forward count), and a stride s < b is completed by b - s AR tokens (b - s
  forwards) before the next SAT step, so the cache always equals a SAT pass over the whole text and SAT steps
  start at block boundaries. `sat_compat=True` keeps the original's handling (no re-encode; after a stride < b,
  SAT steps go on misaligned). The gate is argmax under greedy, where the original sampled it even with `--greedy`.
* `"nat_mask_predict"` (NAT head, AGILLM 4.x `--mode nat`): the canvas is prompt + max_new mask
  ids. On a block-NAT model the passes run under its block-causal mask, so in early passes a block sees earlier
  blocks still partly hidden, which its training never shows: it runs (to compare with the original sampler), but
  `"nat_block"` is the sampler such a model is built for. Each of `nat_passes` passes (default 4) re-encodes the whole canvas (one forward, no cache) and commits the
  ceil(remaining / passes left) most confident masked positions (max softmax probability; ties to the left), mask
  id banned. Nothing stops early; the output is cut after the first EOS.
* `"nat_block"` (NAT head with `nat_block_size` N): semi-autoregressive, block by block. The current block is the
  prompt's unfinished block (its known tail plus masks) and then N masks at a time. Each step runs the current
  block against a KV cache of the finished blocks, exactly as block NAT is trained (a noised block sees the clean
  earlier blocks and itself), and commits every masked position with confidence >= `nat_threshold` (default 0.9),
  at least the most confident one. A finished block is encoded into the cache in the same forward as the first
  step of the next block ([clean block k ; masked block k+1], block-causal), after which the cache is cropped back
  to drop block k+1's noisy keys; the prompt's complete blocks ride along with the first step the same way, so
  the count is one forward per denoising step. `use_block_cache=False` takes the same decisions recomputing the
  clean prefix at every step (same forward count, more compute). Decoding stops once an EOS is committed with
  nothing masked before it.
* `"staged"`: draft, then verify with AR. The draft is NAT (`draft="nat"`, the default with a NAT head): one
  denoising forward over the rest of the current NAT block (block NAT, with an exact cache of finished blocks
  maintained by the same merged re-encode and crop), or over `draft_length` masks (default 4) after the text
  (bidirectional NAT, no cache); or SAT (`draft="sat"`): the SAT head's predictions from the last complete block,
  whose cache holds complete blocks only. One AR forward over [pending tokens ; draft] scores every draft
  position; the longest prefix that AR would have produced is accepted, plus AR's own next token, and the AR
  cache is cropped to what was accepted. A round costs one draft forward (none when the SAT draft needs no new
  block) and one verify forward; the first verify is also the prefill. Greedy output is identical to `generate(do_sample=False)` by construction,
  logits processors included (they run on each verified position with its own history). Under sampling the
  (deterministic) draft is accepted with the speculative-sampling rule (token d kept with probability p(d), else
  drawn from p with d removed), so the output is distributed exactly as `generate(do_sample=True)`.

* `"verify_and_draft"` (NAT head with `nat_block_size` B >= 2; TiDAR's single-forward hybrid): ONE forward per
  round. Its tokens are the accepted tokens not yet in the cache (the prompt in the first round, then AR's last
  token), the k drafts (`draft_length`, default B - 1, at most B - 1), and k + 1 blocks of B masks (`_DraftLayout`):
  the pending tokens and drafts are causal over the cache, so the AR head verifies every draft in that forward and
  their K/V are exactly AR's; mask block j sees the cache, the pending tokens and the first j drafts (both ways
  within itself) and its slots 1..k are the next drafts should exactly j drafts be accepted. After the forward the
  longest accepted prefix plus AR's own token are emitted, the cache is cropped to the accepted tokens and the
  drafts of block j are kept. Greedy output is identical to `generate(do_sample=False)` (logits processors
  included); sampling uses the speculative rule as `staged`. Each round emits 1 to k + 1 tokens for one forward of
  1 + k + (k + 1) B tokens. Models trained with `nat_objective="draft"` see this exact layout in training.

Limits: no beam search, assisted decoding, streamers, stopping criteria or custom logits processors; NAT modes
accept only sampling warpers (temperature, top-k, top-p, ...) and min length; `staged` and `verify_and_draft` run
one sequence at a time.
"""

import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitNormalization,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.utils import ModelOutput


GENERATION_MODES = ("sat", "nat_mask_predict", "nat_block", "staged", "verify_and_draft")

# Options of each mode and their defaults; passed as `generate` kwargs or set on the generation config.
MODE_OPTIONS = {
    "sat": {"sat_stride": "gate", "sat_compat": False},
    "nat_mask_predict": {"nat_passes": 4},
    "nat_block": {"nat_threshold": 0.9, "use_block_cache": True},
    "staged": {"draft": None, "draft_length": None},
    "verify_and_draft": {"draft_length": None},
}
ALL_OPTIONS = {name for options in MODE_OPTIONS.values() for name in options}

# `generate` arguments these decoders have no counterpart for (a value other than None / empty is an error).
UNSUPPORTED_ARGUMENTS = (
    "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model", "streamer",
    "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate", "inputs_embeds", "past_key_values",
    "assistant_tokenizer",
)
# Accepted and not needed: `tokenizer` only serves stop strings (rejected below), `use_cache` is implied.
IGNORED_ARGUMENTS = ("tokenizer", "use_cache", "synced_gpus")

# Processors that look at nothing but the scores: NAT modes may apply them to any position.
POSITION_FREE_WARPERS = (
    TemperatureLogitsWarper, TopHLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper,
    TypicalLogitsWarper, EpsilonLogitsWarper, EtaLogitsWarper, LogitNormalization,
)
# Length processors, which NAT modes apply as an EOS ban on the first new positions.
LENGTH_PROCESSORS = (MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor)

DEFAULT_BIDIRECTIONAL_DRAFT_LENGTH = 4


@dataclass
class AgillmGenerateOutput(ModelOutput):
    """
    sequences (`torch.LongTensor` of shape `(batch_size, prompt_length + new_tokens)`): prompts and new tokens;
        rows that stopped early are padded with `pad_token_id`, as `generate` does.
    num_forward_passes (`int`): trunk forwards the decoder ran, every one counted (prefill, denoising steps,
        verification, cache re-encodes).
    """

    sequences: torch.LongTensor | None = None
    num_forward_passes: int | None = None


# --------------------------------------------------------------------------------------------------- entry point


@torch.no_grad()
def agillm_generate(model, inputs=None, generation_config=None, *, generation_mode: str, **kwargs):
    """Decode with one of AGILLM's parallel decoders (module docstring); arguments as `GenerationMixin.generate`."""
    if generation_mode not in GENERATION_MODES:
        raise ValueError(
            f"generation_mode must be None, 'ar' or one of {list(GENERATION_MODES)}, got {generation_mode!r}."
        )
    input_ids = kwargs.pop("input_ids", None)
    if inputs is not None and input_ids is not None:
        raise ValueError("Pass the prompt once: as `inputs` or as `input_ids`, not both.")
    if input_ids is None:
        input_ids = inputs
    attention_mask = kwargs.pop("attention_mask", None)
    options = _pop_mode_options(generation_mode, kwargs)
    _reject_unsupported_arguments(generation_mode, kwargs)

    generation_config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    unused = sorted(set(model_kwargs) - {"output_attentions", "output_hidden_states"})
    if unused:
        raise ValueError(f"generation_mode={generation_mode!r} got unexpected arguments {unused}.")
    for name, (value, default) in options.items():  # a kwarg, else the generation config's entry, else the default
        value = getattr(generation_config, name, None) if value is None else value
        options[name] = default if value is None else value

    run = _DecodingRun.prepare(model, generation_mode, input_ids, attention_mask, generation_config)
    decoder = {
        "sat": _sat_generate,
        "nat_mask_predict": _nat_mask_predict_generate,
        "nat_block": _nat_block_generate,
        "staged": _staged_generate,
        "verify_and_draft": _verify_and_draft_generate,
    }[generation_mode]
    new_tokens = decoder(run, **options)
    sequences = run.assemble(new_tokens)
    if generation_config.return_dict_in_generate:
        return AgillmGenerateOutput(sequences=sequences, num_forward_passes=run.forward_passes)
    return sequences


def _pop_mode_options(generation_mode: str, kwargs: dict) -> dict:
    """This mode's options as `{name: (value passed or None, default)}`; another mode's option is an error."""
    for name in ALL_OPTIONS - set(MODE_OPTIONS[generation_mode]):
        if kwargs.get(name) is not None:
            owner = next(mode for mode, options in MODE_OPTIONS.items() if name in options)
            raise ValueError(f"{name!r} is an option of generation_mode={owner!r}, not {generation_mode!r}.")
        kwargs.pop(name, None)
    return {name: (kwargs.pop(name, None), default) for name, default in MODE_OPTIONS[generation_mode].items()}


def _reject_unsupported_arguments(generation_mode: str, kwargs: dict) -> None:
    for name in UNSUPPORTED_ARGUMENTS:
        value = kwargs.pop(name, None)
        if value is not None and not (isinstance(value, (list, tuple)) and len(value) == 0):
            raise ValueError(f"generation_mode={generation_mode!r} does not support `{name}`.")
    if kwargs.get("synced_gpus"):
        raise ValueError(f"generation_mode={generation_mode!r} does not support `synced_gpus`.")
    for name in IGNORED_ARGUMENTS:
        kwargs.pop(name, None)


# --------------------------------------------------------------------------------------------------- shared state


class _DecodingRun:
    """What every decoder shares: model, prompts, limits, token choice, and the count of trunk forwards."""

    def __init__(self, model, input_ids, attention_mask, generation_config, processors):
        self.model = model
        self.config = model.config
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.processors = processors
        self.do_sample = bool(generation_config.do_sample)
        width = input_ids.shape[1]
        self.max_new_tokens = generation_config.max_new_tokens
        if self.max_new_tokens is None:
            self.max_new_tokens = generation_config.max_length - width
        if self.max_new_tokens < 1:
            raise ValueError(
                f"Nothing to generate: max_new_tokens={generation_config.max_new_tokens}, "
                f"max_length={generation_config.max_length}, prompt width {width}."
            )
        self.min_new_tokens = max(generation_config.min_new_tokens or 0, (generation_config.min_length or 0) - width)
        eos = generation_config._eos_token_tensor
        self.eos_ids = set() if eos is None else {int(token) for token in eos.reshape(-1)}
        pad = generation_config._pad_token_tensor
        self.pad_token_id = int(pad) if pad is not None else 0
        self.mask_token_id = self.config.nat_mask_token_id
        self.forward_passes = 0

    @classmethod
    def prepare(cls, model, generation_mode, input_ids, attention_mask, generation_config) -> "_DecodingRun":
        """Check the request against what the mode can do, then normalise the inputs as `generate` does."""
        mode = generation_config.get_generation_mode()
        if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            raise ValueError(
                f"generation_mode={generation_mode!r} decodes greedily or by sampling (num_beams=1, no "
                f"assistant/contrastive/DoLa/constraints); these generation parameters ask for {mode.value!r}."
            )
        for name in ("stop_strings", "max_time", "cache_implementation", "output_scores", "output_logits",
                     "output_attentions", "output_hidden_states"):
            if getattr(generation_config, name, None):
                raise ValueError(f"generation_mode={generation_mode!r} does not support `{name}`.")
        _check_heads(model.config, generation_mode)

        device = model.device if input_ids is None else input_ids.device
        model._prepare_special_tokens(generation_config, attention_mask is not None, device=device)
        if input_ids is None:
            if generation_config.bos_token_id is None:
                raise ValueError("Without input_ids, generation starts from bos_token_id, which is not set.")
            input_ids = torch.full((1, 1), generation_config.bos_token_id, dtype=torch.long, device=device)
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, length >= 1], got shape {tuple(input_ids.shape)}.")
        if attention_mask is None:
            attention_mask = model._prepare_attention_mask_for_generation(input_ids, generation_config, {})
        attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
        _check_left_padding(attention_mask)
        if generation_config.num_return_sequences and generation_config.num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(generation_config.num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(generation_config.num_return_sequences, dim=0)

        processors = model._get_logits_processor(
            generation_config=generation_config,
            input_ids_seq_length=input_ids.shape[1],
            encoder_input_ids=input_ids,
            device=input_ids.device,
            model_kwargs={"attention_mask": attention_mask},
        )
        if generation_mode.startswith("nat_"):
            _check_nat_processors(generation_mode, processors)
        return cls(model, input_ids, attention_mask, generation_config, processors)

    # ---- trunk

    def trunk(self, objective, input_ids, attention_mask=None, position_ids=None, cache=None) -> torch.Tensor:
        """One counted trunk forward; returns the final hidden states `[batch, length, hidden]`."""
        self.forward_passes += 1
        outputs = self.model.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
            objective=objective,
        )
        return outputs.last_hidden_state

    # ---- token choice

    def history(self, row: int, generated: list[int]) -> torch.LongTensor:
        """Row `row`'s ids so far as `generate` holds them: the (padded) prompt, then its new tokens."""
        new = torch.tensor(generated, dtype=torch.long, device=self.input_ids.device)
        return torch.cat([self.input_ids[row], new])[None]

    def scores(self, history: torch.LongTensor, logits: torch.Tensor) -> torch.Tensor:
        """Processed scores of one next token, as `GenerationMixin._sample` computes them (fp32, all processors)."""
        return self.processors(history, logits.float().reshape(1, -1))[0]

    def pick(self, scores: torch.Tensor) -> torch.LongTensor:
        """argmax (greedy) or one draw from softmax(scores), over the last dim."""
        if not self.do_sample:
            return scores.argmax(-1)
        probs = scores.softmax(-1)
        return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(probs.shape[:-1])

    def next_token(self, row: int, generated: list[int], logits: torch.Tensor) -> int:
        """The next token of a sequential decoder (SAT): processors on this row's history, then argmax or a draw."""
        return int(self.pick(self.scores(self.history(row, generated), logits)))

    def nat_scores(self, logits: torch.Tensor, new_index: torch.Tensor) -> torch.Tensor:
        """NAT logits (fp32) with the mask id banned, and EOS banned where fewer than min_new_tokens precede."""
        logits = logits.float()
        logits[..., self.mask_token_id] = -math.inf
        if self.min_new_tokens and self.eos_ids:
            early = new_index < self.min_new_tokens
            for eos in self.eos_ids:
                logits[..., eos] = logits[..., eos].masked_fill(early, -math.inf)
        return logits

    def nat_pick(self, logits: torch.Tensor) -> torch.LongTensor:
        """Tokens for committed NAT positions `[n, vocab]`: argmax, or a draw after the sampling warpers."""
        if self.do_sample:
            warpers = [p for p in self.processors if isinstance(p, POSITION_FREE_WARPERS)]
            unused_ids = torch.zeros((logits.shape[0], 1), dtype=torch.long, device=logits.device)
            logits = LogitsProcessorList(warpers)(unused_ids, logits)
        return self.pick(logits)

    # ---- output

    def is_eos(self, token: int) -> bool:
        return token in self.eos_ids

    def assemble(self, new_tokens: list[list[int]]) -> torch.LongTensor:
        """`[batch, prompt width + longest row]`: prompts as given, new tokens, `pad_token_id` after shorter rows."""
        width = max(len(tokens) for tokens in new_tokens)
        new = torch.full((len(new_tokens), width), self.pad_token_id, dtype=torch.long, device=self.input_ids.device)
        for row, tokens in enumerate(new_tokens):
            new[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return torch.cat([self.input_ids, new], dim=-1)

    def cut_after_eos(self, tokens: list[int]) -> list[int]:
        for index, token in enumerate(tokens):
            if self.is_eos(token):
                return tokens[: index + 1]
        return tokens


def _check_heads(config, generation_mode: str) -> None:
    needed = {"sat": ["sat"], "nat_mask_predict": ["nat"], "nat_block": ["nat"], "staged": [],
              "verify_and_draft": ["nat"]}[generation_mode]
    missing = [head for head in needed if head not in config.heads]
    if missing:
        raise ValueError(
            f"generation_mode={generation_mode!r} needs the {missing[0]!r} head; this model has heads={config.heads}."
        )
    if generation_mode == "nat_block" and config.nat_block_size is None:
        raise ValueError(
            "generation_mode='nat_block' needs a block-NAT model (config.nat_block_size); this NAT head is "
            "bidirectional (nat_block_size=None): use generation_mode='nat_mask_predict'."
        )
    if generation_mode == "verify_and_draft" and (config.nat_block_size or 0) < 2:
        raise ValueError(
            "generation_mode='verify_and_draft' drafts with a block-NAT head of at least 2 tokens per block "
            f"(config.nat_block_size >= 2, best trained with nat_objective='draft'); got {config.nat_block_size}."
        )


def _check_left_padding(attention_mask: torch.Tensor) -> None:
    """Each row must be padding then tokens (`tokenizer.padding_side="left"`), with at least one token."""
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be [batch, length], got shape {tuple(attention_mask.shape)}.")
    if not ((attention_mask[:, 1:] >= attention_mask[:, :-1]).all() and (attention_mask[:, -1] == 1).all()):
        raise ValueError(
            "These decoders need left-padded prompts (padding, then tokens, in every row): set "
            "tokenizer.padding_side='left'."
        )


def _check_nat_processors(generation_mode: str, processors: LogitsProcessorList) -> None:
    """NAT commits positions out of order, so a processor that reads the text before a position cannot apply."""
    supported = POSITION_FREE_WARPERS + LENGTH_PROCESSORS
    unsupported = [type(processor).__name__ for processor in processors if not isinstance(processor, supported)]
    if unsupported:
        raise ValueError(
            f"generation_mode={generation_mode!r} fills positions out of order and cannot apply {unsupported} "
            "(penalties, n-gram bans, forced or suppressed tokens); only sampling warpers and min length work."
        )


def _crop(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` slots of every layer (`DynamicCache.crop` takes the number of slots to drop)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


def _positions(live: torch.Tensor) -> torch.LongTensor:
    """Position of every slot: live slots count up from 0 per row; dead slots repeat the previous position."""
    return (live.long().cumsum(-1) - 1).clamp(min=0)


# --------------------------------------------------------------------------------------------------- SAT


class _SlotCache:
    """A KV cache whose slots are per row: live slots hold the row's tokens in order, dead slots are masked out.

    Rows advance by different amounts, so every forward appends the same number of slots to each row and marks the
    extra ones dead; a re-encoded block retires its stale slots the same way. Positions, and with them SAT blocks,
    count live slots only, so dead slots change nothing. Dead slots at the end of every row are cropped.
    """

    def __init__(self, run: _DecodingRun, objective: str):
        self.run = run
        self.objective = objective
        self.cache = DynamicCache(config=run.config)
        self.live = torch.zeros((run.input_ids.shape[0], 0), dtype=torch.bool, device=run.input_ids.device)

    def forward(self, tokens: torch.LongTensor, live: torch.Tensor) -> torch.Tensor:
        self._crop_dead_tail()
        mask = torch.cat([self.live, live], dim=-1)
        positions = _positions(mask)[:, -tokens.shape[1] :]
        hidden = self.run.trunk(
            self.objective, tokens, attention_mask=mask.long(), position_ids=positions, cache=self.cache
        )
        self.live = mask
        return hidden

    def retire(self, row: int, count: int) -> None:
        """Mark the last `count` live slots of `row` dead (their tokens are about to be fed again)."""
        if count:
            slots = self.live[row].nonzero()[-count:, 0]
            self.live[row, slots] = False

    def _crop_dead_tail(self) -> None:
        live_columns = self.live.any(0).nonzero()
        keep = int(live_columns[-1]) + 1 if len(live_columns) else 0
        if keep < self.live.shape[1]:
            _crop(self.cache, keep)
            self.live = self.live[:, :keep]


@dataclass
class _SatRow:
    tokens: list[int]  # the row's real tokens: prompt without padding, then new tokens
    hidden: torch.Tensor  # hidden states of its last (up to) b tokens, as cached
    generated: list[int]
    finished: bool = False
    sat_started: bool = False  # sat_compat: AR alignment only before the first SAT step, as AGILLM 4.x


def _sat_generate(run: _DecodingRun, sat_stride: str, sat_compat: bool) -> list[list[int]]:
    if sat_stride not in ("gate", "fixed"):
        raise ValueError(f"sat_stride must be 'gate' or 'fixed', got {sat_stride!r}.")
    block = run.config.sat_block_size
    slots = _SlotCache(run, "sat")
    prompt_live = run.attention_mask.bool()
    hidden = slots.forward(run.input_ids, prompt_live)
    rows = [
        _SatRow(tokens=run.input_ids[r][live].tolist(), hidden=hidden[r][live][-block:], generated=[])
        for r, live in enumerate(prompt_live)
    ]
    while True:
        plans = {}
        for r, row in enumerate(rows):
            if not row.finished:
                plan = _sat_row_step(run, r, row, block, sat_stride, sat_compat)
                if plan is not None:
                    plans[r] = plan
        if not plans:
            return [row.generated for row in rows]
        _sat_feed(run, slots, rows, plans)


def _sat_row_step(run, r: int, row: _SatRow, block: int, sat_stride: str, sat_compat: bool):
    """Emit this row's next token(s); return `(stale slots to retire, tokens to feed)`, or None once finished."""
    cached_in_block = len(row.tokens) % block  # tokens of the unfinished last block, all cached
    if cached_in_block and not (sat_compat and row.sat_started):
        # The AR head on the SAT-masked hidden extends the unfinished block (AGILLM 4.x aligns odd prompts so).
        emitted = _emit(run, r, row, [run.model.lm_head(row.hidden[-1])])
        if row.finished:
            return None
        if sat_compat:  # fed alone (AGILLM 4.x passes no mask: for one query over the cache, the same thing)
            return 0, emitted
        # Re-encode the unfinished block with its new token over its stale slots: under the SAT mask the tokens
        # of a block see each other, so the cache stays what a SAT pass over the whole text computes.
        return cached_in_block, row.tokens[-(cached_in_block + 1) :]
    row.sat_started = True
    logits, gate_logits = run.model.sat_head(row.hidden[None])  # [1, b, vocab], [1, b, b]
    logits = logits[0].float()
    logits[:, run.mask_token_id] = -math.inf  # AGILLM 4.x bans BLANK (its NAT mask id) from SAT output
    stride = block if sat_stride == "fixed" else int(run.pick(gate_logits[0, 0].float())) + 1
    emitted = _emit(run, r, row, list(logits[:stride]))
    return None if row.finished else (0, emitted)


def _emit(run: _DecodingRun, r: int, row: _SatRow, logits_per_token: list[torch.Tensor]) -> list[int]:
    """Choose tokens one after the other (each with the history so far); stop at EOS or the token budget."""
    emitted = []
    for logits in logits_per_token:
        token = run.next_token(r, row.generated, logits)
        emitted.append(token)
        row.generated.append(token)
        row.tokens.append(token)
        if run.is_eos(token) or len(row.generated) >= run.max_new_tokens:
            row.finished = True
            break
    return emitted


def _sat_feed(run, slots: _SlotCache, rows: list[_SatRow], plans: dict) -> None:
    """One forward that caches every row's planned tokens (rows with fewer tokens get dead slots)."""
    width = max(len(tokens) for _, tokens in plans.values())
    batch = len(rows)
    device = run.input_ids.device
    tokens = torch.full((batch, width), run.pad_token_id, dtype=torch.long, device=device)
    live = torch.zeros((batch, width), dtype=torch.bool, device=device)
    for r, (retire, planned) in plans.items():
        slots.retire(r, retire)
        tokens[r, : len(planned)] = torch.tensor(planned, dtype=torch.long, device=device)
        live[r, : len(planned)] = True
    hidden = slots.forward(tokens, live)
    for r, (_, planned) in plans.items():
        rows[r].hidden = torch.cat([rows[r].hidden, hidden[r, : len(planned)]])[-run.config.sat_block_size :]


# --------------------------------------------------------------------------------------------------- NAT mask-predict


def _nat_mask_predict_generate(run: _DecodingRun, nat_passes: int) -> list[list[int]]:
    if not isinstance(nat_passes, int) or nat_passes < 1:
        raise ValueError(f"nat_passes must be a positive integer, got {nat_passes!r}.")
    batch, width = run.input_ids.shape
    new = run.max_new_tokens
    device = run.input_ids.device
    canvas = torch.cat([run.input_ids, torch.full((batch, new), run.mask_token_id, device=device)], dim=-1)
    live = torch.cat([run.attention_mask, torch.ones((batch, new), dtype=torch.long, device=device)], dim=-1)
    positions = _positions(live)
    masked = torch.ones((batch, new), dtype=torch.bool, device=device)
    new_index = torch.arange(new, device=device)
    for finished_passes in range(nat_passes):
        remaining = int(masked[0].sum())  # every row has the same number left
        if remaining == 0:
            break
        hidden = run.trunk("nat", canvas, attention_mask=live, position_ids=positions)
        logits = run.nat_scores(run.model.nat_head(hidden[:, width:]), new_index)
        confidence = logits.softmax(-1).amax(-1).masked_fill(~masked, -1.0)
        count = math.ceil(remaining / (nat_passes - finished_passes))
        # Most confident first; the stable sort sends ties to the left, as AGILLM 4.x's sorted() does.
        chosen = confidence.sort(dim=-1, descending=True, stable=True).indices[:, :count]
        rows = torch.arange(batch, device=device)[:, None].expand_as(chosen)
        canvas[:, width:][rows, chosen] = run.nat_pick(logits[rows, chosen].reshape(-1, logits.shape[-1])).reshape(
            chosen.shape
        )
        masked[rows, chosen] = False
    return [run.cut_after_eos(row.tolist()) for row in canvas[:, width:]]


# --------------------------------------------------------------------------------------------------- NAT block


@dataclass
class _BlockCanvas:
    """Prompts and new positions laid out so that NAT block boundaries fall on the same slots in every row.

    Row r's complete prompt blocks end at slot `start` (left-padded by whole blocks); its unfinished prompt block
    (`tail` tokens) and its new positions follow. Slots: `tokens` (mask id where unknown), `live` (not padding),
    `target` (new positions still to decode), `new` (new positions).
    """

    tokens: torch.LongTensor
    live: torch.Tensor
    target: torch.Tensor
    new: torch.Tensor
    start: int
    tails: list[int]

    @classmethod
    def build(cls, run: _DecodingRun, block: int) -> "_BlockCanvas":
        lengths = run.attention_mask.sum(-1).tolist()
        start = max(length // block for length in lengths) * block
        tails = [length % block for length in lengths]
        width = start + max(tails) + run.max_new_tokens
        batch, device = len(lengths), run.input_ids.device
        tokens = torch.full((batch, width), run.mask_token_id, dtype=torch.long, device=device)
        live, new = (torch.zeros((batch, width), dtype=torch.bool, device=device) for _ in range(2))
        for r, length in enumerate(lengths):
            first = start - (length - tails[r])
            end = start + tails[r]
            tokens[r, first:end] = run.input_ids[r, run.input_ids.shape[1] - length :]
            live[r, first : end + run.max_new_tokens] = True
            new[r, end : end + run.max_new_tokens] = True
        return cls(tokens=tokens, live=live, target=new.clone(), new=new, start=start, tails=tails)

    def new_tokens(self, run: _DecodingRun) -> list[list[int]]:
        rows = []
        for r, tail in enumerate(self.tails):
            first = self.start + tail
            rows.append(run.cut_after_eos(self.tokens[r, first : first + run.max_new_tokens].tolist()))
        return rows

    def stop_after_eos(self, eos_ids: set[int]) -> None:
        """Positions after a row's first committed EOS are never decoded (the output ends at that EOS)."""
        if not eos_ids:
            return
        eos = torch.isin(self.tokens, torch.tensor(sorted(eos_ids), device=self.tokens.device))
        committed_eos = (eos & self.new & ~self.target).long()
        after_first = (committed_eos.cumsum(-1) - committed_eos) > 0
        self.target &= ~after_first


def _nat_block_generate(run: _DecodingRun, nat_threshold: float, use_block_cache: bool) -> list[list[int]]:
    block = run.config.nat_block_size
    canvas = _BlockCanvas.build(run, block)
    positions = _positions(canvas.live)
    cache = DynamicCache(config=run.config) if use_block_cache else None
    width = canvas.tokens.shape[1]
    cached = 0  # slots [0, cached) are in the cache: clean, complete blocks
    block_start = canvas.start
    while block_start < width and canvas.target.any():
        block_end = min(block_start + block, width)
        while (todo := canvas.target[:, block_start:block_end]).any():
            if cache is not None:
                # [clean blocks not cached yet ; current block]; keep the clean ones, drop the noisy block's keys.
                hidden = run.trunk(
                    "nat",
                    canvas.tokens[:, cached:block_end],
                    attention_mask=canvas.live[:, :block_end].long(),
                    position_ids=positions[:, cached:block_end],
                    cache=cache,
                )[:, block_start - cached :]
                _crop(cache, block_start)
                cached = block_start
            else:
                hidden = run.trunk(
                    "nat",
                    canvas.tokens[:, :block_end],
                    attention_mask=canvas.live[:, :block_end].long(),
                    position_ids=positions[:, :block_end],
                )[:, block_start:]
            _commit_confident(run, canvas, hidden, todo, block_start, nat_threshold)
        block_start = block_end
    return canvas.new_tokens(run)


def _commit_confident(run, canvas: _BlockCanvas, hidden, todo, block_start: int, threshold: float) -> None:
    """Commit every masked position with confidence >= threshold, and at least the most confident one per row."""
    block_end = block_start + todo.shape[1]
    new_index = canvas.new[:, :block_end].long().cumsum(-1)[:, block_start:] - 1
    logits = run.nat_scores(run.model.nat_head(hidden), new_index)
    confidence = logits.softmax(-1).amax(-1).masked_fill(~todo, -1.0)
    commit = (confidence >= threshold) & todo
    best = confidence.argmax(-1)
    rows = torch.arange(len(todo), device=todo.device)
    commit[rows, best] |= todo.any(-1)
    window = canvas.tokens[:, block_start:block_end]
    window[commit] = run.nat_pick(logits[commit])
    canvas.target[:, block_start:block_end] &= ~commit
    canvas.stop_after_eos(run.eos_ids)


# --------------------------------------------------------------------------------------------------- staged


class _NatBlockDrafter:
    """Drafts the rest of the current NAT block in one denoising forward, over an exact cache of finished blocks."""

    def __init__(self, run: _DecodingRun, draft_length: int | None):
        self.run = run
        self.block = run.config.nat_block_size
        self.draft_length = draft_length
        self.cache = DynamicCache(config=run.config)
        self.cached = 0  # tokens [0, cached) are in the cache: whole accepted blocks

    def draft(self, tokens: list[int], budget: int) -> list[int]:
        block_start = len(tokens) // self.block * self.block
        masks = block_start + self.block - len(tokens)
        count = min(masks, budget, self.draft_length or masks)
        if count <= 0:
            return []
        # Blocks finished since the last draft are encoded clean in the same forward, then kept; the current
        # block (known tokens + masks) is dropped from the cache again.
        fed = tokens[self.cached :] + [self.run.mask_token_id] * masks
        hidden = self.run.trunk("nat", _as_ids(self.run, fed), cache=self.cache)
        _crop(self.cache, block_start)
        self.cached = block_start
        return _argmax_draft(self.run, _head_logits(self.run.model.nat_head, hidden[0, len(fed) - masks :][:count]))


class _BidirectionalNatDrafter:
    """Drafts `draft_length` tokens after the text in one bidirectional NAT forward (no cache: all tokens interact)."""

    def __init__(self, run: _DecodingRun, draft_length: int | None):
        self.run = run
        self.draft_length = draft_length or DEFAULT_BIDIRECTIONAL_DRAFT_LENGTH

    def draft(self, tokens: list[int], budget: int) -> list[int]:
        count = min(self.draft_length, budget)
        if count <= 0:
            return []
        hidden = self.run.trunk("nat", _as_ids(self.run, tokens + [self.run.mask_token_id] * count))
        return _argmax_draft(self.run, _head_logits(self.run.model.nat_head, hidden[0, -count:]))


class _SatDrafter:
    """Drafts the SAT head's predictions from the last complete block; its cache holds complete blocks only."""

    def __init__(self, run: _DecodingRun, draft_length: int | None):
        self.run = run
        self.block = run.config.sat_block_size
        self.draft_length = draft_length
        self.cache = DynamicCache(config=run.config)
        self.cached = 0
        self.last_block_hidden = None

    def draft(self, tokens: list[int], budget: int) -> list[int]:
        aligned = len(tokens) // self.block * self.block
        known = len(tokens) - aligned  # tokens of the next block that are already accepted
        count = min(self.block - known, budget, self.draft_length or self.block)
        if aligned == 0 or count <= 0:
            return []
        if self.cached < aligned:
            hidden = self.run.trunk("sat", _as_ids(self.run, tokens[self.cached : aligned]), cache=self.cache)
            self.cached = aligned
            self.last_block_hidden = hidden[0, -self.block :]
        # Position t of the last block predicts token t + b, whatever the tokens after that block are.
        return _argmax_draft(self.run, self.run.model.sat_head.proj(self.last_block_hidden[known : known + count]))


def _head_logits(head: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """`head(rows)` for the handful of rows a draft or a verification scores.

    On CPU, torch's linear runs 2 or 3 rows against a vocabulary-sized weight at 2-3x the time of one row (measured,
    one thread: SmolLM2's 49152 x 576 head 6.9 / 14.7 / 21.8 ms for 1 / 2 / 3 rows); `weight @ rows.T` is the same
    product in 4.7 / 6.3 ms. Only a plain float `nn.Linear` without bias or hooks takes that route: quantized,
    adapted (PEFT) or offloaded heads run as they are.
    """
    plain = type(head) is torch.nn.Linear and head.bias is None and not head._forward_hooks
    plain = plain and not head._forward_pre_hooks and not hasattr(head, "_hf_hook")
    if not plain or rows.device.type != "cpu" or rows.dtype != head.weight.dtype or rows.shape[0] not in (2, 3):
        return head(rows)
    return (head.weight @ rows.T).T


def _as_ids(run: _DecodingRun, tokens: list[int]) -> torch.LongTensor:
    return torch.tensor([tokens], dtype=torch.long, device=run.input_ids.device)


def _argmax_draft(run: _DecodingRun, logits: torch.Tensor) -> list[int]:
    logits = logits.float()
    logits[..., run.mask_token_id] = -math.inf
    return logits.argmax(-1).tolist()


def _make_drafter(run: _DecodingRun, draft: str | None, draft_length: int | None):
    heads = run.config.heads
    if draft is None:
        draft = "nat" if "nat" in heads else "sat" if "sat" in heads else None
        if draft is None:
            raise ValueError(f"generation_mode='staged' drafts with the NAT or SAT head; this model has {heads=}.")
    if draft not in ("nat", "sat"):
        raise ValueError(f"draft must be 'nat' or 'sat', got {draft!r}.")
    if draft not in heads:
        raise ValueError(f"draft={draft!r} needs the {draft!r} head; this model has heads={heads}.")
    if draft_length is not None and (not isinstance(draft_length, int) or draft_length < 1):
        raise ValueError(f"draft_length must be a positive integer or None, got {draft_length!r}.")
    if draft == "sat":
        return _SatDrafter(run, draft_length)
    if run.config.nat_block_size is None:
        return _BidirectionalNatDrafter(run, draft_length)
    return _NatBlockDrafter(run, draft_length)


def _single_prompt(run: _DecodingRun, generation_mode: str) -> list[int]:
    """The one prompt of a draft-and-verify decoder, padding removed (they decode one sequence at a time)."""
    if run.input_ids.shape[0] != 1:
        raise ValueError(
            f"generation_mode={generation_mode!r} decodes one sequence at a time (like assisted generation); got a "
            f"batch of {run.input_ids.shape[0]}. Call it per prompt."
        )
    padding = run.input_ids.shape[1] - int(run.attention_mask.sum())
    return run.input_ids[0, padding:].tolist()


def _staged_generate(run: _DecodingRun, draft: str | None, draft_length: int | None) -> list[list[int]]:
    tokens = _single_prompt(run, "staged")
    drafter = _make_drafter(run, draft, draft_length)
    cache = DynamicCache(config=run.config)
    cached = 0  # tokens [0, cached) are in the AR cache
    generated: list[int] = []
    while True:
        budget = run.max_new_tokens - len(generated)
        proposal = drafter.draft(tokens, budget - 1)  # the verify forward always adds one token of its own
        fed = tokens[cached:]
        hidden = run.trunk("ar", _as_ids(run, fed + proposal), cache=cache)
        # hidden[i] for i >= len(fed) - 1 predicts the token after tokens + proposal[: i - len(fed) + 1]
        logits = _head_logits(run.model.lm_head, hidden[0, len(fed) - 1 :])
        accepted = _verify(run, generated, proposal, logits)
        _crop(cache, len(tokens) + len(accepted) - 1)  # everything verified except the last token, not fed yet
        cached = len(tokens) + len(accepted) - 1
        tokens += accepted
        generated += accepted
        if run.is_eos(generated[-1]) or len(generated) >= run.max_new_tokens:
            return [generated]


def _verify(run: _DecodingRun, generated: list[int], proposal: list[int], logits: torch.Tensor) -> list[int]:
    """The tokens AR itself emits at these positions, given the proposal: a prefix of it, then one of AR's own.

    Greedy: a proposed token stays while it is AR's argmax. Sampling (speculative sampling with a deterministic
    draft): it stays with probability p(token), else the position is drawn from p without it.
    """
    # Plain greedy (no processor reads the history): one argmax over every row, on fp32 scores as `generate` and
    # `run.scores` take it.
    plain_argmax = logits.float().argmax(-1).tolist() if not run.do_sample and len(run.processors) == 0 else None
    accepted = []
    for index, logit in enumerate(logits):
        proposed = proposal[index] if index < len(proposal) else None
        if plain_argmax is not None:
            token = plain_argmax[index]
        elif not run.do_sample:
            token = int(run.scores(run.history(0, generated + accepted), logit).argmax())
        else:
            probs = run.scores(run.history(0, generated + accepted), logit).softmax(-1)
            if proposed is not None and torch.rand((), device=probs.device) < probs[proposed]:
                token = proposed
            else:
                if proposed is not None:
                    probs[proposed] = 0.0
                token = int(torch.multinomial(probs / probs.sum(), 1))
        accepted.append(token)
        if token != proposed or run.is_eos(token):
            return accepted
    return accepted


# --------------------------------------------------------------------------------------------------- verify and draft


class _DraftLayout:
    """The tokens of one `verify_and_draft` forward and who sees whom (TiDAR's structured mask).

    New tokens, after `cached` tokens in the cache: the accepted tokens not fed yet (`pending`), the drafts
    d_1 .. d_k, then k + 1 mask blocks of `block` masks. Pending tokens and drafts are causal over the cache and each
    other: the AR head verifies every draft and the cache they leave is exactly AR's. Mask block j stands for the
    text after "pending + d_1 .. d_j": it sees the cache, the pending tokens and the first j drafts, and its own
    masks both ways; its slot 0 sits where AR's own token will go, slots 1 .. k are the next drafts.
    """

    def __init__(self, pending: list[int], drafts: list[int], cached: int, block: int, mask_token_id: int):
        self.pending, self.cached, self.block = pending, cached, block
        self.causal = len(pending) + len(drafts)
        self.num_blocks = len(drafts) + 1
        self.tokens = pending + drafts + [mask_token_id] * (self.num_blocks * block)

    def position_ids(self, device) -> torch.LongTensor:
        start = self.cached + len(self.pending)  # position of d_1, and of mask block 0's slot 0
        causal = torch.arange(self.cached, self.cached + self.causal, device=device)
        slots = torch.arange(self.block, device=device)
        masks = (start + torch.arange(self.num_blocks, device=device)[:, None] + slots).reshape(-1)
        return torch.cat([causal, masks])[None]

    def mask(self, config, dtype, device) -> torch.Tensor:
        """The attention mask over [cache ; new tokens], built by the attention implementation's mask function.

        Pure index arithmetic on the query and key indices (no captured tensors), which every mask interface
        (eager, sdpa, flex's block mask) evaluates the same way.
        """
        first_mask = self.cached + self.causal  # index of mask block 0's first slot
        first_draft = self.cached + len(self.pending)
        block = self.block

        def draft_layout(batch_idx, head_idx, q_idx, kv_idx):
            q_block = (q_idx - first_mask) // block  # >= 0 for masks
            q_is_mask, kv_is_mask = q_idx >= first_mask, kv_idx >= first_mask
            # Outside its own block, a causal token sees itself and what precedes it; mask block j sees the cache,
            # the pending tokens and d_1 .. d_j.
            visible_end = torch.where(q_is_mask, first_draft + q_block, q_idx + 1)
            own_block = q_is_mask & kv_is_mask & ((kv_idx - first_mask) // block == q_block)
            return (kv_idx < visible_end) | own_block

        return ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation](
            batch_size=1, q_length=len(self.tokens), kv_length=self.cached + len(self.tokens), q_offset=self.cached,
            kv_offset=0, mask_function=draft_layout, attention_mask=None, allow_is_causal_skip=False, dtype=dtype,
            config=config, device=device,
        )  # fmt: skip

    def ar_rows(self) -> slice:
        """Hidden rows whose AR logits score d_1 .. d_k and the token after the last of them."""
        return slice(len(self.pending) - 1, self.causal)

    def next_drafts(self, accepted_drafts: int, count: int) -> slice:
        """Hidden rows of slots 1 .. count of the mask block that follows `accepted_drafts` accepted drafts."""
        start = self.causal + accepted_drafts * self.block + 1
        return slice(start, start + count)


def _verify_and_draft_generate(run: _DecodingRun, draft_length: int | None) -> list[list[int]]:
    """One forward per round: AR verifies the drafts, NAT drafts the next ones for every possible outcome."""
    pending = _single_prompt(run, "verify_and_draft")  # accepted, not in the cache yet; first the whole prompt
    block = run.config.nat_block_size
    if draft_length is not None and (not isinstance(draft_length, int) or not 1 <= draft_length < block):
        raise ValueError(f"draft_length must be an integer in [1, nat_block_size - 1 = {block - 1}], got "
                         f"{draft_length!r}.")
    draft_length = draft_length or block - 1
    cache = DynamicCache(config=run.config)
    cached, drafts, generated = 0, [], []
    device, dtype = run.input_ids.device, run.model.get_input_embeddings().weight.dtype
    while True:
        layout = _DraftLayout(pending, drafts, cached, block, run.mask_token_id)
        hidden = run.trunk(
            "nat", _as_ids(run, layout.tokens), attention_mask={"full_attention": layout.mask(run.config, dtype, device)},
            position_ids=layout.position_ids(device), cache=cache,
        )[0]
        accepted = _verify(run, generated, drafts, _head_logits(run.model.lm_head, hidden[layout.ar_rows()]))
        generated += accepted
        if run.is_eos(generated[-1]) or len(generated) >= run.max_new_tokens:
            return [generated]
        accepted_drafts = len(accepted) - 1  # then AR's own token (an accepted EOS draft has returned above)
        # Keep the K/V of the pending tokens and the accepted drafts (exact AR states); drop the rest.
        cached += len(pending) + accepted_drafts
        _crop(cache, cached)
        pending = accepted[accepted_drafts:]  # AR's own token
        count = min(draft_length, run.max_new_tokens - len(generated) - 1)  # the next verify adds one of its own
        draft_rows = hidden[layout.next_drafts(accepted_drafts, count)]
        drafts = _argmax_draft(run, _head_logits(run.model.nat_head, draft_rows))
