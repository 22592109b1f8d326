# Two commands: `make test` and `make run`. Both create .venv if missing and install the
# pinned dependencies once; a stamp named by a hash of the lock inputs makes later calls fast.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK_HASH := $(shell cat requirements.txt constraints.txt Makefile | sha1sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(LOCK_HASH)
ARGS ?=

.PHONY: setup test run bench gpu-check clean

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

# The benchmarks a user cares about, on this machine, a few minutes on 2 idle cores: the training
# step (paper networks at 8x8, the demo's at 32x32), the loader, face detection on the demo photos,
# the metrics' cost. JSON lines go to runs/bench.jsonl, a table at the end. The Ray-cluster ones
# (launch time, recovery, 1 vs 2 workers) take many minutes: see the README's Benchmarks.
BENCH_OUT := runs/bench.jsonl
BENCH_SHARDS := runs/.shards/bench-demo32
DEMO_NETS := --max-resolution 32 --latent-size 128 --fmap-base 512 --fmap-max 128
bench: $(STAMP)
	@mkdir -p runs && rm -f $(BENCH_OUT)
	$(PY) -m bench.train_step --resolution 8 --batch 32 --steps 3 --warmup 1 --json >> $(BENCH_OUT)
	$(PY) -m bench.train_step --resolution 32 --batch 32 --steps 3 --warmup 1 $(DEMO_NETS) --json >> $(BENCH_OUT)
	@test -f $(BENCH_SHARDS)/manifest.json || $(PY) -m data_pipeline --input data/demo_faces \
		--output $(BENCH_SHARDS) --resolution 32 --quiet
	$(PY) -m bench.loader --shards $(BENCH_SHARDS) --resolution 32 --batch 32 --seconds 10 --steps 1 \
		$(DEMO_NETS) --json >> $(BENCH_OUT)
	$(PY) -m bench.mtcnn --input data/demo_faces --rounds 2 --json >> $(BENCH_OUT)
	$(PY) -m bench.metrics_overhead --resolution 32 --batch 32 --steps 3 $(DEMO_NETS) >> $(BENCH_OUT)
	@$(PY) -m bench.table $(BENCH_OUT)

# the one-shot GPU check (README: GPU check); ARGS=--quick runs it at tiny sizes on a CPU
gpu-check: $(STAMP)
	$(PY) -m bench.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
