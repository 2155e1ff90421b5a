"""A KV cache stored as int8 or int4 and a decode attention that reads it without dequantizing the whole cache.

transformers' `QuantizedCache` (HQQ / quanto backends) keeps a full-precision residual window and, on every
`update`, dequantizes the whole quantized cache and returns full-precision keys and values: each decode step reads
and writes a full-precision copy of the cache. Here:

* `QuantizedKVCache` / `QuantizedKVLayer` (a transformers `Cache` of `CacheLayerMixin` layers) store every token's
  keys and values as unsigned integer codes (8 bits, or 4 bits packed two per byte) with an fp32 scale and offset
  per token, head and group of `group_size` channels (asymmetric min-max rounding: `x ~ code * scale + offset`).
  Appending quantizes only the new tokens, into a buffer that grows geometrically (no copy of the cache per step).
* `update` returns `QuantizedKV` tensors: a `torch.Tensor` wrapper subclass with the cache's shape that carries the
  codes, scales and offsets of the earlier tokens plus the tokens of this call at full precision (they come back
  exact, as `DynamicLayer` and `QuantizedLayer` return them; a prefill into an empty layer gets plain tensors).
  Any torch operation on a `QuantizedKV` sees its dequantized value (`__torch_dispatch__`), so every attention
  implementation (sdpa, eager, flex, ...) stays correct with this cache.
* `quantized_kv_attention`, registered as attention implementation `"agillm_qkv"` (`register()`, called by
  `kernels.enable()`), recognises `QuantizedKV` keys and values and computes attention from the codes, one
  tile of tokens at a time inside an online softmax (flash-attention style): scores are `(q . codes) * scale` plus
  the offset term and the values' scales are folded into the probabilities (`quantized_scores`,
  `quantized_weighted_sum`; smaller groups dequantize the tile), so no full-precision copy of the cache is built.
  Plain keys and values (a prefill, a model without this cache) go to transformers' sdpa. On CUDA the quantized
  part runs as a Triton kernel (`kernels.triton_quantized_kv`), which dequantizes each tile in registers.

Usage:

    import kernels
    kernels.enable()
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="agillm_qkv")
    cache = QuantizedKVCache(model.config, nbits=4, group_size=32)
    model.generate(ids, past_key_values=cache, max_new_tokens=...)

transformers has no registry of `cache_implementation` names (`generate` accepts only its own), so the cache is
passed as `past_key_values`.

Layout of int4 codes: byte `j` of a token holds channel `j` in its low nibble and channel `j + head_dim / 2` in its
high nibble, so unpacking is two masks and a concatenation (no interleave) and each half is a contiguous slice.
"""

from __future__ import annotations

import math

import torch
from torch.utils._pytree import tree_map
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


ATTENTION_NAME = "agillm_qkv"
SUPPORTED_NBITS = (8, 4)
# The PyTorch path reads the quantized tokens a tile at a time; a tile's codes cast to fp32 (the matmuls need floats
# on CPU) take about TILE_ELEMENTS * 4 bytes, 1 MiB: large enough that per-tile overhead is small (SmolLM2 shapes,
# one sequence: 1,365 tokens a tile; an 8k-token int8 decode step of one layer took 3.3 ms with 1,024-token tiles,
# 4.3 ms with 512 and 6.3 ms with 256 here), small enough to stay in a core's cache. TILE_SIZE, when set, fixes
# the tokens per tile instead (read at call time, e.g. by the tests).
TILE_ELEMENTS = 2**18
TILE_SIZE: int | None = None
REFINE_ITERATIONS = 20  # HQQ's default for its zero-point search (`refine_offsets`)


# --------------------------------------------------------------------------------------------------- quantization


def check_quantization(width: int, nbits: int, group_size: int | None) -> int:
    """The group size to use for states `width` channels wide (None: one group per head), or a ValueError."""
    if nbits not in SUPPORTED_NBITS:
        raise ValueError(f"nbits must be one of {SUPPORTED_NBITS}, got {nbits}.")
    group_size = width if group_size is None else group_size
    if group_size < 1 or width % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the cached width ({width}).")
    if nbits == 4 and width % 2:
        raise ValueError(f"int4 packs channel j with channel j + width / 2: the width ({width}) must be even.")
    return group_size


