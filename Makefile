# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv with the project and its test extra on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint fuzz bench bench-micro clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lakeproxy demo

test: $(STAMP)
	$(BIN)/ruff check lakeproxy tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest

# Coverage-guided fuzzing of the client-facing wire layer (atheris); new corpus
# entries and crash-* files go to build/fuzz/. FUZZ_SECONDS=3600 for the long run.
FUZZ_SECONDS ?= 600
fuzz: $(STAMP)
	$(BIN)/python tests/fuzz/fuzz_wire.py -max_total_time=$(FUZZ_SECONDS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.pool

bench-micro: $(STAMP)
	$(BIN)/python -m benchmarks.splice_micro

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
