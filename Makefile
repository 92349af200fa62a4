# The README's two commands: `make bench` and `make test`. Both set everything up first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup bench test check references clean

setup:
	bash scripts/setup.sh

bench: setup
	$(VENV)/bin/alure-bench sweep

# The Slurm tests need the local single-node cluster: started here, stopped whatever the tests did. Where it
# cannot start (not root, no apt), its tests skip and say why. tests/test_cluster.py starts and stops the emulated
# multi-host cluster itself; the stop here only clears what a killed test run may have left.
test: setup
	$(VENV)/bin/ruff check .
	@if bash slurm/local_cluster.sh start; then req=1; else req=0; \
	    echo "make test: the local Slurm cluster did not start; the Slurm tests will skip"; fi; \
	status=0; ALURE_REQUIRE_SLURM=$$req $(PY) -m pytest || status=$$?; \
	bash slurm/local_cluster.sh stop >/dev/null 2>&1 || true; \
	bash slurm/cluster.sh stop >/dev/null 2>&1 || true; exit $$status

# The quick loop: the linter and the tests that need no MPI ranks, no Slurm and no long runs (no root needed once
# set up): a subset of make test, which CI runs.
check: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not mpi and not slurm and not slow" -p no:cacheprovider

# Every committed reference, recorded from a clean commit on an idle machine, and the files the docs quote
# (scripts/record_references.sh: PARTS=reference,derived to run some, ARGS=--dry-run to print the commands).
references: setup
	bash scripts/record_references.sh $(if $(PARTS),--only $(PARTS)) $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
