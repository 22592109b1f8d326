# Two commands: `make test` and `make run`. Both create .venv if missing and install the
# pinned dependencies once; a stamp named by a hash of the lock inputs makes later calls fast.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK_HASH := $(shell cat requirements.txt constraints.txt Makefile | sha1sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(LOCK_HASH)
ARGS ?=

.PHONY: setup test run bench clean

setup: $(STAMP)

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps facenet-pytorch==2.6.0
	@rm -f $(VENV)/.installed-* && touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

run: $(STAMP)
	$(PY) launch.py --nodes 4 $(ARGS)

bench: $(STAMP)
	$(PY) -m bench.train_step --resolution 8 --batch 32 --json
	$(PY) -m bench.train_step --resolution 32 --batch 8 --json

clean:
	rm -rf $(VENV) .pytest_cache
