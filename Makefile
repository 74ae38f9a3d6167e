# Set-up and checks. `make demo` and `make test` each create/refresh .venv/ and install everything.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: install lock browser demo test test-fast test-unit lint typecheck schema bench-cpu docker-smoke clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# Everything comes from the lock (exact versions + sha256); pip refuses anything unpinned or unhashed. torch 2.14.1 is
# a ~5.5 GB CUDA build that runs on the CPU too. Reinstalls only when the lock or pyproject.toml changes.
# pip itself comes first, from the lock too (requirements-pip.txt): the pip a fresh venv ships (23.x) gives up on the
# locked install ("all requirements must have their versions pinned") as soon as the registry has a newer release of a
# package that is asked for with extras (prefect -> httpx[http2], seen with httpx 0.29.0).
$(STAMP): requirements-pip.txt requirements-dev.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements-pip.txt
	$(BIN)/pip install --quiet --require-hashes -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# Refresh the lock on purpose (new dependency in pyproject.toml, or a deliberate upgrade): every package to the newest
# release the constraints in pyproject.toml allow. requirements.txt (runtime, the Docker image) is the subset of
# requirements-dev.txt (runtime + dev tools, `make install`), with the same versions; requirements-pip.txt is its pip.
LOCK_FLAGS := --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links
lock: $(STAMP)
	$(BIN)/pip-compile $(LOCK_FLAGS) --upgrade --extra dev -o requirements-dev.txt pyproject.toml
	$(BIN)/pip-compile $(LOCK_FLAGS) --upgrade -c requirements-dev.txt -o requirements.txt pyproject.toml
	{ echo '# pip, as pinned in requirements-dev.txt; installed before the rest (Makefile, Dockerfile). Written by make lock.'; \
	  awk '/^pip==/{p=1; print; next} p && /^    --hash=/{print; next} {p=0}' requirements-dev.txt; } > requirements-pip.txt

# The browser test drives Debian's chromium with Playwright (Playwright's own browser download is impossible here).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "make test needs Debian's chromium for tests/test_ui_retry.py: run 'sudo apt-get install chromium'" >&2; \
	    exit 1; \
	  fi; }

demo: install
	$(BIN)/nst run manifests/demo.yaml

# Tiers (tests/conftest.py): test-unit is what to run after each edit (no server, SeaweedFS, weights file or browser:
# about a minute); test-fast leaves out only the end-to-end `slow` tests; test runs everything, as CI does.
# test and test-fast run on TEST_WORKERS pytest-xdist processes: the end-to-end tests mostly wait on servers and
# workers, so more processes than cores pay. Each process starts its own servers on free ports; a module that shares
# one server keeps its tests on one process (--dist loadgroup); the longest tests are handed out first (conftest.py).
TEST_WORKERS ?= 4
XDIST := -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

test: install browser lint typecheck
	$(BIN)/python -m pytest -q $(XDIST) tests

test-fast: install
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow" tests

test-unit: install
	$(BIN)/python -m pytest -q -m unit tests

lint: install
	$(BIN)/ruff check nst flows nst_testing tests bench deploy scripts
	$(BIN)/ruff format --check nst flows nst_testing tests bench deploy scripts

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

# Prefect objects of this project on the server in PREFECT_API_URL (idempotent): work pools gpu-pool + parent-pool,
# global concurrency limit gpu-shards (GPU_SHARDS slots), the zombie-run automation. docs/scaling.md
GPU_SHARDS ?= 1
.PHONY: prefect-setup
prefect-setup: install
	$(BIN)/python deploy/setup.py --gpu-shards $(GPU_SHARDS)

# The production layout on this machine (scripts/stack.py, docs/prefect.md): Prefect server, SeaweedFS S3 with a sample
# bucket, pools + automation (prefect-setup), `prefect deploy --all`, a gpu-pool and a parent-pool worker. Prints the UI
# URL, the logs and the run command; a second `make up` reprints. State, data and logs in STACK_DIR. `make down` stops
# every process it started, by pid (data and logs stay).
STACK_DIR ?= .stack
.PHONY: up down
up: install
	$(BIN)/python scripts/stack.py up --state-dir $(STACK_DIR)

down:
	$(BIN)/python scripts/stack.py down --state-dir $(STACK_DIR)

# The fuzz harness (tests/test_fuzz.py, issue 29): generated manifests, records, indexes, claims, ids files and image
# headers through validate, plan and the readers, FUZZ_EXAMPLES examples per target (6 targets x 17,000 = 102,000),
# asserting 0 uncaught exceptions and 0 messages quoting file content. `make test` runs 40 per target. Long: 12,000
# examples took 393 s on 2 shared cores (-n auto), so 102,000 take about an hour (per-test timeout off).
FUZZ_EXAMPLES ?= 17000
.PHONY: fuzz
fuzz: install
	NST_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -p no:cacheprovider -n auto --timeout=0 \
	  --hypothesis-show-statistics tests/test_fuzz.py
