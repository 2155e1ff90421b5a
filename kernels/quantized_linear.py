"""Weight-only int8 / int4 linear layers for CPU decode, on torch's packed CPU kernels.

Batch-1 decode reads every weight once per token and does two flops per weight: it is bound by memory bandwidth,
so a weight stored in 1 byte (int8) or half a byte (int4) instead of 4 (fp32) can decode up to 4x / 8x faster.
That only holds if the kernel reads the packed weight directly: torchao's CPU path materialises a float copy of
the weight per call and ends up slower than fp32. Here the matmuls go to ATen's fused kernels, which dequantize in
registers:

    int8  `aten._weight_int8pack_mm(x, w_int8 [N, K], scales [N])`: symmetric, one scale per output channel;
    int4  `aten._weight_int4pack_mm_for_cpu(x, w_packed, group_size, scales_and_zeros [K/g, N, 2])`: asymmetric,
          one (scale, zero) per group of `group_size` input channels ("tinygemm" layout: w = (q - 8) * scale + zero).

Activations are cast to `compute_dtype` around the kernel (bf16 by default: on AVX-512 CPUs both kernels have a
vectorised bf16 path and a much slower fp32 one; fp32 keeps the math exact on the dequantized weights). The rest
of the model (norms, attention, residual stream) keeps its own dtype.

`quantize_weights(model, bits=8)` swaps the `nn.Linear` layers of a loaded model in place; `AgillmWeightOnlyConfig`
does the same from `from_pretrained(..., quantization_config=...)` once `kernels.enable()` registered it. A tied
`lm_head` gets its own quantized copy of the embedding matrix: the head's matmul runs quantized while the
embedding lookup stays exact. Quantized models cannot be saved (see `AgillmWeightOnlyQuantizer.is_serializable`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer, _assign_is_quantized
from transformers.utils.quantization_config import QuantizationConfigMixin


logger = logging.getLogger(__name__)

QUANT_METHOD = "agillm_weight_only"
SUPPORTED_BITS = (4, 8)
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what `_weight_int4pack_mm_for_cpu` accepts
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_INT4_INNER_K_TILES = 2  # packing parameter of `_convert_weight_to_int4pack_for_cpu`; the CPU kernel ignores it


# ------------------------------------------------------------------------------------------ quantization math


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one fp32 scale per output row: `weight ~= qweight * scales[:, None]`."""
    weight = weight.detach().to(torch.float32)
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    qweight = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return qweight, scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return qweight.to(torch.float32) * scales.to(torch.float32)[:, None]


def quantize_int4_groupwise(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of `group_size` input channels (min/max over the group).

    Returns `codes` (int32 in [0, 15], `[N, K]`), `scales` and `zeros` (`[N, K / group_size]`, fp32) in the kernel's
    convention `weight ~= (codes - 8) * scale + zero` (`zero` is the value of code 8).
    """
    out_features, in_features = weight.shape
    groups = weight.detach().to(torch.float32).reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-12)  # a constant group keeps a tiny scale: its codes are all 0
    codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15)
    zeros = low + 8 * scales
    return codes.to(torch.int32).reshape(out_features, in_features), scales, zeros


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    out_features, in_features = codes.shape
    groups = codes.reshape(out_features, in_features // group_size, group_size).to(torch.float32)
    return ((groups - 8) * scales[..., None] + zeros[..., None]).reshape(out_features, in_features)


# ------------------------------------------------------------------------------------------ layers


class _WeightOnlyLinear(nn.Module):
    """Shared plumbing: flatten to 2-D, cast to the kernel's dtype, add the bias, restore shape and dtype."""

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype) -> None:
        super().__init__()
        if compute_dtype not in COMPUTE_DTYPES.values():
            raise ValueError(f"compute_dtype must be one of {list(COMPUTE_DTYPES.values())}, got {compute_dtype}.")
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", None)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The kernel's activation dtype: that of the scales (so `model.to(dtype)` keeps the two consistent)."""
        return self._scales().dtype

    def _scales(self) -> torch.Tensor:
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:  # x: [M, K] in compute_dtype
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects {self.in_features} input features, got {x.shape[-1]}.")
        flat = x.reshape(-1, self.in_features).to(self.compute_dtype).contiguous()  # the kernels need it
        out = self._matmul(flat).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _set_bias(self, linear: nn.Linear) -> None:
        if linear.bias is not None:
            self.bias = linear.bias.detach().clone()


