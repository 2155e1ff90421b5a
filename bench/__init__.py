"""Benchmarks of AGILLM against transformers' own models on the same weights.

`python -m bench` (or `make bench`) runs `bench.compare_llama`: AGILLM vs `LlamaForCausalLM` on converted
SmolLM2-135M and on a small random config, and writes `bench/results.md` + `bench/results.json`.
Timings are reported, never asserted: no test depends on them.
"""
