# Quick start: `make run` (install, then the quick-start run) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
OUT ?= runs/quickstart

.PHONY: install run test test-fast bench gpu-check lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[mpi,mpich,analysis,test]'
	touch $(STAMP)

# Again: resumes an interrupted run, or reports the finished one (make run RESTART=--restart starts over).
RESTART ?=
run: install
	$(VENV)/bin/fdcr-mpi run configs/quickstart.yaml --out $(OUT) $(RESTART)

test: install lint
	$(PY) -m pytest -q

# The inner loop: every test that stays in this process (tests/conftest.py marks the others).
test-fast: install
	$(PY) -m pytest -q -m "not process and not slow"

bench: install
	$(PY) -m benchmarks.run

# On a machine with a CUDA GPU and a CUDA build of torch: device tests, the quick start on the GPU
# (same sha three ways), and batched vs one-by-one clients per GPU into benchmarks/results/gpu.
GPU_OUT ?= benchmarks/results/gpu
gpu-check:
	PYTHON=$(PY) bash jobs/gpu-check.sh $(GPU_OUT)

lint: install
	$(VENV)/bin/ruff check fdcr_mpi tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
