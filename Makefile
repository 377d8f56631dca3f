# make run    the main job: a cross-stitch demonstration, then models trained on the built-in Scenes
#             (runs/main/: metrics, Delta_m, fused-vs-reference step time; 10 minutes on 2 cores once built)
# make test   build (CUDA kernels included, so CI proves they compile) and run every test
# make bench  every benchmark, rows appended to benchmarks/results/<device>.json
# make gpu-test   on a GPU machine: build, then only the tests marked cuda (CUDA and Triton on the GPU)
# make gpu-bench  on a GPU machine: every benchmark on cuda, --quick (rows saved; MTL_BENCH_RESULTS_DIR=$$OUT/results
#             saves them there instead, one file per device, appended after each benchmark)
# make gpu-image-check  without a GPU: build (CUDA included) and test against the GPU machines'
#             torch 2.11 / Triton 3.6 in .venv-gpu-image (5 GB from PyPI; not part of make test)
#
# By default these create .venv with the pinned requirements-dev.txt. On a
# machine whose active Python already has torch (a GPU box without internet):
#   make test USE_SYSTEM_PYTHON=1
# uses `python3` as it is and installs nothing but this package.

SHELL := /bin/bash
USE_SYSTEM_PYTHON ?= 0
ifeq ($(USE_SYSTEM_PYTHON),1)
PYTHON := python3
ENV_STAMP :=
else
PYTHON := .venv/bin/python
ENV_STAMP := .venv/.installed
endif

# The Triton of the GPU machines' image (torch 2.11): test_triton_sm90.py compiles every kernel
# with it as well as with the pinned one, as a second install beside the venv's own.
TRITON_GPU_IMAGE := 3.6.0
EXTRA_TRITON := .venv/triton-$(TRITON_GPU_IMAGE)

# auto: CUDA kernels when torch has CUDA and nvcc is found; 1: always; 0: never.
MTL_KERNELS_CUDA ?= auto
export TORCH_CUDA_ARCH_LIST ?= 9.0
# (only where it exists: setup.py's auto then builds CPU-only kernels on a machine without it)
export CUDA_HOME ?= $(wildcard /usr/local/cuda)

SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h')
BUILD_STAMP = build/.built-cuda-$(MTL_KERNELS_CUDA)-$(USE_SYSTEM_PYTHON)

.PHONY: run test bench gpu-test gpu-bench gpu-image-check build clean

run: build
	$(PYTHON) python/demo_cross_stitch.py
	$(PYTHON) python/main_job.py

test: MTL_KERNELS_CUDA = 1
test: build
	MTL_KERNELS_EXPECT_CUDA=$(if $(filter 1,$(MTL_KERNELS_CUDA)),1,0) \
	MTL_KERNELS_EXTRA_TRITON=$(if $(ENV_STAMP),$(EXTRA_TRITON)) $(PYTHON) -m pytest tests -q -ra

bench: build
	$(PYTHON) -m benchmarks.run_all

# GPU_TEST_ARGS: more pytest arguments, e.g. "-n 8" (pytest-xdist, on the GPU image: the Triton
# kernels' first compiles then share the CPU cores) or -k to split the run across commands.
GPU_TEST_ARGS ?=
gpu-test: MTL_KERNELS_CUDA = 1
gpu-test: build
	MTL_KERNELS_EXPECT_CUDA=1 $(PYTHON) -m pytest tests -q -ra -m cuda $(GPU_TEST_ARGS)

gpu-bench: build
	$(PYTHON) -m benchmarks.run_all --device cuda --quick

# torch 2.11 builds extensions as C++17 (2.14: C++20) and its Triton is 3.6: what compiles here
# may not there. This builds and tests a copy of the tree against them, in build/gpu-image/.
# The interpreter is off: Triton 3.6's fails on these kernels ("only 0-dimensional arrays can be
# converted to Python scalars"); on a GPU they run compiled, which test_triton_sm90 checks with 3.6.
GPU_IMAGE_PINS := torch==2.11.0 torchvision==0.26.0 triton==$(TRITON_GPU_IMAGE)
# (setuptools left to pip: torch 2.11 requires an older one than the pinned 84)
gpu-image-check:
	test -x .venv-gpu-image/bin/python || python3 -m venv .venv-gpu-image
	.venv-gpu-image/bin/python -m pip install -q $(GPU_IMAGE_PINS) $$(grep -vE '^(#|torch|torchvision|triton|setuptools)' requirements-dev.txt)
	rm -rf build/gpu-image && mkdir -p build/gpu-image && git ls-files -z | xargs -0 cp --parents -t build/gpu-image
	cd build/gpu-image && MTL_KERNELS_CUDA=1 ../../.venv-gpu-image/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	cd build/gpu-image && TRITON_INTERPRET=0 MTL_KERNELS_EXPECT_CUDA=1 ../../.venv-gpu-image/bin/python -m pytest tests -q -ra

build: $(BUILD_STAMP)

$(BUILD_STAMP): $(ENV_STAMP) $(SOURCES)
	rm -f build/.built-*
	MTL_KERNELS_CUDA=$(MTL_KERNELS_CUDA) $(PYTHON) -m pip install --no-build-isolation --no-deps -e . -q
	$(PYTHON) -c "import mtl_kernels as mk; print('mtl_kernels backends:', mk.available_backends())"
	mkdir -p build && touch $@

.venv/.installed: requirements-dev.txt
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip
	.venv/bin/python -m pip install -q -r requirements-dev.txt
	.venv/bin/python -m pip install -q --no-deps --target $(EXTRA_TRITON) triton==$(TRITON_GPU_IMAGE)
	touch $@

clean:
	rm -rf build mtl_kernels/_C*.so *.egg-info
