# The README's two commands: `make bench` and `make test`. Both set everything up first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup bench test clean

setup:
	bash scripts/setup.sh

bench: setup
	$(VENV)/bin/alure-bench sweep

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
