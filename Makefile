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
	$(BIN)/python -m pytest || [ $$? -eq 5 ]  # 5: no tests collected

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

bench-micro: $(STAMP)
	$(BIN)/python -m benchmarks.splice_micro

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
