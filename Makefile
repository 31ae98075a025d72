# Two entry points (README Quickstart): `make demo` and `make test`; `make fuzz` runs the loader's fuzz cases. All
# set up .venv first.
# torch is pinned to its CPU build (2.13.0, from a local package index where one is set up); an unpinned torch
# would pull a multi-GB CUDA build. None of this is a runtime requirement of the ComfyUI nodes (see requirements.txt).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_STAMP := $(VENV)/.demo-setup-done
STAMP := $(VENV)/.setup-done
# What the demo needs. triton only where a CUDA GPU runs the sparse kernel: on a CPU the demo's sparse path is the
# PyTorch reference, and triton is 640 MB to unpack (a third of the setup time on a 2-core machine).
DEMO_PACKAGES := numpy==2.4.6 safetensors==0.8.0 tqdm==4.70.1 pillow==13.0.0 diffusers==0.42.1 \
	$(if $(shell command -v nvidia-smi 2>/dev/null),triton==3.6.0)
# What the tests add (the Triton kernels run on the CPU under triton's interpreter there). yunchang (xDiT's
# sequence-parallel engine, pure Python) for tests/test_parallel_usp.py; its one dependency is torch (already pinned
# above: pip keeps it), flash-attn is an optional extra it imports lazily.
TEST_PACKAGES := triton==3.6.0 hypothesis==6.170.15 pytest==9.2.0 pytest-timeout==2.4.0 yunchang==0.6.4
# --no-compile: Python compiles what it imports on first use; compiling all of torch up front costs CPU time
PIP := $(PY) -m pip install -q --disable-pip-version-check --no-compile

# The real-ComfyUI tests run against every ComfyUI tree in $(SHARED)/comfyui, extracted outside the repository into
# $(COMFY_TREES), with one venv for all of them (scripts/comfyui_hosts.sh; rebuilt when a requirements file changes).
SHARED ?= ../shared
COMFY_TREES ?= $(HOME)/.cache/calibatt/comfyui
COMFY_VENV := .venv-comfy

.PHONY: setup demo-setup test demo screenshots bench-size fuzz clean

setup: $(STAMP)
demo-setup: $(DEMO_STAMP)

$(DEMO_STAMP): Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0 $(DEMO_PACKAGES)
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	$(PIP) $(TEST_PACKAGES)
	touch $(STAMP)

test: setup
	bash scripts/run_tests.sh $(SHARED) $(COMFY_TREES) $(COMFY_VENV)

demo: demo-setup
	$(PY) demo/run_demo.py

# The README's screenshots, from the browser test against the newest ComfyUI tree (needs Debian's chromium).
screenshots: setup
	bash scripts/screenshots.sh $(SHARED) $(COMFY_TREES) $(COMFY_VENV)

# >= 10,000 malformed bundle files through the loader (tests/bundle_fuzz.py); prints counts per outcome and exits 1
# on any escape, hang or crash. FUZZ_ARGS="--cases 20000 --seed 1" to vary it.
fuzz: setup
	$(PY) tests/bundle_fuzz.py --cases 10000 $(FUZZ_ARGS)

# Bundle size at Wan 14B 720p (docs/BENCHMARKS.md); needs $(SHARED)/data/sta_mask_strategy_hunyuan.json, the shared
# data folder beside the checkout (SHARED=DIR for another place).
bench-size: demo-setup
	$(PY) bench/bench_bundle_size.py --data $(SHARED)/data/sta_mask_strategy_hunyuan.json

clean:
	rm -rf $(VENV) $(COMFY_VENV) output .pytest_cache .hypothesis
