"""Optional accelerated implementations for AGILLM, plugged in through transformers' own hooks.

    import kernels
    kernels.enable()   # before `from_pretrained(..., trust_remote_code=True)`
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                 attn_implementation="agillm",            # kernels/attention.py
                                                 experts_implementation="agillm_grouped")  # kernels/moe.py

| what | name it is selected by | hook | module |
|---|---|---|---|
| attention (Triton flash attention on GPU / in the interpreter; flex or grouped sdpa on CPU; ALiBi in-kernel) | `attn_implementation="agillm"` | `AttentionInterface` + `AttentionMaskInterface` | `attention.py`, `triton_attention.py` |
| decode attention straight from an int8/int4 KV cache | `attn_implementation="agillm_qkv"` + `QuantizedKVCache` | `AttentionInterface` + `AttentionMaskInterface`, `Cache` | `quantized_kv.py`, `triton_quantized_kv.py` |
| MoE experts: sorted tokens, grouped GEMMs, fused epilogues | `experts_implementation="agillm_grouped"` | `ExpertsInterface` | `moe.py`, `triton_moe.py` |
| weight-only int8 / int4 linears for CPU decode | `quantization_config=AgillmWeightOnlyConfig(bits=8)` | transformers' quantizer registry | `quantized_linear.py` |
| ahead-of-time compiled decode (torch.export + AOTInductor, static KV cache inside) | `generate(custom_generate=ExportedDecoder.compile(model, ...))` | `generate`'s `custom_generate` loop | `exported_decoder.py` |
| fused RMSNorm (torch.compile) | on for every model loaded after `enable()` | module patch mapping | `rms_norm.py` |

(The chunked linear cross-entropy is part of the model itself, `losses_agillm.py`, behind
`config.cross_entropy_chunk_size`: training must not depend on an optional package.)

Each kernel has a plain-PyTorch reference it is tested against (`tests/test_kernels.py`, `test_attention_kernels.py`,
`test_quantized_kv.py`, `test_moe_kernels.py`, `test_cpu_decode.py`, `test_exported_decoder.py`; the Triton kernels run there in triton's CPU
interpreter, `TRITON_INTERPRET=1`, in a subprocess). A saved AGILLM folder never imports this package.
(transformers' hub-kernel path needs a `kernels` release the registry does not carry and has no CPU support, so the
RMSNorm goes through `transformers.monkey_patching.register_patch_mapping`, which swaps classes of modules named
`transformers*`, i.e. models loaded as remote code.)

The submodules are imported lazily (in `enable()` and on first attribute access): transformers probes for a package
named `kernels` while it is itself being imported, and finds this one when the repository is on `sys.path`.
"""

import importlib

from transformers.monkey_patching import get_patch_mapping, register_patch_mapping, unregister_patch_mapping

from .rms_norm import FusedRMSNorm, rms_norm_reference


# class name in layers_agillm.py -> faster drop-in (same __init__ signature and parameter names)
PATCHES = {"AgillmRMSNorm": FusedRMSNorm}

# public name -> submodule that defines it (loaded on first access, see the module docstring)
LAZY_EXPORTS = {
    "QuantizedKVCache": "quantized_kv",
    "quantize_weights": "quantized_linear",
    "AgillmWeightOnlyConfig": "quantized_linear",
    "ExportedDecoder": "exported_decoder",
}


def enable() -> None:
    """Register every AGILLM kernel; models created or loaded afterwards can select them."""
    from . import attention, moe, quantized_kv, quantized_linear

    register_patch_mapping(PATCHES, overwrite=True)
    attention.register()
    quantized_kv.register()
    moe.register()
    quantized_linear.register_with_transformers()


def disable() -> None:
    """Remove AGILLM's module patches (the RMSNorm); other libraries' entries stay.

    The registered names ("agillm", "agillm_qkv", "agillm_grouped", "agillm_weight_only") stay known: they only act
    on a model that selects them. `moe.unregister()` / `quantized_linear.unregister_from_transformers()` remove those.
    """
    registered = get_patch_mapping()
    unregister_patch_mapping([name for name in PATCHES if registered.get(name) is PATCHES[name]])


def __getattr__(name: str):
    if name in LAZY_EXPORTS:
        return getattr(importlib.import_module(f".{LAZY_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["enable", "disable", "FusedRMSNorm", "rms_norm_reference", *LAZY_EXPORTS]
