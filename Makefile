# lorastack: every step of a training run's life. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STACK ?=
PULUMI ?= pulumi
export PULUMI  # infra.confirm and infra.credentials run this CLI
# Where torch comes from: PyPI's default build (CUDA on Linux x86_64), or e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
# PULUMI_CONFIG_PASSPHRASE / PULUMI_CONFIG_PASSPHRASE_FILE are left to your shell: Pulumi takes a variable that is
# set but empty as the passphrase itself, so this file never sets one.

.DEFAULT_GOAL := help
.PHONY: help setup lint test check demo emulator cost preview train status logs fetch destroy reap image bench train-local cog-push

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: ## create .venv with the pinned dependencies and the project itself (editable)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned; TORCH_INDEX picks the build (PyTorch's CPU index skips gigabytes of CUDA libraries)
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[infra,train,dev]'
	@# headless Chromium for the report's browser test: Debian's package where this is root on Debian, else a note
	@command -v chromium >/dev/null || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else echo "note: no chromium here; tests/test_report.py's browser check will be skipped (apt-get install chromium)"; fi; }

lint: ## ruff (style, bugs, imports) and mypy (types); settings in pyproject.toml
	@# both run, so one pass shows every finding; either one failing fails the target
	@status=0; \
	echo "$(PY) -m ruff check ."; $(PY) -m ruff check . || status=1; \
	echo "$(PY) -m mypy"; $(PY) -m mypy || status=1; \
	exit $$status

test: ## run the offline test suite (no cloud, no GPU)
	$(PY) -m pytest

check: ## validate stack files offline: STACK=name, or every stack
	$(PY) -m infra.check $(STACK)

demo: ## the whole flow offline: emulator, stack up, pod trains a tiny model, destroy
	$(PY) -m emulator.demo

emulator: ## a local RunPod-compatible API on :8100 (point RUNPOD_API_BASE_URL at it)
	$(PY) -m emulator.runpod --port 8100

cost: ## price of a run: STACK=name, or every stack in stacks/
	$(PY) -m infra.cost $(STACK)

define need_stack
	@test -n "$(STACK)" || { echo "name a stack: make $@ STACK=sdxl-4090 (files in stacks/)" >&2; exit 2; }
endef

define need_pulumi
	$(need_stack)
	@command -v $(PULUMI) >/dev/null || { echo "the Pulumi CLI is needed: curl -fsSL https://get.pulumi.com | sh (https://www.pulumi.com/docs/install/)" >&2; exit 2; }
endef

preview: ## pulumi preview for STACK=name
	$(need_pulumi)
	$(PY) -m infra.check $(STACK)
	$(PULUMI) preview --stack $(STACK) --diff

train: ## pulumi up for STACK=name: shows the change, asks (YES=1 or CI=true: no question), then volume, pod, training
	$(need_pulumi)
	$(PY) -m infra.check $(STACK)
	$(PY) -m infra.confirm up $(STACK) $(if $(filter 1 y yes true,$(YES)),--yes)

destroy: ## pulumi destroy for STACK=name, after showing what goes and asking (YES=1 skips the question)
	$(need_pulumi)
	$(PY) -m infra.confirm destroy $(STACK) $(if $(filter 1 y yes true,$(YES)),--yes)

status: ## pod state, step, ETA and cost so far: STACK=name
	$(need_stack)
	$(PY) -m infra.ops status $(STACK)

logs: ## follow the pod's logs: STACK=name
	$(need_stack)
	$(PY) -m infra.ops logs $(STACK)

fetch: ## download the trained LoRA to outputs/STACK/: STACK=name
	$(need_stack)
	$(PY) -m infra.ops fetch $(STACK)

reap: ## terminate lorastack pods past their limits or without a live stack (ARGS=--dry-run to list only)
	$(PY) -m infra.reaper $(ARGS)

image: ## build and push the trainer image: VERSION=x.y.z (default: training/version.py)
	$(PY) -m infra.image $(if $(VERSION),--version $(VERSION))

bench: ## time the real training step (tiny models on CPU; full size on a GPU)
	$(PY) -m bench

train-local: ## train on this machine: DATA=folder FAMILY=sd15 MODEL=hf-id-or-path [STEPS=..] [OUT=outputs/local]
	@test -n "$(DATA)" -a -n "$(FAMILY)" -a -n "$(MODEL)" || { echo "usage: make train-local DATA=folder FAMILY=sd15 (any family in the README's table) MODEL=hf-id-or-path [STEPS=500] [OUT=outputs/local]" >&2; exit 2; }
	$(PY) -m training.local --data "$(DATA)" --family "$(FAMILY)" --model "$(MODEL)" $(if $(STEPS),--steps $(STEPS)) $(if $(OUT),--out "$(OUT)")

cog-push: ## push our trainer to Replicate as REPLICATE_MODEL=owner/name (needs the cog CLI, not on PyPI)
	@command -v cog >/dev/null || { echo "the cog CLI is needed: sudo curl -o /usr/local/bin/cog -L https://github.com/replicate/cog/releases/latest/download/cog_$$(uname -s)_$$(uname -m) && sudo chmod +x /usr/local/bin/cog"; exit 2; }
	@test -n "$(REPLICATE_MODEL)" || { echo "name the destination: make cog-push REPLICATE_MODEL=owner/name"; exit 2; }
	# cog packages only container/: copy the trainer in (ignored by git) before building
	rsync -a --delete --exclude __pycache__ training/ container/training/
	cd container && cog push r8.im/$(REPLICATE_MODEL)
