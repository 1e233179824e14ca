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

# Two workers, each taking whole test files (a file's fixtures are built once): the files
# start Flower and Ray processes and leave a core idle meanwhile. In collection order, the
# longest files first (tests/conftest.py), not xdist's default of the most tests first, which
# left a long two-test file to the end. Plain `pytest` runs serially.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf results .pytest_cache .ruff_cache

# Sweeps (fedaug_flwr.experiments): `make sweep EXPERIMENT=conf/smoke.yaml`, then
# `make figures SWEEP_DIR=results/sweeps/smoke`. A sweep resumes where it stopped.
EXPERIMENT ?= conf/smoke.yaml
SWEEP_DIR ?= results/sweeps/smoke
REPRODUCTION_DIR ?= results/sweeps/reproduction
FINETUNE_DIR ?= results/sweeps/reproduction-finetune

.PHONY: sweep figures reproduction reproduction-finetune campaign campaign-queue campaign-report

# The paper-scale campaign (conf/paper-scale.yaml): runs what is not yet published under
# docs/results/paper-scale, committing each run as it finishes; run it again to continue.
# Full MNIST: FEDAUG_DATA_DIR=<IDX folder>. GPU: CAMPAIGN_ARGS="--federation num-gpus=0.1".
CAMPAIGN ?= conf/paper-scale.yaml
CAMPAIGN_ARGS ?=
campaign: setup
	$(BIN)/python -m fedaug_flwr.experiments campaign $(CAMPAIGN) $(CAMPAIGN_ARGS)

# Every campaign of this project in the order its issues need them: the study's claims
# (paper-scale stages 1-2), how much of a run's swing is in its BatchNorm statistics
# (batchnorm-statistics stage 1), the strategies on MNIST then Fashion-MNIST (baselines),
# the minority k = 100 runs of batchnorm-statistics, the other preset, the rest of the
# paper-scale grid. Each line runs only what is not yet published, so the same command
# continues them all; a failed or stopped line stops here.
# Needs FEDAUG_DATA_DIR (MNIST) and, from the Fashion-MNIST stage on, FEDAUG_FASHION_DATA_DIR.
CAMPAIGN_RUN = $(BIN)/python -m fedaug_flwr.experiments campaign
campaign-queue: setup
	$(CAMPAIGN_RUN) conf/paper-scale.yaml --stages 1,2 $(CAMPAIGN_ARGS)
	$(CAMPAIGN_RUN) conf/batchnorm-statistics.yaml --stages 1 $(CAMPAIGN_ARGS)
	$(CAMPAIGN_RUN) conf/baselines.yaml --stages 1 $(CAMPAIGN_ARGS)
	$(CAMPAIGN_RUN) conf/baselines.yaml --stages 2 $(CAMPAIGN_ARGS)
	$(CAMPAIGN_RUN) conf/batchnorm-statistics.yaml --stages 2 $(CAMPAIGN_ARGS)
	$(CAMPAIGN_RUN) conf/paper-scale-as-written.yaml $(CAMPAIGN_ARGS)
	$(CAMPAIGN_RUN) conf/paper-scale.yaml --stages 3,4 $(CAMPAIGN_ARGS)

# The shipped campaigns publish to docs/results/<the experiment file's name>.
PUBLISHED ?= docs/results/$(basename $(notdir $(CAMPAIGN)))
campaign-report: setup
	$(BIN)/python -m fedaug_flwr.experiments plot $(PUBLISHED)

sweep: setup
	$(BIN)/python -m fedaug_flwr.experiments run $(EXPERIMENT)

figures: setup
	$(BIN)/python -m fedaug_flwr.experiments plot $(SWEEP_DIR)

# docs/reproduction.md: run the reduced grid, draw it, copy tables and figures to docs/results/.
reproduction: setup
	$(BIN)/python -m fedaug_flwr.experiments run conf/reproduction.yaml --out $(REPRODUCTION_DIR)
	$(BIN)/python -m fedaug_flwr.experiments plot $(REPRODUCTION_DIR)
	mkdir -p docs/results/reproduction
	cp $(REPRODUCTION_DIR)/sweep.yaml $(REPRODUCTION_DIR)/tables/*.csv \
		$(REPRODUCTION_DIR)/figures/*.png $(REPRODUCTION_DIR)/figures/claims.md \
		docs/results/reproduction/

# The finetune half of docs/reproduction.md (needs the finetune variant's run-config keys).
reproduction-finetune: setup
	$(BIN)/python -m fedaug_flwr.experiments run conf/reproduction-finetune.yaml --out $(FINETUNE_DIR)
	$(BIN)/python -m fedaug_flwr.experiments plot $(FINETUNE_DIR)
	mkdir -p docs/results/reproduction-finetune
	cp $(FINETUNE_DIR)/sweep.yaml $(FINETUNE_DIR)/tables/*.csv $(FINETUNE_DIR)/figures/*.png \
		$(FINETUNE_DIR)/figures/table1.md docs/results/reproduction-finetune/

# A lent GPU machine (docs/performance.md, "Prepared: a whole run on a lent GPU"): fills the
# ignored .gpu-carry/ with MNIST (from DATA_DIR, default $FEDAUG_DATA_DIR) and the app's
# dependencies for that machine's Python 3.12, and checks what travels is under 64 MiB.
DATA_DIR ?= $(FEDAUG_DATA_DIR)
.PHONY: gpu-carry
gpu-carry: setup
	$(BIN)/python -m bench.gpu_carry $(if $(DATA_DIR),--data-dir $(DATA_DIR))
