# The two commands: `make run` and `make test`. Both set up .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tracecore-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
PROFILE ?= tiny
STORE ?=  # empty: the profile's own store (tiny: .tracecore/store)

.PHONY: setup run test test-accept test-long test-cluster lint bench readme clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "python3.11 not found; set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install "torch==2.13.0"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

run: setup  # the run measures and prints the machine's calibration itself (`calibrate: true`)
	$(BIN)/tracecore run --profile $(PROFILE) $(if $(strip $(STORE)),--store $(STORE))

test: setup  # first line: the machine's calibration, so the suite's time can be compared across machines
	@$(BIN)/python -m tracecore.flows.calibrate
	$(BIN)/python -m pytest -q --durations=10 tests

test-accept: setup  # the acceptance assertions on the full `tiny` profile (~25 min on a slow machine); before a release
	@$(BIN)/python -m tracecore.flows.calibrate
	TRACECORE_ACCEPT=full $(BIN)/python -m pytest -q tests/test_acceptance.py

test-long: setup  # the long-context acceptance on tiny-retrieval (~26 min); not part of `make test`
	@$(BIN)/python -m tracecore.flows.calibrate
	TRACECORE_LONG=1 $(BIN)/python -m pytest -q tests/test_long_context_acceptance.py

test-cluster: setup  # SeaweedFS (S3), a CLI-started Dask cluster and a Prefect server + work pool on loopback (~5 min)
	@$(BIN)/python -m tracecore.flows.calibrate
	TRACECORE_CLUSTER=1 $(BIN)/python -m pytest -q --durations=10 tests/cluster tests/test_object_store.py

readme: setup  # re-render the README's measured tables from the latest run of PROFILE (tracecore readme)
	$(BIN)/tracecore readme --profile $(PROFILE) $(if $(strip $(STORE)),--store $(STORE))

lint: setup
	$(BIN)/ruff check flows tasks kernels storage configs tests bench

bench: setup
	$(BIN)/python bench/run_all.py

clean:
	rm -rf .tracecore .pytest_cache