class Int8WeightOnlyLinear(_WeightOnlyLinear):
    """`y = x @ (qweight * scales[:, None]).T + bias`, with `qweight` int8 `[out, in]` read directly by the kernel."""

    bits = 8

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(in_features, out_features, compute_dtype)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=compute_dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> "Int8WeightOnlyLinear":
        layer = cls(linear.in_features, linear.out_features, compute_dtype)
        qweight, scales = quantize_int8_per_channel(linear.weight)
        layer.qweight, layer.scales = qweight, scales.to(compute_dtype)  # the kernel wants scales in x's dtype
        layer._set_bias(linear)
        return layer

    def _scales(self) -> torch.Tensor:
        return self.scales

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight this layer multiplies by (what a float reference should use)."""
        return dequantize_int8(self.qweight, self.scales)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel, compute={self.compute_dtype}"


class Int4WeightOnlyLinear(_WeightOnlyLinear):
    """Group-wise asymmetric int4; the weight is stored in the CPU kernel's packed layout (`[out, in / 2]` uint8)."""

    bits = 4

    def __init__(
        self, in_features: int, out_features: int, group_size: int = 32, compute_dtype: torch.dtype = torch.bfloat16
    ) -> None:
        super().__init__(in_features, out_features, compute_dtype)
        check_int4_shape(in_features, group_size)
        self.group_size = group_size
        self.register_buffer("packed_weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer(
            "scales_and_zeros", torch.zeros(in_features // group_size, out_features, 2, dtype=compute_dtype)
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int = 32, compute_dtype: torch.dtype = torch.bfloat16
    ) -> "Int4WeightOnlyLinear":
        layer = cls(linear.in_features, linear.out_features, group_size, compute_dtype)
        codes, scales, zeros = quantize_int4_groupwise(linear.weight, group_size)
        layer.packed_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, _INT4_INNER_K_TILES)
        # kernel layout: [K / group_size, N, (scale, zero)], in the activations' dtype
        layer.scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(compute_dtype)
        layer._set_bias(linear)
        return layer

    def _scales(self) -> torch.Tensor:
        return self.scales_and_zeros

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight this layer multiplies by, read back through the kernel (x = identity)."""
        identity = torch.eye(self.in_features, dtype=torch.float32)
        columns = torch.ops.aten._weight_int4pack_mm_for_cpu(
            identity, self.packed_weight, self.group_size, self.scales_and_zeros.to(torch.float32)
        )
        return columns.T.contiguous()

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed_weight, self.group_size, self.scales_and_zeros
        )

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, int4 group {self.group_size}, "
                f"compute={self.compute_dtype}")


def check_int4_shape(in_features: int, group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}.")
    if in_features % group_size:
        raise ValueError(f"int4 needs in_features divisible by group_size; {in_features} % {group_size} != 0.")


def dequantized_reference_linear(layer: _WeightOnlyLinear, x: torch.Tensor) -> torch.Tensor:
    """Plain fp32 `F.linear` on the layer's dequantized weight, with the input rounded as the kernel sees it."""
    x32 = x.to(layer.compute_dtype).to(torch.float32)
    bias = None if layer.bias is None else layer.bias.to(torch.float32)
    return F.linear(x32, layer.dequantized_weight(), bias)


# ------------------------------------------------------------------------------------------ whole models


def quantize_weights(
    model: nn.Module,
    bits: int = 8,
    group_size: int = 32,
    compute_dtype: torch.dtype | str = torch.bfloat16,
    modules_to_not_convert: list[str] | None = None,
) -> nn.Module:
    """Replace every `nn.Linear` of `model` (in place) by its weight-only int8/int4 counterpart; returns `model`.

    The output head is quantized too. When it is tied to the input embedding, the head gets its own quantized copy
    (the embedding keeps its float weights, so token lookup stays exact) and the tie is dropped from the model's
    tie mapping, so that a later `tie_weights()` does not re-attach a float weight the quantized head would ignore.
    Layers named in `modules_to_not_convert` (exact names or name prefixes) and int4 layers whose input width is not
    a multiple of `group_size` stay in float; the latter are logged. On a transformers model the config records the
    quantization, and `save_pretrained` refuses to write it (see `AgillmWeightOnlyQuantizer.is_serializable`).
    """
    config = AgillmWeightOnlyConfig(
        bits=bits, group_size=group_size, compute_dtype=_dtype_name(compute_dtype),
        modules_to_not_convert=list(modules_to_not_convert or []),
    )
    _replace_linears(model, config)
    if hasattr(model, "config") and hasattr(model, "save_pretrained"):
        # The same state `from_pretrained(quantization_config=...)` leaves: save_pretrained then refuses clearly.
        quantizer = AgillmWeightOnlyQuantizer(config, pre_quantized=False)
        quantizer.mark_quantized(model)
    return model


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        return dtype
    names = {value: key for key, value in COMPUTE_DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"compute_dtype must be one of {list(COMPUTE_DTYPES)}, got {dtype}.")
    return names[dtype]


