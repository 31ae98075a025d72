# Two entry points (README Quickstart): `make demo` and `make test`; `make fuzz` runs the loader's fuzz cases. All
# set up .venv first.
# torch is pinned to the CPU build that installs from local disk on the team's machines; an unpinned torch would
# pull a multi-GB CUDA build. None of this is a runtime requirement of the ComfyUI nodes (see requirements.txt).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
DEV_PACKAGES := triton==3.6.0 numpy==2.4.6 safetensors==0.8.0 hypothesis==6.170.15 pytest==9.2.0 \
	pytest-timeout==2.4.0 tqdm==4.70.1 pillow==13.0.0 diffusers==0.42.1

.PHONY: setup test demo bench-size fuzz clean

setup: $(STAMP)

$(STAMP): Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check $(DEV_PACKAGES)
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) demo/run_demo.py

# >= 10,000 malformed bundle files through the loader (tests/bundle_fuzz.py); prints counts per outcome and exits 1
# on any escape, hang or crash. FUZZ_ARGS="--cases 20000 --seed 1" to vary it.
fuzz: setup
	$(PY) tests/bundle_fuzz.py --cases 10000 $(FUZZ_ARGS)

bench-size: setup
	$(PY) bench/bench_bundle_size.py

clean:
	rm -rf $(VENV) output .pytest_cache .hypothesis
