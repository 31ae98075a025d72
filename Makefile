# Two entry points (README Quickstart): `make demo` and `make test`. Both set up .venv first.
# torch is pinned to the CPU build that installs from local disk on the team's machines; an unpinned torch would
# pull a multi-GB CUDA build. None of this is a runtime requirement of the ComfyUI nodes (see requirements.txt).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
DEV_PACKAGES := triton==3.6.0 numpy==2.4.6 safetensors==0.8.0 hypothesis==6.170.15 pytest==9.2.0 \
	pytest-timeout==2.4.0 tqdm==4.70.1 pillow==13.0.0 diffusers==0.42.1

# The real-ComfyUI tests run against every ComfyUI tree in $(SHARED)/comfyui, extracted outside the repository into
# $(COMFY_TREES), with one venv for all of them (scripts/comfyui_hosts.sh; rebuilt when a requirements file changes).
SHARED ?= ../shared
COMFY_TREES ?= $(HOME)/.cache/calibatt/comfyui
COMFY_VENV := .venv-comfy

.PHONY: setup test demo bench-size clean

setup: $(STAMP)

$(STAMP): Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check $(DEV_PACKAGES)
	touch $(STAMP)

test: setup
	bash scripts/run_tests.sh $(SHARED) $(COMFY_TREES) $(COMFY_VENV)

demo: setup
	$(PY) demo/run_demo.py

bench-size: setup
	$(PY) bench/bench_bundle_size.py

clean:
	rm -rf $(VENV) $(COMFY_VENV) output .pytest_cache .hypothesis
