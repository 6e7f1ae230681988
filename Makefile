# Every target installs what it needs into .venv itself, from the committed
# lock (uv.lock), so each one works on a fresh machine and gives the same
# environment there as here. See "Refreshing the lock" in README.md.
PYTHON     ?= python3
UV_VERSION := 0.13.9
VENV       := .venv
BIN        := $(VENV)/bin
TOOLS      := .tools
UV         := $(TOOLS)/bin/uv
STAMP      := $(VENV)/.installed
LATEST     := .venv-latest
# Never fetch a Python interpreter: use the machine's ($(PYTHON)).
export UV_PYTHON_DOWNLOADS := never

.PHONY: demo demo-redis test test-latest lint typecheck bench lock clean

# uv itself, pinned, in a folder of its own (it is not part of the project's environment).
$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)

# The locked environment: --locked refuses a uv.lock that no longer matches
# pyproject.toml instead of silently re-resolving it.
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --extra dev --python $(PYTHON)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/race_two_agents.py
	$(BIN)/python examples/approval_gate.py
	$(BIN)/python examples/audited_agent.py
	$(BIN)/python examples/handoff.py
	$(BIN)/python examples/coding_team.py

# The cross-process race and hand-off on a Redis server (not offline: it needs
# one; it says what to start if none answers). Each run uses a namespace of
# its own and deletes it at the end.
KLOCKWORK_DEMO_REDIS_URL ?= redis://127.0.0.1:6379/0
demo-redis: $(STAMP)
	$(BIN)/python examples/race_processes.py --url $(KLOCKWORK_DEMO_REDIS_URL)
	$(BIN)/python examples/handoff.py --url $(KLOCKWORK_DEMO_REDIS_URL)

lint: $(STAMP)
	$(BIN)/ruff check klockwork tests examples benchmarks
	$(BIN)/ruff format --check klockwork

typecheck: $(STAMP)
	$(BIN)/mypy --strict klockwork

test: lint typecheck
	$(BIN)/python -m pytest

# The newest releases the ranges in pyproject.toml allow, in a separate
# environment (not part of CI): run it before refreshing the lock.
test-latest: $(UV)
	rm -rf $(LATEST)
	$(UV) venv -q --python $(PYTHON) $(LATEST)
	$(UV) pip install -q --python $(LATEST)/bin/python --refresh --upgrade -e ".[dev]"
	$(UV) pip list --python $(LATEST)/bin/python | grep -E '^(langchain|langgraph|mypy|pydantic|ruff) '
	$(LATEST)/bin/ruff check klockwork tests examples benchmarks
	$(LATEST)/bin/mypy --strict --cache-dir $(LATEST)/.mypy_cache klockwork
	$(LATEST)/bin/python -m pytest -p no:cacheprovider

# Re-resolve uv.lock to the newest releases (then run `make test`).
lock: $(UV)
	$(UV) lock --upgrade --python $(PYTHON)

# Every target of the hot-path issue, measured as ratios within each run
# (exit 0 whether targets are met or not). BENCH_ARGS goes to every script,
# e.g. `make bench BENCH_ARGS=--quick`. bench_peers.py needs the bench extra
# (the Agent Governance Toolkit) and says it is skipped without it;
# bench_redis.py needs a Redis server (KLOCKWORK_BENCH_REDIS_URL, default
# redis://127.0.0.1:6379/15) and says what to start without one.
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_leases.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_gates.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_policy_scale.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_audit.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_peers.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_bus.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_middleware.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_redis.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(LATEST) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
