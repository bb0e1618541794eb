# Every target sets up .venv itself: torch 2.13.0 (a CPU build on our machines), then cifarlab in
# editable mode. `make demo` installs only what the demo needs (cifarlab's own dependencies); `make
# test` and the others add the test extras (keras, onnx, loggers, dask, optuna, ...). Both install with
# uv where it installs (it unpacks wheels and compiles their bytecode in parallel), else with pip; uv is
# pointed at pip's local wheels (PIP_FIND_LINKS), where a machine keeps its torch build. Both compile the
# bytecode at install: where PYTHONDONTWRITEBYTECODE is set, nothing would compile it later.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.core
STAMP := $(VENV)/.installed
UV = $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python $(foreach d,$(PIP_FIND_LINKS),--find-links $(d))
# Real CIFAR-10 images used by `make demo` when the full set is not in the cache.
CIFAR10_HEAD ?= ../shared/data/cifar10-head

.PHONY: demo test bench bench-peers bench-gpu lint clean

$(CORE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	( $(BIN)/pip install --quiet uv && $(UV) torch==2.13.0 -e . ) || \
	( $(BIN)/pip install --quiet torch==2.13.0 && $(BIN)/pip install --quiet -e . )
	touch $(CORE)

$(STAMP): $(CORE)
	$(UV) -e '.[test,export,loggers,cluster]' || $(BIN)/pip install --quiet -e '.[test,export,loggers,cluster]'
	touch $(STAMP)

demo: $(CORE)
	$(BIN)/cifarlab demo -c configs/quickstart.yaml --cifar10-root $(CIFAR10_HEAD)

# one worker per core (at most 8), every process on one thread; tests that share a trained run or a
# Slurm cluster run in one worker, slow tests first (tests/conftest.py). One file: pytest tests/test_x.py
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses 8

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/time_to_accuracy.py
	$(BIN)/python benchmarks/augment_overhead.py
	$(BIN)/python benchmarks/relu_pool.py
	$(BIN)/python benchmarks/tsne.py --sklearn
	$(BIN)/python benchmarks/compile_start.py
	$(BIN)/python benchmarks/study_overhead.py
	$(BIN)/python benchmarks/peers.py

# every CUDA path (precisions and resume, compile cold / warm, ranks, the recipes' MFU, t-SNE): on a GPU machine only
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

# cifarlab against the reports' tf.keras pipeline; makes .venv-peers (tensorflow-cpu, tf-keras) on first use
bench-peers: $(STAMP)
	$(BIN)/python benchmarks/peers.py

lint: $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,lint]'
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .venv-peers runs
