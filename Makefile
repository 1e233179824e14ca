# fedaug-flwr: one command to set up and run, one to set up and test.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

# Simulation size of `make run`; override e.g. `make run SUPERNODES=20 RUN_CONFIG="num-synthetic=500"`.
SUPERNODES ?= 10
CPUS_PER_CLIENT ?= 1
GPUS_PER_CLIENT ?= 0.0
RUN_CONFIG ?=
OUTPUT_DIR ?= $(CURDIR)/results/default

.PHONY: setup run test lint clean

setup: $(STAMP)

# Installs the dependencies listed in pyproject.toml (app + dev extra), not the app itself:
# Flower loads the app from this folder, and a cached venv must not point at an old clone.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
		print('\n'.join(p['dependencies'] + p['optional-dependencies']['dev']))" > $(VENV)/requirements.txt
	$(BIN)/python -m pip install --quiet -r $(VENV)/requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

run: setup
	$(BIN)/python -m fedaug_flwr.launch --num-supernodes $(SUPERNODES) \
		--num-cpus $(CPUS_PER_CLIENT) --num-gpus $(GPUS_PER_CLIENT) \
		--run-config "output-dir='$(OUTPUT_DIR)'" --run-config "$(RUN_CONFIG)"

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf results .pytest_cache .ruff_cache
