# The two commands of the README: `make dev` runs the service, `make test` runs the tests.
# Both first set up .venv: torch (TORCH, a CPU build by default), then this project.

VENV  ?= .venv
PY    := $(VENV)/bin/python
# On a CPU box torch==2.13.0 is the CPU wheel; on a GPU box use e.g. TORCH=torch (CUDA build).
TORCH ?= torch==2.13.0
PORT  ?= 8080

.PHONY: dev test install lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.installed
	$(VENV)/bin/gpuhost dev --port $(PORT)

test: $(VENV)/.installed
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check api workers billing migrations tests

clean:
	rm -rf $(VENV) .gpuhost
