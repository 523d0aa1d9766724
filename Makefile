# Two commands for a newcomer: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# On a machine without a GPU, torch is installed first, pinned, so that pip takes the CPU build instead of
# resolving the range in pyproject.toml to a multi-GB CUDA build. Point TORCH_INDEX at a CPU wheel index
# where the CPU build is not the default.
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: demo test wheel-check golden bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"; fi
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The demo prepares a dataset and trains tiny-moe on it on one rank (fastest on a small machine: no
# communication), draws its loss curves, then serves the
# checkpoint under the spec's own layout (8 ranks: pp 2 x dp 4, experts over 4 ranks). Run again, it
# finds the training done and only generates.
DEMO_RUN   := runs/tiny-moe-demo
ONE_RANK   := --set parallelism.pp=1 --set parallelism.dp=1 --set parallelism.ep=1 --set cluster.gpus_per_node=1 \
              --set parallelism.pipeline.microbatches=1
# the built-in corpus written as JSON Lines documents and prepared as a user's data is (docs/data.md),
# validated every 25 steps
DEMO_DATA  := --set train.data.kind=prepared --set train.data.path=$(CURDIR)/$(DEMO_RUN)/data --set train.eval_every=25

# lcc's native CPU kernels need x86-64 with AVX-512 and a C++ compiler; elsewhere the demo serves through
# PyTorch's kernels (docs/serve.md)
CPU_KERNELS = $(shell $(BIN)/python -c "from lcc.backends.cpu.native import unavailable; \
  print('' if unavailable() is None else '--set serve.cpu_kernels=torch')")

demo: $(STAMP)
	$(BIN)/lcc report specs/longcat-2.0.yaml
	$(BIN)/lcc compile specs/longcat-2.0.yaml
	mkdir -p $(DEMO_RUN)
	$(BIN)/python -m lcc.data.corpus $(DEMO_RUN)/corpus.jsonl
	$(BIN)/lcc data prepare $(DEMO_RUN)/corpus.jsonl --spec specs/tiny-moe.yaml --out $(DEMO_RUN)/data
	$(BIN)/lcc run train specs/tiny-moe.yaml $(ONE_RANK) $(DEMO_DATA) --steps 100 \
	  --metrics $(DEMO_RUN)/metrics.jsonl --checkpoint-dir $(DEMO_RUN)/checkpoints --resume-if-any
	$(BIN)/lcc plot $(DEMO_RUN)/metrics.jsonl --out $(DEMO_RUN)/loss.png
	$(BIN)/lcc run generate specs/tiny-moe.yaml --checkpoint $(DEMO_RUN)/checkpoints --prompt "The teacher" \
	  --max-tokens 200 --temperature 0.5 --seed 1 $(CPU_KERNELS)

# Refresh every golden plan in generated/ on purpose (CI checks them with lcc compile --check).
golden: $(STAMP)
	for spec in specs/*.yaml; do \
	  $(BIN)/lcc compile $$spec && $(BIN)/lcc compile $$spec --mode serve || exit 1; done

# Two pytest workers, a test file each at a time: most tests run in one thread, and the multi-rank tests
# mostly wait on each other, so two files at once fill the two cores (each rank then takes one thread,
# tests/conftest.py). PYTEST_WORKERS= runs the suite in one process.
PYTEST_WORKERS ?= -n 2 --dist loadfile

test: $(STAMP)
	$(BIN)/ruff check lcc backends tests benchmarks
	$(BIN)/python -m pytest -q $(PYTEST_WORKERS)
	$(MAKE) --no-print-directory wheel-check

# The wheel installed into a new virtual environment and run outside the checkout (about a minute):
# lcc report, lcc compile and lcc run generate on the native kernels it builds (.ci/wheel_check.sh)
wheel-check: $(STAMP)
	bash .ci/wheel_check.sh

# The quick benchmarks (about a minute); the others: python -m benchmarks.<name> (docs/benchmarks.md).
bench: $(STAMP)
	$(BIN)/python -m benchmarks.report_speed
	$(BIN)/python -m benchmarks.compile_speed

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
