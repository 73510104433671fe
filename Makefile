# lorastack: every step of a training run's life. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STACK ?=
PULUMI ?= pulumi
export PULUMI_CONFIG_PASSPHRASE ?=

.DEFAULT_GOAL := help
.PHONY: help setup test check demo emulator cost preview train status logs fetch destroy reap image bench train-local cog-push

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: ## create .venv with the pinned dependencies and the project itself (editable)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on dev machines (an unpinned torch pulls gigabytes of CUDA)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[infra,train,dev]'

test: ## run the offline test suite (no cloud, no GPU)
	$(PY) -m pytest

check: ## validate stack files offline: STACK=name, or every stack
	$(PY) -m infra.check $(STACK)

demo: ## the whole flow offline: emulator, stack up, pod trains a tiny model, destroy
	$(PY) -m emulator.demo

emulator: ## a local RunPod-compatible API on :8100 (point RUNPOD_API_BASE_URL at it)
	$(PY) -m emulator.runpod --port 8100

cost: ## price of a run: STACK=name
	$(PY) -m infra.cost $(STACK)

define need_pulumi
	@command -v $(PULUMI) >/dev/null || { echo "the Pulumi CLI is needed: curl -fsSL https://get.pulumi.com | sh (https://www.pulumi.com/docs/install/)"; exit 2; }
	@test -n "$(STACK)" || { echo "name a stack: make $@ STACK=sdxl-4090 (files in stacks/)"; exit 2; }
endef

preview: ## pulumi preview for STACK=name
	$(need_pulumi)
	$(PY) -m infra.check $(STACK)
	$(PULUMI) preview --stack $(STACK) --diff

train: ## pulumi up for STACK=name: volume, pod, training
	$(need_pulumi)
	$(PY) -m infra.check $(STACK)
	$(PULUMI) up --stack $(STACK) --yes

destroy: ## pulumi destroy for STACK=name (the volume is kept unless the stack says otherwise)
	$(need_pulumi)
	$(PULUMI) destroy --stack $(STACK) --yes

status: ## pod state, step, ETA and cost so far: STACK=name
	$(PY) -m infra.ops status $(STACK)

logs: ## follow the pod's logs: STACK=name
	$(PY) -m infra.ops logs $(STACK)

fetch: ## download the trained LoRA to outputs/STACK/: STACK=name
	$(PY) -m infra.ops fetch $(STACK)

reap: ## terminate lorastack pods past their limits or without a live stack (ARGS=--dry-run to list only)
	$(PY) -m infra.reaper $(ARGS)

image: ## build and push the trainer image: VERSION=x.y.z (default: training/version.py)
	$(PY) -m infra.image $(if $(VERSION),--version $(VERSION))

bench: ## time the real training step (tiny models on CPU; full size on a GPU)
	$(PY) -m bench

train-local: ## train on this machine: DATA=folder FAMILY=sd15 MODEL=hf-id-or-path [STEPS=..]
	$(PY) -m training.local --data "$(DATA)" --family "$(FAMILY)" --model "$(MODEL)" $(if $(STEPS),--steps $(STEPS))

cog-push: ## push our trainer to Replicate as REPLICATE_MODEL=owner/name (needs the cog CLI, not on PyPI)
	@command -v cog >/dev/null || { echo "the cog CLI is needed: sudo curl -o /usr/local/bin/cog -L https://github.com/replicate/cog/releases/latest/download/cog_$$(uname -s)_$$(uname -m) && sudo chmod +x /usr/local/bin/cog"; exit 2; }
	@test -n "$(REPLICATE_MODEL)" || { echo "name the destination: make cog-push REPLICATE_MODEL=owner/name"; exit 2; }
	# cog packages only container/: copy the trainer in (ignored by git) before building
	rsync -a --delete --exclude __pycache__ training/ container/training/
	cd container && cog push r8.im/$(REPLICATE_MODEL)
