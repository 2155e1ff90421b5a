"""Ahead-of-time compiled CPU decode: the model exported once (`torch.export`), compiled by AOTInductor into a shared
library that holds the weights and a static KV cache, and run as `generate`'s decoding loop.

    decoder = ExportedDecoder.compile(model, max_cache_len=512, package_path="smollm2-int4.pt2")
    output = model.generate(input_ids, custom_generate=decoder, max_new_tokens=64)
    decoder = ExportedDecoder.load("smollm2-int4.pt2")   # in a later process: no recompilation

Why not `generate(cache_implementation="static", compile_config=...)`: it runs inductor's kernels too, but every
decode step goes back through Python: Dynamo's guards over every parameter and buffer (2 ms a step on SmolLM2-135M),
generate's per-step bookkeeping and the model's Python around the compiled graph. On a 135M model with int4 weights
that is half the step. Here a step is one call into the compiled library; what stays in Python is the loop below
(logits processors, sampling, stopping criteria), the same as transformers' `_sample`.

The export is transformers' own recipe (`TorchExportableModuleForDecoderOnlyLM`, the one ExecuTorch uses), traced
with Dynamo (`strict=True`: the non-strict tracer loses the cache tensors' aliasing and AOTInductor then refuses the
program), with a dynamic sequence length so the prompt runs as one forward. Weight-only int8 / int4 models
(`quantized_linear.py`) export as they are: their packed ATen matmuls become calls inside the library.

Limits, each a clear error: batch 1 without padding; prompt + new tokens <= `max_cache_len`; greedy or sampling
(no beam search or assisted decoding); `return_dict_in_generate` is not supported. Streamers: transformers 5.23
does not hand `streamer` to a callable `custom_generate` (`_extract_generation_mode_kwargs` keeps only the callable's
own extra arguments), so a streamer passed to `generate` sees the prompt and nothing else; the loop streams if a
later transformers passes it on. The package records a fingerprint of the weights it was compiled from, and
`generate` refuses a model whose weights differ.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM


FINGERPRINT_STRIDE = 997  # every 997th value of every tensor: a cheap check, not a cryptographic one
_METADATA_KEYS = ("max_cache_len", "vocab_size", "weights_fingerprint")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a strided sample of every tensor in the state dict (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        sample = tensor.detach().flatten()[::FINGERPRINT_STRIDE]
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        # float64 holds every float value and every integer below 2**53 exactly
        digest.update(sample.to(torch.float64).cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


def export_decoder(model: torch.nn.Module, max_cache_len: int) -> torch.export.ExportedProgram:
    """The model's forward over a batch-1 static cache of `max_cache_len` positions, as an exported program taking
    `input_ids` [1, tokens] and `cache_position` [tokens] (the positions those tokens take) and returning logits."""
    if max_cache_len < 2:
        raise ValueError(f"max_cache_len must be >= 2, got {max_cache_len}.")
    generation_config = model.generation_config
    cache_implementation = generation_config.cache_implementation
    generation_config.cache_implementation = "static"  # what transformers' export recipe checks for
    try:
        exportable = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=max_cache_len)
    finally:
        generation_config.cache_implementation = cache_implementation
    tokens = torch.export.Dim("tokens", min=1, max=max_cache_len)
    example_ids = torch.zeros(1, 2, dtype=torch.long, device=model.device)  # 2, not 1: export specialises on 1
    with torch.no_grad():
        return exportable.export(
            input_ids=example_ids,
            cache_position=torch.arange(2, device=model.device),
            dynamic_shapes={"input_ids": {1: tokens}, "cache_position": {0: tokens}},
            strict=True,
        )


class ExportedDecoder:
    """An AOTInductor-compiled decoder, callable as `generate(custom_generate=...)`'s decoding loop."""

    def __init__(self, runner, package_path: str | os.PathLike):
        self.runner = runner
        self.package_path = Path(package_path)
        metadata = runner.get_metadata()
        missing = [key for key in _METADATA_KEYS if key not in metadata]
        if missing:
            raise ValueError(f"{package_path} is not an ExportedDecoder package (no {', '.join(missing)} metadata).")
        self.max_cache_len = int(metadata["max_cache_len"])
        self.vocab_size = int(metadata["vocab_size"])
        self.weights_fingerprint = metadata["weights_fingerprint"]

    @classmethod
    def compile(cls, model, max_cache_len: int, package_path: str | os.PathLike,
                max_autotune: bool = False) -> "ExportedDecoder":
        """Export `model` (in eval mode, as it will run) and compile it into `package_path`, written atomically.

        `max_autotune=True` lets inductor time its own C++ GEMM template against the ATen kernel for every matmul
        and keep the faster (weights frozen into the library). For weight-only int8 the template won: 1.32x the
        decode speed of SmolLM2-135M on 2 CPU threads (bench/cpu_decode.md), for about 40 s more compilation. Its
        fp32 accumulation differs from ATen's in rounding, so greedy tokens of a low-bit model may part earlier.
        """
        if model.training:
            raise ValueError("Put the model in eval mode before compiling it: the package runs it as it is now.")
        program = export_decoder(model, max_cache_len)
        metadata = {
            "max_cache_len": str(max_cache_len),
            "vocab_size": str(model.config.get_text_config().vocab_size),
            "weights_fingerprint": weights_fingerprint(model),
        }
        inductor_configs = {"aot_inductor.metadata": metadata}
        if max_autotune:
            inductor_configs.update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN", freezing=True)
        package_path = Path(package_path)
        package_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=package_path.parent) as scratch:
            partial = Path(scratch) / package_path.name
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(partial), inductor_configs=inductor_configs
            )
            os.replace(partial, package_path)
        return cls.load(package_path)

    @classmethod
    def load(cls, package_path: str | os.PathLike) -> "ExportedDecoder":
        if not Path(package_path).is_file():
            raise FileNotFoundError(f"No compiled decoder at {package_path}.")
        return cls(torch._inductor.aoti_load_package(str(package_path)), package_path)

    def forward(self, input_ids: torch.LongTensor, start: int) -> torch.Tensor:
        """Logits [1, tokens, vocab] of `input_ids` [1, tokens] placed at positions start.. of the cache; the cache
        keeps their keys and values, and positions from `start` on are overwritten (a new prompt starts at 0)."""
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        return self.runner(input_ids=input_ids, cache_position=positions)

    # ------------------------------------------------------------------------------------- generate's loop

    def __call__(self, model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                 streamer=None, **model_kwargs) -> torch.LongTensor:
        """`GenerationMixin._sample`'s loop for batch 1, each forward a call into the compiled library."""
        self._check_request(model, input_ids, generation_config, model_kwargs)
        logits = self.forward(input_ids, start=0)[:, -1]
        while True:
            scores = logits_processor(input_ids, logits.to(torch.float32))
            if generation_config.do_sample:
                next_token = torch.multinomial(scores.softmax(dim=-1), num_samples=1)
            else:
                next_token = scores.argmax(dim=-1, keepdim=True)
            input_ids = torch.cat([input_ids, next_token], dim=-1)
            if streamer is not None:
                streamer.put(next_token[0].cpu())
            if stopping_criteria(input_ids, scores).all():
                break
            logits = self.forward(next_token, start=input_ids.shape[1] - 1)[:, -1]
        if streamer is not None:
            streamer.end()
        return input_ids

    def _check_request(self, model, input_ids, generation_config, model_kwargs) -> None:
        if generation_config.num_beams > 1 or generation_config.return_dict_in_generate:
            raise ValueError("An ExportedDecoder does greedy decoding and sampling only, returning token ids "
                             "(no beam search, no return_dict_in_generate).")
        if input_ids.shape[0] != 1:
            raise ValueError(f"An ExportedDecoder runs one sequence at a time; got a batch of {input_ids.shape[0]}.")
        if model_kwargs.get("attention_mask") is not None and not bool(model_kwargs["attention_mask"].all()):
            raise ValueError("An ExportedDecoder does not take padded prompts: pass the prompt without padding.")
        if generation_config.max_length > self.max_cache_len:
            raise ValueError(
                f"Prompt + new tokens = {generation_config.max_length} positions, more than the {self.max_cache_len} "
                f"this decoder was compiled for (ExportedDecoder.compile(..., max_cache_len=...))."
            )
        if input_ids.numel() and not bool(((input_ids >= 0) & (input_ids < self.vocab_size)).all()):
            raise ValueError(f"Token ids must lie in [0, {self.vocab_size}).")
        if weights_fingerprint(model) != self.weights_fingerprint:
            raise ValueError(f"{self.package_path} was compiled from other weights than this model's: compile it "
                             "again from this model (ExportedDecoder.compile).")
