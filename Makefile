# Quick start: `make run` (install, then the quick-start run) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
OUT ?= runs/quickstart

.PHONY: install run test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[mpi,test]'
	touch $(STAMP)

run: install
	$(VENV)/bin/fdcr-mpi run configs/quickstart.yaml --out $(OUT) --restart

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m benchmarks.run

lint: install
	$(VENV)/bin/ruff check fdcr_mpi tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
