# Two commands do all set-up on a fresh machine:
#   make serve   create .venv, install pinned deps, serve the default reward model on :8000
#   make test    same set-up, then run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PYTEST_ARGS ?=
# `make test` runs the suite in TEST_WORKERS processes (pytest-xdist), a whole test file per
# worker at a time so a file's module fixtures (a served model, a trained one) are built once.
# Much of the suite waits on servers and CLIs starting up, so 2 workers pay even on 2 cores.
# TEST_WORKERS=0: one process, as plain `pytest` runs.
TEST_WORKERS ?= 2

.PHONY: serve test install bench clean

install: $(STAMP)

# torch is pinned to 2.13.0 (CPU wheel) in requirements.lock, installed first so nothing pulls
# a multi-GB CUDA build; the project itself is installed editable without re-resolving deps.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/reward serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/bench_serving.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
