# make reproduce : install, generate the tiny data, run the tiny batch of notebooks (results/)
# make test      : install if needed, unit tests, papermill smoke run, strict nbval of notebooks/
# make notebooks : re-execute the committed notebooks in place from the tiny results (no retraining)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-8)
BATCH ?= params/tiny.yaml
export TQDM_MININTERVAL ?= 30
export PYTHONHASHSEED := 0

.PHONY: install reproduce test unit smoke nbval notebooks clean-results benchmarks figures seeds-table verify determinism crosscheck

install: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

reproduce: install
	$(PY) -m helpers.batch $(BATCH)

unit: install
	TQDM_DISABLE=1 $(PY) -m pytest -q tests/unit

smoke: install
	TQDM_DISABLE=1 $(PY) -m pytest -q tests/test_smoke_batch.py

# nbval re-executes the committed notebooks with their tiny defaults; finished runs in results/
# are reused (no retraining), so it needs `make reproduce` first.
nbval: reproduce
	TQDM_DISABLE=1 $(PY) -m pytest -q --nbval notebooks/ --nbval-current-env \
		--nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider

test: unit smoke nbval

notebooks: reproduce
	for nb in notebooks/[0-9]*.ipynb; do \
		TQDM_DISABLE=1 $(VENV)/bin/papermill --cwd notebooks -k python3 --no-progress-bar "$$nb" "$$nb" || exit 1; \
		$(VENV)/bin/nbstripout --keep-output --keep-count --extra-keys "metadata.papermill cell.metadata.papermill" "$$nb"; \
	done

# cost ratios measured side by side on this machine -> results/benchmarks/*.json (run on an idle CPU)
benchmarks: install
	$(PY) -m tools.benchmarks
	$(PY) -m tools.benchmarks_zsq --threads 2 1
	$(PY) -m tools.benchmarks_dfmpc
	$(PY) -m tools.benchmarks_onnx

# the paper's tables and figures from the stored results of the batch (no training, seconds) -> results/figures/
figures: install
	$(PY) -m helpers.plots --batch $(basename $(notdir $(BATCH)))

# the tiny verdicts of several batches (seeds) side by side, from their stored results -> results/figures/table_seeds.*
# SEED_BATCHES empty: helpers.verdicts.SEED_BATCHES, the committed seed batches
SEED_BATCHES ?=
seeds-table: install
	$(PY) -m helpers.plots --seeds $(SEED_BATCHES)

# a batch made again (e.g. on another CPU) against the committed one, within the seed spread -> results/benchmarks/verify.json
verify: install
	$(PY) -m tools.verify --batch $(basename $(notdir $(BATCH)))

# the first epoch of the tiny pretraining under other CPU kernel families and a competing load -> results/benchmarks/determinism.json
determinism: install
	$(PY) -m tools.determinism_probe

# NVIDIA modelopt against our calibration on the same batches (optional dependencies) -> results/crosscheck/modelopt.json
crosscheck: install
	$(PY) -m pip install --quiet -e ".[dev,crosscheck]"
	$(PY) -m tools.modelopt_crosscheck

# committed results make `make reproduce` skip finished runs; this forgets them so everything is recomputed
clean-results:
	rm -rf results/[0-9]*_*/ results/manifest.json
