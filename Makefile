# Set-up and everyday commands. `make serve` and `make test` work on a fresh clone (README).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= models/default/model.onnx
# The service's extras: `serve` (onnxruntime, CPU) or `gpu` (onnxruntime-gpu). Never both.
ORT_EXTRA ?= serve

.PHONY: install serve test lint bench-engine bench-load bench-train clean

$(BIN)/eat: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first, from its CPU wheel: a bare `torch` requirement would pull gigabytes of CUDA.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[$(ORT_EXTRA),openvino,train,bulk,dev]'
	touch $@

install: $(BIN)/eat

# Builds the default model with `eat demo` when it is missing, then serves it on port 8000.
serve: install
	test -f $(MODEL) || $(BIN)/eat demo --out $(dir $(MODEL))
	EAT_MODEL_PATH=$(MODEL) $(BIN)/eat serve --host 0.0.0.0 --port 8000

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .

bench-engine: install
	$(BIN)/python bench/engine.py

bench-load: install
	$(BIN)/python bench/load.py --threads 1 --max-batch 4

bench-train: install
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) models runs bench/results .pytest_cache .ruff_cache
