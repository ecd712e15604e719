# Two commands do all set-up: `make demo` and `make test`. Each creates .venv when missing
# and (re)installs the project only when pyproject.toml changed (stamp file).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export PIPELINE_TIMING := 1
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test test-all lint docs venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision first, pinned to the releases this machine serves from disk;
	# elsewhere pip resolves them within pyproject's ranges.
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/python -m pip install -q "torch<2.15" "torchvision<0.30"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# two workers on the machine's two cores (pytest-xdist): the tests spend much of their time in subprocesses
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

test-all: $(STAMP) lint docs
	HYPOTHESIS_PROFILE=slow $(BIN)/python -m pytest -q -n 2 -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests benchmarks
	$(BIN)/ruff format --check pipeline tests benchmarks

# the documentation site (mkdocs-material): the config reference generated from the schema, then a strict build
# (a warning, such as a broken link, fails it)
docs: $(STAMP)
	$(BIN)/python -m pipeline.config.reference docs/reference/config.md
	$(BIN)/mkdocs build --strict --quiet

demo: $(STAMP)
	bash scripts/demo.sh

clean:
	rm -rf runs data/iceberg-demo data/digits-demo data/folder-demo
