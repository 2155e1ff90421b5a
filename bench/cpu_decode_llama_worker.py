"""llama.cpp side of `bench.cpu_decode`, run by a separate Python that has `llama_cpp` (llama-cpp-python) installed.

It imports neither torch nor this repository, so it works from a venv holding only llama-cpp-python (a source
build that takes ~40 min on 2 cores; it is kept out of requirements.txt and CI). Two modes:

    python cpu_decode_llama_worker.py quantize IN.gguf OUT.gguf FTYPE   # llama.cpp's own (re)quantizer
    python cpu_decode_llama_worker.py serve MODEL.gguf THREADS          # JSON requests on stdin, one per line

`serve` loads the model once, prints `{"ready": true}`, then answers each `{"prompt": [ids], "new_tokens": n}` with
`{"tokens": [...], "decode_steps": n - 1, "seconds": s}`: greedy (argmax of the logits), the first new token from the
prompt's logits, `seconds` spanning the `n - 1` single-token evaluations that follow (each with its argmax), the
same span `bench.timing.DecodeClock` measures for `generate`.
"""

import json
import sys
import time

import llama_cpp
import numpy as np


FTYPES = {  # llama_ftype values of llama.h
    "F32": llama_cpp.LLAMA_FTYPE_ALL_F32,
    "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "BF16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
}


def quantize(source: str, target: str, ftype: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.allow_requantize = True  # the source may itself be quantized (the shipped SmolLM2 file is Q4_1)
    if llama_cpp.llama_model_quantize(source.encode(), target.encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize({source} -> {target}, {ftype}) failed")


def last_logits_argmax(llm: "llama_cpp.Llama") -> int:
    # `Llama.scores` is filled only with logits_all=True (logits of every prompt position); read the last row directly
    logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
    return int(np.argmax(logits))


def greedy(llm: "llama_cpp.Llama", prompt: list[int], new_tokens: int) -> dict:
    llm.reset()
    llm.eval(prompt)
    tokens = [last_logits_argmax(llm)]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([tokens[-1]])
        tokens.append(last_logits_argmax(llm))
    return {"tokens": tokens, "decode_steps": new_tokens - 1, "seconds": time.perf_counter() - start}


def serve(model_path: str, threads: int) -> None:
    llm = llama_cpp.Llama(
        model_path=model_path, n_ctx=256, n_batch=256, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(greedy(llm, request["prompt"], request["new_tokens"])), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "quantize":
        quantize(*sys.argv[2:5])
    elif sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit(__doc__)
