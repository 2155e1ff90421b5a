"""Memory held by a filled KV cache: `cache_bytes(cache)` and `cache_bytes_per_token(cache, batch_size)`.

The count is of real storage, found by walking what every cache layer holds, so it needs no knowledge of the layer
type and covers, unchanged:
    - `DynamicLayer` / `StaticLayer` (`keys`, `values`; a static layer counts its whole preallocated buffer);
    - quantised layers (`QuantizedCache`): the packed integer tensors, their scales and zero-points (kept in HQQ's
      `meta` dict, or inside quanto's tensor subclasses), and the full-precision residual window (`keys`, `values`);
    - layers that store nothing (`DummyLayer` for KV-shared layers: `keys = values = None`), which count 0;
    - layers whose tensors are shared with another layer or with each other, which count once.

What is counted is each distinct storage's size, not each tensor's `numel() * element_size()`: a view (e.g. a
sliding-window slice, or values that are a slice of a fused projection output) keeps its whole buffer alive, and
two layers pointing at the same buffer do not hold it twice.

Usage, on the cache `generate` filled:

    out = model.generate(ids, return_dict_in_generate=True, cache_implementation="quantized",
                         cache_config={"backend": "hqq", "nbits": 4, "axis_key": 1, "axis_value": 1,
                                       "q_group_size": model.config.head_dim})
    cache_bytes_per_token(out.past_key_values, batch_size=ids.shape[0])
"""

from collections.abc import Iterator, Mapping

import torch
from transformers.cache_utils import Cache


def _held_tensors(value) -> Iterator[torch.Tensor]:
    """The plain tensors reachable from `value`: itself, the inner tensors of a tensor subclass, or the items of a
    list, tuple or mapping (recursively). Anything else (ints, dtypes, shapes, classes) holds no cache memory."""
    if isinstance(value, torch.Tensor):
        if hasattr(type(value), "__tensor_flatten__"):
            # A wrapper subclass (e.g. quanto's packed int4 tensors): its own storage is empty, the bytes are in
            # the inner tensors it names.
            inner_names, _ = value.__tensor_flatten__()
            for name in inner_names:
                yield from _held_tensors(getattr(value, name))
        else:
            yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _held_tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _held_tensors(item)


def cache_bytes(cache: Cache) -> int:
    """Bytes of storage held by all layers of `cache`, each distinct buffer counted once (see the module docstring)."""
    if not isinstance(cache, Cache):
        raise TypeError(f"cache_bytes expects a transformers `Cache` (e.g. `past_key_values`), got {type(cache).__name__}.")
    seen = set()
    total = 0
    for layer in cache.layers:
        for tensor in _held_tensors(vars(layer)):
            storage = tensor.untyped_storage()
            key = (storage.device, storage.data_ptr())
            if storage.nbytes() == 0 or key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
    return total


def cache_bytes_per_token(cache: Cache, batch_size: int) -> float:
    """`cache_bytes(cache)` per cached position of one sequence: divided by the cached length and the batch size.

    The length is `cache.get_seq_length()` (layer 0's), i.e. every token seen so far; a sliding-window layer that
    keeps fewer still divides by it, so the figure shows what such a layer saves on a long sequence."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    length = cache.get_seq_length()
    if length == 0:
        raise ValueError("The cache is empty: fill it (a forward with use_cache=True, or generate) before measuring.")
    return cache_bytes(cache) / (length * batch_size)
