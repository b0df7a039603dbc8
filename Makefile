# Every target builds .venv from nothing if it is missing; torch is pinned to the CPU build on disk.
PY := .venv/bin/python
PIP := .venv/bin/pip
TORCH := torch==2.13.0

.PHONY: install demo test bench clean

.venv/installed: pyproject.toml Makefile
	python3 -m venv .venv
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev]"
	touch $@

install: .venv/installed

demo: install
	$(PY) examples/quickstart.py
	$(PY) examples/halting_study.py --quick

test: install
	$(PY) -m pytest tests

bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf .venv .pytest_cache
