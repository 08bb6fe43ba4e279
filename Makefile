# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv on first use: `make demo` with the project and its emulator
# extra only, `make test` (and the other targets) with the test extra too.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-emulator
# make demo LISTEN=127.0.0.1:6433 when 6432 is taken (PgBouncer's default too).
LISTEN ?=

.PHONY: demo test lint fuzz bench bench-micro clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip

# The test extra includes the emulator extra: after `make test`, the demo needs nothing more.
$(DEMO_STAMP): pyproject.toml | $(VENV)/bin/python
	@if [ -f $(STAMP) ] && [ $(STAMP) -nt pyproject.toml ]; then :; else \
	  echo "$(BIN)/python -m pip install -q -e '.[emulator]'"; \
	  $(BIN)/python -m pip install -q -e '.[emulator]'; fi
	touch $(DEMO_STAMP)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP) $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/lakeproxy demo $(if $(LISTEN),--listen $(LISTEN))

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