def _replace_linears(model: nn.Module, config: "AgillmWeightOnlyConfig") -> list[str]:
    """Swap the linears; returns the names of the quantized layers."""
    compute_dtype = COMPUTE_DTYPES[config.compute_dtype]
    skipped, quantized = [], []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or _excluded(name, config.modules_to_not_convert):
            continue
        if module.weight.device.type != "cpu":
            raise ValueError(f"{QUANT_METHOD} runs on CPU only; {name} is on {module.weight.device}.")
        if config.bits == 8:
            new = Int8WeightOnlyLinear.from_linear(module, compute_dtype)
        elif module.in_features % config.group_size:
            skipped.append(name)
            continue
        else:
            new = Int4WeightOnlyLinear.from_linear(module, config.group_size, compute_dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        quantized.append(name)
    if skipped:
        logger.warning(
            "int4 group_size %d does not divide the input width of %s: kept in float.", config.group_size, skipped
        )
    _drop_ties_to(model, quantized)
    return quantized


def _excluded(name: str, patterns: list[str]) -> bool:
    return any(name == pattern or name.startswith(pattern + ".") for pattern in patterns)


def _drop_ties_to(model: nn.Module, quantized: list[str]) -> None:
    """Remove `{"lm_head.weight": "model.embed_tokens.weight"}`-style ties whose target is now a quantized layer."""
    targets = {f"{name}.weight" for name in quantized}
    for prefix, module in model.named_modules():
        # a nested PreTrainedModel keeps its own mapping, with names relative to itself
        owned = {name[len(prefix) + 1:] for name in targets if name.startswith(prefix + ".")} if prefix else targets
        for attribute in ("_tied_weights_keys", "all_tied_weights_keys"):
            mapping = getattr(module, attribute, None)
            if isinstance(mapping, dict) and owned & set(mapping):
                setattr(module, attribute, {key: value for key, value in mapping.items() if key not in owned})


# ------------------------------------------------------------------------------------------ transformers hooks


@dataclass
class AgillmWeightOnlyConfig(QuantizationConfigMixin):
    """`from_pretrained(folder, trust_remote_code=True, quantization_config=AgillmWeightOnlyConfig(bits=8))`.

    Args:
        bits: 8 (per-output-channel symmetric int8) or 4 (group-wise asymmetric int4).
        group_size: input channels per int4 scale/zero (32, 64, 128 or 256); unused for int8.
        compute_dtype: "bfloat16" (fast packed kernels) or "float32" (exact math on the dequantized weights, slower).
        modules_to_not_convert: linear layers (names or name prefixes) kept in float.

    The float checkpoint is loaded as usual, then the linears are quantized (peak memory = the float model).
    """

    bits: int = 8
    group_size: int = 32
    compute_dtype: str = "bfloat16"
    modules_to_not_convert: list[str] = field(default_factory=list)
    quant_method: str = QUANT_METHOD

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}.")
        if self.bits == 4 and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size!r}.")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {list(COMPUTE_DTYPES)}, got {self.compute_dtype!r}.")
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {self.quant_method!r}.")


class AgillmWeightOnlyQuantizer(HfQuantizer):
    """Quantize-on-load: the float weights load normally, then `_replace_linears` swaps the layers (CPU only)."""

    requires_calibration = False
    quantization_config: AgillmWeightOnlyConfig

    def validate_environment(self, *args, device_map=None, **kwargs):
        devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
        if devices - {None, "cpu", torch.device("cpu")}:
            raise ValueError(f"{QUANT_METHOD} uses CPU kernels; device_map {device_map!r} places weights elsewhere.")

    def _process_model_after_weight_loading(self, model, **kwargs):
        _replace_linears(model, self.quantization_config)
        return model

    def mark_quantized(self, model) -> None:
        """For `quantize_weights`: the attributes `from_pretrained` leaves on a model it quantized."""
        model.hf_quantizer = self
        model.is_quantized = True
        model.quantization_method = self.quantization_config.quant_method
        model.config.quantization_config = self.quantization_config
        _assign_is_quantized(model)

    def is_serializable(self, safe_serialization=None):
        # Called by `save_pretrained` only. Raising here names the way out instead of writing packed buffers that no
        # loader (this one included: it quantizes float checkpoints) could read back.
        raise ValueError(
            f"A model quantized with {QUANT_METHOD} cannot be saved: its packed int{self.quantization_config.bits} "
            "buffers are a CPU kernel layout, not a checkpoint format. Save the float model instead and pass "
            f"`quantization_config=AgillmWeightOnlyConfig(bits={self.quantization_config.bits}, ...)` to "
            "`from_pretrained` when loading it (quantizing takes a second or so)."
        )

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True  # `generate` compiles the decode step only when the quantizer says so


def register_with_transformers() -> None:
    """Make `quantization_config=AgillmWeightOnlyConfig(...)` (or its dict form) known to `from_pretrained`."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(AgillmWeightOnlyConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(AgillmWeightOnlyQuantizer)


def unregister_from_transformers() -> None:
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is AgillmWeightOnlyConfig:
        del AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD]
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is AgillmWeightOnlyQuantizer:
        del AUTO_QUANTIZER_MAPPING[QUANT_METHOD]
