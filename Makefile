# Every target installs what it needs into .venv itself, so each one works on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/race_two_agents.py
	$(BIN)/python examples/approval_gate.py
	$(BIN)/python examples/audited_agent.py

lint: $(STAMP)
	$(BIN)/ruff check klockwork tests examples benchmarks
	$(BIN)/ruff format --check klockwork

typecheck: $(STAMP)
	$(BIN)/mypy --strict klockwork

test: lint typecheck
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_leases.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
