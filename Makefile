# Every target builds .venv from nothing if it is missing; torch is pinned to the CPU build on disk.
PY := .venv/bin/python
PIP := .venv/bin/pip
TORCH := torch==2.13.0

.PHONY: install demo test bench docs chromium dist clean

.venv/installed: pyproject.toml Makefile
	python3 -m venv .venv
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev]"
	touch $@

install: .venv/installed

demo: install
	$(PY) examples/quickstart.py
	$(PY) examples/halting_study.py --quick
	$(PY) examples/looped_lm.py --quick

# The suite includes the docs: every snippet, the --strict site build, and the browser test
# (skipped, with the reason, when Chromium is absent: `make docs` installs it).
test: install
	$(PY) -m pytest tests

bench: install
	$(PY) benchmarks/run.py

# The documentation site, built offline into site/; a warning fails the build.
docs: install chromium
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# Debian's Chromium for the browser test (Playwright drives it; no browser is downloaded).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	echo "chromium: not installed (needs root and apt-get); the browser test will be skipped"

# A wheel and an sdist in dist/.
dist: install
	$(PY) -m build --outdir dist .

clean:
	rm -rf .venv .pytest_cache site dist build *.egg-info
