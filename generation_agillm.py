"""AGILLM's parallel decoders, reached through `AgillmForCausalLM.generate(generation_mode=...)`."""


def agillm_generate(model, *args, generation_mode: str, **kwargs):
    raise NotImplementedError(f"generation_mode={generation_mode!r} is being written")
