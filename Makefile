# The two commands of a fresh clone: `make demo` (the main job end to end on Fashion-MNIST) and
# `make test`. Both create .venv, install ensc into it and fetch Fashion-MNIST when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST_DIR := /usr/share/datasets/fashion-mnist
DEMO := runs/demo

.PHONY: demo test lint setup data tcmalloc clean gpu-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

data:
	@if [ ! -e $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST is missing from $(FMNIST_DIR): run 'sudo apt-get install dataset-fashion-mnist'"; \
	    echo "(Debian/Ubuntu), or use 'ensc ... --download' to fetch it with torchvision."; exit 1; \
	  fi; \
	fi

# Optional and best effort: ensc runs its CPU training under tcmalloc when it is installed
# (2x faster steps than glibc's default malloc here; see docs/bench-distill.md).
tcmalloc:
	@if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1) || \
	  echo "note: could not install libtcmalloc-minimal4; ensc falls back to tuning glibc malloc"; \
	fi

demo: setup data tcmalloc
	$(BIN)/ensc train --dataset fashion-mnist --arch resnet8 --members 4 --epochs 4 \
	  --train-subset 12000 --out $(DEMO)/ckpts --force
	$(BIN)/ensc eval --teacher $(DEMO)/ckpts --test-subset 2000 --json $(DEMO)/teacher.json --force
	$(BIN)/ensc compress --teacher $(DEMO)/ckpts --arch resnet8 --epochs 2 --train-subset 6000 \
	  --test-subset 2000 --baselines finetune,kd-single --out $(DEMO)/run --force
	$(BIN)/ensc export --onnx --force
	$(BIN)/ensc bench --batch-sizes 1,64 --warmup 5 --repeats 30

test: setup data tcmalloc
	$(BIN)/python -m pytest -q

# On a machine with one CUDA GPU (torch, onnx, onnxruntime there; no network needed): checks and
# measures the GPU path into gpu-check/ (benchmarks/gpu_check.py). --device cpu --tiny elsewhere.
gpu-check:
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PYTHON) benchmarks/gpu_check.py --out gpu-check

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
