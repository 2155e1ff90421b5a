"""Benchmarks of AGILLM against transformers' own models on the same weights.

`python -m bench` (or `make bench`) runs `bench.compare_llama`: AGILLM vs `LlamaForCausalLM` on converted
SmolLM2-135M and on a small random config, and writes `bench/results.md` + `bench/results.json`.
`python -m bench decoding` (or `make bench-decoding`) runs `bench.decoding`: AGILLM's parallel decoders (SAT, NAT,
staged) against AR greedy on the demo's Shakespeare model, and writes `bench/decoding.md` + `bench/decoding.json`.
Timings are reported, never asserted: no test depends on them.
"""
