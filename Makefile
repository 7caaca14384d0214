# dgex: the two commands are `make run` (demo grid) and `make test`.
# Both create .venv on first use and install the pinned environment.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
CORES   ?= 2
CONFIG  ?= config/config.yaml
SMK_ARGS ?=
STAMP   := $(VENV)/.dgex-installed

.PHONY: run test install lint dryrun-paper dryrun-slurm bench clean

$(STAMP): envs/requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r envs/requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

install: $(STAMP)

run: $(STAMP)  ## run the main job: the whole workflow on the embedded demo data (CPU, minutes)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG) $(SMK_ARGS)

test: $(STAMP)  ## run the test suite
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/snakemake --lint --configfile $(CONFIG)

dryrun-paper: $(STAMP)
	$(BIN)/snakemake -n --configfile config/paper.yaml

bench: $(STAMP)
	$(BIN)/python bench/preprocess.py

clean:
	rm -rf .snakemake results/demo results/test
