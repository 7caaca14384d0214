# dgex: the two commands are `make run` (demo grid) and `make test`.
# Both create .venv on first use and install the pinned environment.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
CORES   ?= 2
CONFIG  ?= config/config.yaml
SMK_ARGS ?=
PIP_ARGS ?=
STAMP   := $(VENV)/.dgex-installed

.PHONY: run test install lint format report dryrun-paper dryrun-slurm bench clean

$(STAMP): envs/requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(PIP_ARGS) -r envs/requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

install: $(STAMP)

run: $(STAMP)  ## run the main job: the whole workflow on the embedded demo data (CPU, minutes)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG) $(SMK_ARGS)

test: $(STAMP)  ## run the test suite
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)  ## code style: ruff check + format, snakefmt, snakemake --lint (CI runs this before the tests)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/snakefmt --check Snakefile workflow/
	$(BIN)/snakemake --lint --configfile $(CONFIG)

format: $(STAMP)  ## rewrite the code in the project's style
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench
	$(BIN)/snakefmt Snakefile workflow/

report: $(STAMP)  ## the run's HTML report, results/<name>/report.html (runs what it still needs), and its path
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG) $(SMK_ARGS) -- report
	@$(BIN)/snakemake --configfile $(CONFIG) $(SMK_ARGS) --summary -- report 2>/dev/null | \
		awk -F'\t' '$$3 == "report" { print "report: " $$1 }'

dryrun-paper: $(STAMP)
	$(BIN)/snakemake -n --configfile config/paper.yaml

dryrun-slurm: $(STAMP)
	$(BIN)/snakemake -n --workflow-profile profiles/slurm --configfile config/paper.yaml

bench: $(STAMP)  ## every benchmark (minutes)
	for b in preprocess baselines train_throughput infer; do $(BIN)/python bench/$$b.py || exit 1; done

clean:
	rm -rf .snakemake results/demo results/test
