# Quick start: `make demo` runs the main job, `make test` runs the test suite.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv demo test lint bench clean

venv:
	@bash scripts/bootstrap.sh

demo: venv
	$(BIN)/vlpeft demo

test: venv
	$(BIN)/ruff check vlpeft tests benchmarks
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: venv
	$(BIN)/ruff check vlpeft tests benchmarks

bench: venv
	$(BIN)/vlpeft bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
