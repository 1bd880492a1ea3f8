# bir: `make demo` and `make test` work on a fresh machine (they install first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: install demo test test-all lint bench bench-quality gpu-check clean slurm-up slurm-down

install: $(STAMP)

# Re-runs only when the package metadata changes (idempotent).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	# BasicSR (reference for degradation tests only); --no-deps keeps opencv-python out
	$(PY) -m pip install -q --no-deps new-basicsr==1.0.0
	touch $(STAMP)

# The main job on the embedded sample photographs: train a small SwinIR (stage 1) for a few
# minutes on CPU, restore a held-out photograph, print PSNR of degraded vs restored, write a grid.
demo: install
	$(VENV)/bin/bir-train experiment=quickstart
	$(PY) -m bir.demo

test: lint
	$(PY) -m pytest -m "not slow" -q -p no:cacheprovider

test-all: install
	$(PY) -m pytest -q -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check bir tests scripts
	$(VENV)/bin/ruff format --check bir tests scripts

bench: install
	$(PY) scripts/run_benches.py

bench-quality: install
	$(PY) -m bir.bench_quality quality --quick

# Speed and memory at real size on one CUDA GPU (random weights, <= 8 min on an H100/H200);
# prints one Markdown table. Without CUDA it says so and stops; `--smoke` is the CPU path.
gpu-check: install
	$(PY) scripts/gpu_check.py

# A one-node SLURM cluster on this machine (installs slurm-wlm and munge with apt-get as root);
# the SLURM tests (tests/test_slurm.py, marked slow) start it themselves when it is not running.
slurm-up:
	bash scripts/slurm_local.sh up

slurm-down:
	bash scripts/slurm_local.sh down

clean:
	rm -rf outputs multirun .cache .pytest_cache
