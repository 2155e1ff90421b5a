"""Optional accelerated implementations for AGILLM, plugged in through transformers' own hooks.

    import kernels
    kernels.enable()   # before `from_pretrained(..., trust_remote_code=True)`
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

Each kernel has a plain-PyTorch reference it is tested against (`tests/test_kernels.py`). The model runs
without this package: a saved AGILLM folder never imports it. (transformers' hub-kernel path needs a `kernels`
release the registry does not carry and has no CPU support, so local kernels go through
`transformers.monkey_patching.register_patch_mapping`, which swaps classes of modules named `transformers*`,
i.e. models loaded as remote code.)
"""

from transformers.monkey_patching import get_patch_mapping, register_patch_mapping, unregister_patch_mapping

from .rms_norm import FusedRMSNorm, rms_norm_reference

# class name in modeling_agillm.py -> faster drop-in (same __init__ signature and parameter names)
PATCHES = {"AgillmRMSNorm": FusedRMSNorm}


def enable() -> None:
    """Register every AGILLM kernel; models created or loaded afterwards use them."""
    register_patch_mapping(PATCHES, overwrite=True)


def disable() -> None:
    """Remove AGILLM's entries from the patch mapping (other libraries' entries stay)."""
    registered = get_patch_mapping()
    unregister_patch_mapping([name for name in PATCHES if registered.get(name) is PATCHES[name]])


__all__ = ["enable", "disable", "FusedRMSNorm", "rms_norm_reference"]
