# Set-up and checks. `make demo` and `make test` each create/refresh .venv/ and install everything.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: install demo test test-fast lint typecheck schema bench-cpu docker-smoke clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstall only when the dependency list changes; torch 2.14.1 is a ~5.5 GB CUDA build (runs on CPU too).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/nst run manifests/demo.yaml

test: install lint typecheck
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: install
	$(BIN)/ruff check nst flows tests bench
	$(BIN)/ruff format --check nst flows tests bench

typecheck: install
	$(BIN)/mypy

schema: install
	$(BIN)/nst schema > manifests/schema.json

bench-cpu: install
	$(BIN)/python bench/throughput.py --cpu

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache

# Builds the Dockerfile for real (own dockerd, local Debian base; root), runs nst stylize + the worker in it. docs/docker.md
docker-smoke:
	bash scripts/docker_smoke.sh
