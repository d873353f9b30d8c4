# The two commands of the README. Both create the environment first when it is missing (setup/env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup lint

demo: setup  ## set up, then run the main job on the embedded default
	$(VENV)/bin/leanpo demo

test: setup  ## set up, then run the default test suite
	$(PY) -m pytest

setup:  ## create or refresh the virtual environment (no-op when up to date)
	LEANPO_VENV=$(VENV) bash setup/env.sh
