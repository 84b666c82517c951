# l4lb: `make demo` shows it at work, `make test` runs every test.
# Both set the machine up first (idempotent: quick when nothing is missing).
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-unit test-bpf test-lab demo demo-ecmp bench bench-quick lint clean

setup:
	@bash .ci/setup.sh

test: setup
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

test-bpf: setup
	$(PY) -m pytest -q tests/bpf $(PYTEST_ARGS)

test-lab: setup
	$(PY) -m pytest -q tests/lab $(PYTEST_ARGS)

demo: setup
	$(PY) -m l4lb.lab.demo

demo-ecmp: setup
	$(PY) -m l4lb.lab.demo_ecmp

bench: setup
	$(PY) -m bench.report

bench-quick: setup
	$(PY) -m bench.report --quick

lint: setup
	$(VENV)/bin/ruff check l4lb tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
