# `make demo` and `make test` each set everything up from scratch on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench clean

$(BIN)/hetrain: pyproject.toml
	$(PY) -m venv $(VENV)
	# The CPU wheel of torch first: a bare `torch` requirement would pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,hf]'
	touch $(BIN)/hetrain

setup: $(BIN)/hetrain

demo: setup
	# a token file (a BPE of 256 ids trained on the docs), then the job file over it:
	# tiny on three kinds, TensorBoard events in out/demo/tensorboard
	$(BIN)/hetrain data prepare README.md docs/*.md --out out/demo-tokens.bin --train-vocab 256
	$(BIN)/hetrain train --config examples/jobs/three-kinds.toml --data out/demo-tokens.bin
	# one round keeps the demo short; the README's figures are the median of 3 (the default)
	$(BIN)/hetrain bench dp --cluster examples/clusters/three-kinds.yaml --rounds 1 \
		--json out/bench-dp.json

test: setup
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) out