def quantize(states: torch.Tensor, nbits: int, group_size: int, refine_iterations: int = 0):
    """Asymmetric min-max quantization of `[..., width]` states in groups of `group_size` consecutive channels.

    Returns `(codes, scale, offset)`: uint8 codes `[..., width]` (int8) or `[..., width / 2]` (int4, packed), and
    fp32 `scale` and `offset` `[..., width / group_size]`, with `states ~ code * scale + offset`. With
    `refine_iterations`, the offsets are then refined as HQQ refines its zero points (`refine_offsets`).
    """
    width = states.shape[-1]
    groups = states.float().unflatten(-1, (width // group_size, group_size))
    minimum, maximum = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    levels = 2**nbits - 1
    scale = (maximum - minimum) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code 0, exact
    offset = minimum
    if refine_iterations:
        offset = refine_offsets(groups, scale, offset, levels, refine_iterations)
    codes = ((groups - offset) / scale).round_().clamp_(0, levels).to(torch.uint8).flatten(-2)
    if nbits == 4:
        low, high = codes.chunk(2, dim=-1)
        codes = low | (high << 4)
    return codes, scale[..., 0], offset[..., 0]


def refine_offsets(groups, scale, offset, levels: int, iterations: int, beta: float = 10.0, lp_norm: float = 0.7):
    """HQQ's half-quadratic zero-point search (Badri & Shaji 2023, as `hqq.core.optimize`, on `offset = -zero *
    scale`): alternately round, shrink the rounding error towards sparse outliers (an l_0.7 proximal step), and move
    the offset to the mean that explains the rest. Each group keeps its best offset by mean absolute error (the
    min-max start included, so never worse than plain rounding), over a fixed number of iterations so that a
    token's result never depends on the other tokens quantized with it. Groups `[..., G, group_size]`; `scale` and
    `offset` `[..., G, 1]`.

    The search is a discontinuous function of its input (a best-of choice between near-equal errors): a last-bit
    change in a state can pick another offset. In the tiny test model, eager vs sdpa attention upstream (1e-7
    apart) moved later logits by up to 7e-3 through a refined int4 cache, against exactly 0 with plain rounding."""
    best_offset, best_error = offset, torch.full_like(offset, math.inf)
    for _ in range(iterations):
        restored, next_offset = refine_offset_step(groups, scale, offset, levels, beta, lp_norm)
        error = (groups - restored).abs().mean(-1, keepdim=True)
        improved = error < best_error
        best_error, best_offset = torch.where(improved, error, best_error), torch.where(improved, offset, best_offset)
        offset = next_offset
    return best_offset


def refine_offset_step(groups, scale, offset, levels: int, beta: float = 10.0, lp_norm: float = 0.7):
    """One step of `refine_offsets`: the states as `offset` restores them, and the next offset (HQQ's
    `optimize_weights_proximal_legacy_step` with `zero = -offset / scale`)."""
    restored = ((groups - offset) / scale).round().clamp(0, levels) * scale + offset
    residual = groups - restored
    outliers = residual.sign() * (residual.abs() - residual.abs().pow(lp_norm - 1) / beta).clamp_min(0)
    return restored, offset + (residual - outliers).mean(-1, keepdim=True)


def unpack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """uint8 codes `[..., width]`, unpacking int4's two nibbles per byte (low half, then high half of the width)."""
    if nbits == 8:
        return codes
    return torch.cat([codes & 15, codes >> 4], dim=-1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, nbits: int) -> torch.Tensor:
    """fp32 states `[..., width]` from `quantize`'s output (the reference every attention path is checked against)."""
    values = unpack_codes(codes, nbits).float()
    groups = scale.shape[-1]
    values = values.unflatten(-1, (groups, values.shape[-1] // groups))
    return (values * scale[..., None] + offset[..., None]).flatten(-2)


# --------------------------------------------------------------------------------------------------- the tensor


class QuantizedKV(torch.Tensor):
    """Keys or values `[batch, heads, tokens, width]` as a cache layer holds them: the first `quantized_length`
    tokens as codes (`codes`, `scale`, `offset`: views of the layer's buffers), the last ones (`recent`, the states
    of the current `update` call) at full precision.

    `quantized_kv_attention` reads the parts directly. Any other torch operation sees the dequantized tensor (built
    by `dequantize_all`, the one place a full-precision copy of the cache is made).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    recent: torch.Tensor
    nbits: int

    @staticmethod
    def __new__(cls, codes, scale, offset, recent, nbits):
        batch, heads, quantized_length = codes.shape[:3]
        shape = (batch, heads, quantized_length + recent.shape[-2], recent.shape[-1])
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=recent.dtype, device=recent.device)

    def __init__(self, codes, scale, offset, recent, nbits):
        self.codes, self.scale, self.offset, self.recent, self.nbits = codes, scale, offset, recent, nbits

    @property
    def quantized_length(self) -> int:
        return self.codes.shape[2]

    def dequantize_tile(self, start: int, end: int) -> torch.Tensor:
        """fp32 states of quantized tokens `[start, end)`."""
        return dequantize(self.codes[:, :, start:end], self.scale[:, :, start:end], self.offset[:, :, start:end],
                          self.nbits)  # fmt: skip

    def dequantize_all(self) -> torch.Tensor:
        """The full-precision tensor this stands for (quantized part dequantized, then the recent states)."""
        quantized = self.dequantize_tile(0, self.quantized_length).to(self.dtype)
        return torch.cat([quantized, self.recent], dim=-2)

    def __repr__(self) -> str:
        return (f"QuantizedKV(shape={tuple(self.shape)}, nbits={self.nbits}, quantized={self.quantized_length}, "
                f"recent={self.recent.shape[-2]}, dtype={self.dtype})")  # fmt: skip

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def plain(value):
            return value.dequantize_all() if isinstance(value, QuantizedKV) else value

        return func(*tree_map(plain, args), **tree_map(plain, kwargs or {}))


# --------------------------------------------------------------------------------------------------- the cache


class QuantizedStates:
    """One growing buffer of quantized states (keys or values) of a layer: codes, scale and offset for `capacity`
    tokens, of which the first `length` are filled. Appending writes only the new tokens; when the buffer is full it
    is reallocated at twice the size (amortised O(1) per token, at most 2x the bytes of the filled part)."""

    def __init__(self, nbits: int, group_size: int, refine_iterations: int = 0):
        self.nbits, self.group_size, self.refine_iterations = nbits, group_size, refine_iterations
        self.codes = self.scale = self.offset = None
        self.length = 0

    @property
    def capacity(self) -> int:
        return 0 if self.codes is None else self.codes.shape[2]

    def append(self, states: torch.Tensor) -> None:
        codes, scale, offset = quantize(states, self.nbits, self.group_size, self.refine_iterations)
        new_length = self.length + states.shape[-2]
        if new_length > self.capacity:
            self._grow(codes, scale, offset, max(new_length, 2 * self.capacity))
        for buffer, part in ((self.codes, codes), (self.scale, scale), (self.offset, offset)):
            buffer[:, :, self.length : new_length] = part
        self.length = new_length

    def _grow(self, codes, scale, offset, capacity: int) -> None:
        def grown(old, new):
            buffer = new.new_empty((*new.shape[:2], capacity, new.shape[-1]))
            if old is not None:
                buffer[:, :, : self.length] = old[:, :, : self.length]
            return buffer

        self.codes, self.scale, self.offset = (grown(self.codes, codes), grown(self.scale, scale),
                                               grown(self.offset, offset))

    def parts(self, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of the first `end` (default: all) filled tokens: `(codes, scale, offset)`."""
        end = self.length if end is None else end
        return self.codes[:, :, :end], self.scale[:, :, :end], self.offset[:, :, :end]

    def apply(self, function) -> None:
        """Replace each buffer by `function(filled part)` (batch selection, reordering, device moves, cropping)."""
        if self.codes is not None:
            self.codes, self.scale, self.offset = (function(part) for part in self.parts())
            self.length = self.codes.shape[2]

    def nbytes(self) -> int:
        """Bytes of the filled part (codes, scales, offsets), without the unused capacity."""
        if self.codes is None:
            return 0
        return sum(part.numel() * part.element_size() for part in self.parts())


class QuantizedKVLayer(CacheLayerMixin):
    """A cache layer holding keys and values as int8 or int4 codes with per-token, per-head (per-group) scales.

    `update` quantizes only the new states and returns `QuantizedKV` keys and values: the earlier tokens as codes,
    the new ones exact (see the module docstring). Sliding-window layers keep every token here and get their window
    from the attention mask (correct, but the memory of a full layer).
    """

    is_sliding = False
    is_croppable = True

    def __init__(self, nbits: int = 8, group_size: int | None = None, refine_zero_points: bool = False, **kwargs):
        super().__init__()
        if nbits not in SUPPORTED_NBITS:
            raise ValueError(f"nbits must be one of {SUPPORTED_NBITS}, got {nbits}.")
        self.nbits, self.group_size = nbits, group_size
        self.refine_iterations = REFINE_ITERATIONS if refine_zero_points else 0
        self.quantized_keys = self.quantized_values = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        key_group = check_quantization(key_states.shape[-1], self.nbits, self.group_size)
        value_group = check_quantization(value_states.shape[-1], self.nbits, self.group_size)
        self.quantized_keys = QuantizedStates(self.nbits, key_group, self.refine_iterations)
        self.quantized_values = QuantizedStates(self.nbits, value_group, self.refine_iterations)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past_length = self.get_seq_length()
        self.quantized_keys.append(key_states)
        self.quantized_values.append(value_states)
        if past_length == 0:  # a prefill: nothing quantized to read yet
            return key_states, value_states
        keys = QuantizedKV(*self.quantized_keys.parts(past_length), key_states, self.nbits)
        values = QuantizedKV(*self.quantized_values.parts(past_length), value_states, self.nbits)
        return keys, values

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.quantized_keys.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes of the stored codes, scales and offsets (the filled part of the buffers)."""
        if not self.is_initialized:
            return 0
        return self.quantized_keys.nbytes() + self.quantized_values.nbytes()

    def _apply(self, function) -> None:
        if self.is_initialized:
            self.quantized_keys.apply(function)
            self.quantized_values.apply(function)

    def reset(self) -> None:
        self.quantized_keys = self.quantized_values = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda part: part.index_select(0, beam_idx.to(part.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda part: part.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda part: part[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}.")
        if tokens_to_remove and self.get_seq_length():
            self._apply(lambda part: part[:, :, :tokens_to_remove])

    def offload(self):
        self._apply(lambda part: part.to("cpu", non_blocking=True))

    def prefetch(self):
        self._apply(lambda part: part.to(self.device, non_blocking=True))


class QuantizedKVCache(Cache):
    """A `Cache` of `QuantizedKVLayer`s, one per decoder layer of `config` (its text config).

    Args:
        config: the model's config (`num_hidden_layers` layers are made).
        nbits: 8 or 4 (two codes per byte).
        group_size: channels sharing one scale and offset, per token and head; None: the whole head (enough for
            int8; int4 keeps more of the model's quality with 32 or 16, see `bench/quantized_kv.md`).
        refine_zero_points: refine each group's offset as HQQ does (`refine_offsets`, 20 iterations on every
            appended token): SmolLM2's held-out perplexity through int4 in groups of 32 went from +1.72% to
            +0.95% (HQQ's own `QuantizedCache`: +1.14%), groups of 16 from +1.05% to +0.72% (HQQ: +0.73%); no
            gain with one group per head; about 1 ms more per decode step and layer on CPU (bench/quantized_kv.md).
    """

    def __init__(self, config, nbits: int = 8, group_size: int | None = None, refine_zero_points: bool = False):
        num_layers = config.get_text_config(decoder=True).num_hidden_layers
        layers = [QuantizedKVLayer(nbits, group_size, refine_zero_points) for _ in range(num_layers)]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes of every layer's stored codes, scales and offsets."""
        return sum(layer.nbytes() for layer in self.layers)


# --------------------------------------------------------------------------------------------------- attention


def group_queries(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """`[B, H, Q, D]` -> `[B, H_kv, (H / H_kv) * Q, D]`: the query heads that share a key/value head, as rows."""
    batch, heads, q_len, width = query.shape
    return query.reshape(batch, num_kv_heads, heads // num_kv_heads * q_len, width)


def ungroup_output(output: torch.Tensor, num_heads: int, q_len: int) -> torch.Tensor:
    """`[B, H_kv, rows, D]` -> the attention interface's `[B, Q, H, D]`."""
    batch, width = output.shape[0], output.shape[-1]
    return output.reshape(batch, num_heads, q_len, width).transpose(1, 2)


def group_mask(attention_mask: torch.Tensor | None, num_kv_heads: int, repeats: int) -> torch.Tensor | None:
    """A `[B, 1 | H, Q, T]` mask (bool: True attends; float: added to the scores) as `[B, 1 | H_kv, rows, T]`."""
    if attention_mask is None:
        return None
    batch, mask_heads, q_len, kv_len = attention_mask.shape
    if mask_heads == 1:
        return attention_mask[:, :, None].expand(batch, 1, repeats, q_len, kv_len).reshape(batch, 1, -1, kv_len)
    return attention_mask.reshape(batch, num_kv_heads, repeats * q_len, kv_len)


def causal_tile_mask(rows: int, q_len: int, kv_len: int, start: int, end: int, sliding_window: int | None, device):
    """The mask an absent `attention_mask` stands for (sdpa's convention: causal, aligned to the last key; for one
    query, every key), for keys `[start, end)`: `[rows, end - start]` bool, rows repeating the queries per head."""
    query_positions = kv_len - q_len + torch.arange(rows, device=device) % q_len
    key_positions = torch.arange(start, end, device=device)
    allowed = key_positions[None, :] <= query_positions[:, None]
    if sliding_window is not None:
        allowed &= key_positions[None, :] > query_positions[:, None] - sliding_window
    return allowed


class OnlineSoftmax:
    """Running max `m`, normaliser `l` and unnormalised output `acc` of softmax attention over key tiles (fp32)."""

    def __init__(self, rows_shape: tuple[int, ...], width: int, device):
        self.m = torch.full(rows_shape, -math.inf, device=device)
        self.l = torch.zeros(rows_shape, device=device)
        self.acc = torch.zeros((*rows_shape, width), device=device)

    @classmethod
    def from_partial(cls, output: torch.Tensor, lse: torch.Tensor) -> "OnlineSoftmax":
        """The state after some tiles, from their normalised output and log-sum-exp (-inf: nothing attended)."""
        state = cls.__new__(cls)
        attended = torch.isfinite(lse)
        state.m, state.l = lse, attended.float()
        state.acc = torch.where(attended[..., None], output.float(), 0.0)
        return state

    def add_tile(self, scores: torch.Tensor, weighted_sum) -> None:
        """Fold a tile's `scores [..., rows, t]` in; `weighted_sum(p)` is `p @ values` of the tile."""
        m_new = torch.maximum(self.m, scores.amax(-1))
        m_safe = torch.where(torch.isfinite(m_new), m_new, 0.0)  # rows with nothing to attend yet stay at 0
        probabilities = torch.exp(scores - m_safe[..., None])
        correction = torch.exp(self.m - m_safe)
        self.l = self.l * correction + probabilities.sum(-1)
        self.acc = self.acc * correction[..., None] + weighted_sum(probabilities)
        self.m = m_new

    def output(self) -> torch.Tensor:
        """The attention output; rows that attended nothing (padding queries) are 0."""
        return self.acc / torch.where(self.l > 0, self.l, 1.0)[..., None]


# With one scale and offset per head and token (`x = code * scale + offset`), a tile needs no dequantized copy:
#     q . k         = scale * (q . code) + offset * sum(q)
#     sum_t p_t v_t = sum_t (p_t scale_t) code_t + sum_t p_t offset_t
# so it costs one cast of its codes to fp32 (matmuls need floats on CPU), the matmuls, and `[rows, t]`-sized
# products. With several groups per head the same folding needs one small matmul per group, which measured slower
# on CPU than dequantizing the tile (`code * scale + offset`, tile-sized) and one matmul, so that is done instead.


def quantized_scores(query_rows, codes, scale, offset, nbits: int) -> torch.Tensor:
    """`query_rows [B, H, M, D] @ keys^T` for a tile of quantized keys: `[B, H, M, t]`."""
    if scale.shape[-1] > 1:
        return query_rows @ dequantize(codes, scale, offset, nbits).transpose(-1, -2)
    codes = unpack_codes(codes, nbits).float()
    return ((query_rows @ codes.transpose(-1, -2)) * scale[..., 0].unsqueeze(-2)
            + query_rows.sum(-1, keepdim=True) * offset[..., 0].unsqueeze(-2))  # fmt: skip


def quantized_weighted_sum(probabilities, codes, scale, offset, nbits: int) -> torch.Tensor:
    """`probabilities [B, H, M, t] @ values` for a tile of quantized values: `[B, H, M, D]`."""
    if scale.shape[-1] > 1:
        return probabilities @ dequantize(codes, scale, offset, nbits)
    codes = unpack_codes(codes, nbits).float()
    return (probabilities * scale[..., 0].unsqueeze(-2)) @ codes + probabilities @ offset


def masked_scores(scores, mask, start, end, q_len, kv_len, sliding_window) -> torch.Tensor:
    """`scores` of keys `[start, end)` with the mask applied (-inf where not attended)."""
    if mask is None:
        allowed = causal_tile_mask(scores.shape[-2], q_len, kv_len, start, end, sliding_window, scores.device)
        return scores.masked_fill(~allowed, -math.inf)
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask[..., start:end], -math.inf)
    return scores + mask[..., start:end].float()


def quantized_attention_torch(query, key: QuantizedKV, value: QuantizedKV, attention_mask, scaling: float,
                              sliding_window: int | None = None, tile_size: int | None = None,
                              use_triton: bool = False) -> torch.Tensor:  # fmt: skip
    """Softmax attention of `query [B, H, Q, D]` over quantized `key`/`value` (`[B, H_kv, T, D]`), returning
    `[B, Q, H, D]`: the quantized tokens `tile_size` at a time (scored from the codes, folded into an online
    softmax), then the recent full-precision tokens. `use_triton`: the quantized part by the Triton kernel."""
    batch, num_heads, q_len, _ = query.shape
    num_kv_heads, kv_len = key.shape[1], key.shape[2]
    query_rows = group_queries(query.float() * scaling, num_kv_heads)
    mask = group_mask(attention_mask, num_kv_heads, num_heads // num_kv_heads)
    quantized_length = key.quantized_length
    tile_size = tile_size or TILE_SIZE or max(64, TILE_ELEMENTS // (batch * num_kv_heads * key.shape[-1]))

    if use_triton:
        from .triton_quantized_kv import quantized_attention_triton

        output, lse = quantized_attention_triton(query_rows, key, value, mask, q_len, kv_len, sliding_window)
        state = OnlineSoftmax.from_partial(output, lse)
    else:
        state = OnlineSoftmax(query_rows.shape[:-1], value.shape[-1], query.device)
        for start in range(0, quantized_length, tile_size):
            tile = slice(start, min(start + tile_size, quantized_length))
            scores = quantized_scores(query_rows, key.codes[:, :, tile], key.scale[:, :, tile], key.offset[:, :, tile],
                                      key.nbits)  # fmt: skip
            state.add_tile(
                masked_scores(scores, mask, tile.start, tile.stop, q_len, kv_len, sliding_window),
                lambda p, tile=tile: quantized_weighted_sum(p, value.codes[:, :, tile], value.scale[:, :, tile],
                                                            value.offset[:, :, tile], value.nbits),
            )  # fmt: skip
    recent_keys, recent_values = key.recent.float(), value.recent.float()
    scores = masked_scores(query_rows @ recent_keys.transpose(-1, -2), mask, quantized_length, kv_len, q_len, kv_len,
                           sliding_window)  # fmt: skip
    state.add_tile(scores, lambda p: p @ recent_values)
    return ungroup_output(state.output(), num_heads, q_len).to(query.dtype)


def quantized_kv_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           is_causal=None, sliding_window=None, **kwargs):  # fmt: skip
    """Attention implementation `"agillm_qkv"`: the tile-wise path when the cache gave `QuantizedKV` keys and
    values, transformers' sdpa otherwise (prefill into an empty cache, training, other caches)."""
    if not (isinstance(key, QuantizedKV) and isinstance(value, QuantizedKV)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)  # fmt: skip
    if dropout and module.training:
        raise ValueError("agillm_qkv attention over a quantized cache does not apply dropout; call model.eval().")
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None:
        raise ValueError("agillm_qkv attention supports neither softcap, position_bias nor attention sinks.")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads do not split into groups over {key.shape[1]} key/value heads.")
    if is_causal is False and attention_mask is None and query.shape[2] > 1:
        raise ValueError("agillm_qkv attention over a quantized cache needs a mask for non-causal attention.")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    output = quantized_attention_torch(query, key, value, attention_mask, scaling, sliding_window,
                                       use_triton=triton_enabled(query.device))  # fmt: skip
    return output, None


_TRITON_MODE: bool | None = None  # None: Triton on CUDA devices when triton imports


def use_triton(enabled: bool | None) -> None:
    """Force the Triton kernel on (`True`, e.g. on CPU under `TRITON_INTERPRET=1`) or off, or `None`: automatic."""
    global _TRITON_MODE
    _TRITON_MODE = enabled


def triton_enabled(device: torch.device) -> bool:
    if _TRITON_MODE is not None:
        return _TRITON_MODE
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def register() -> None:
    """Register `"agillm_qkv"` with transformers' attention and mask interfaces (sdpa's boolean masks)."""
    AttentionInterface.register(ATTENTION_NAME, quantized_kv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


__all__ = [
    "ATTENTION_NAME",
    "QuantizedKV",
    "QuantizedKVCache",
    "QuantizedKVLayer",
    "dequantize",
    "quantize",
    "quantized_attention_torch",
    "quantized_kv_attention",
    "register",
    "use_triton",
]
