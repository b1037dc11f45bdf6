# Thin layer over `python -m pipeline <command>`. Defaults live in pipeline/config.py:
# a variable below is passed as a flag only when you set it, e.g. `make all DATA=path BACKBONE=efficientnet_lite0`.
VENV   ?= .venv
PYTHON ?= $(VENV)/bin/python
BOOTSTRAP_PYTHON ?= python3

flag = $(if $($(1)),--$(2) "$($(1))")
LOCATION = $(call flag,CACHE,cache) $(call flag,BACKBONE,backbone)
FEATURE_FLAGS = $(call flag,DATA,data) $(LOCATION) $(call flag,DEVICE,device) $(call flag,WEIGHTS,weights) \
	$(call flag,PRECISION,precision) $(call flag,RUNTIME,runtime) $(call flag,STORAGE,storage) \
	$(call flag,BATCH_SIZE,batch-size) $(call flag,WORKERS,workers) $(call flag,AUGMENT,augment) $(if $(FORCE),--force) $(if $(VERIFY),--verify) $(if $(MERGE),--merge)
HEAD_FLAGS = $(call flag,DATA,data) $(LOCATION) $(call flag,SEED,seed) $(call flag,EPOCHS,epochs)
REPORT_FLAGS = $(call flag,DATA,data) $(LOCATION)
PREDICT_FLAGS = $(LOCATION) $(call flag,DEVICE,device) $(call flag,WEIGHTS,weights) $(call flag,PRECISION,precision) \
	$(call flag,RUNTIME,runtime) $(call flag,MODEL,model) $(call flag,TOP_K,top-k) $(call flag,FORMAT,format)

.PHONY: help install features train-head report all compare predict test test-fast bench clean

help: ## list targets and variables
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  variables: DATA BACKBONE CACHE DEVICE WEIGHTS SEED EPOCHS PRECISION RUNTIME STORAGE BATCH_SIZE WORKERS FORCE=1 VERIFY=1 AUGMENT NPROC MERGE=1 IMAGES MODEL TOP_K FORMAT BACKBONES SCALE_N (defaults: pipeline/config.py)"

install: ## create .venv and install the package with its dev extra
	$(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install -e '.[dev]'

features: ## stage one: cache backbone vectors of DATA in CACHE/BACKBONE/features.h5 (NPROC=N: N processes, torchrun)
	$(if $(NPROC),$(VENV)/bin/torchrun --standalone --nproc-per-node=$(NPROC),$(PYTHON)) -m pipeline features $(FEATURE_FLAGS)

train-head: ## stage two: train the head and the logistic baseline on the cached vectors
	$(PYTHON) -m pipeline train-head $(HEAD_FLAGS)

report: ## test accuracy of head and baseline side by side (metrics.json, report.md)
	$(PYTHON) -m pipeline report $(REPORT_FLAGS)

all: features train-head report ## the main job: features, train-head, report

compare: ## the pipeline for each of BACKBONES="densenet121 resnet50 efficientnet_lite0", one table
	$(PYTHON) -m pipeline compare $(call flag,BACKBONES,backbones) $(call flag,DATA,data) $(call flag,CACHE,cache) \
		$(call flag,DEVICE,device) $(call flag,SEED,seed) $(call flag,EPOCHS,epochs)

predict: ## classify IMAGES (files or folders) with the trained head; MODEL=logreg TOP_K=3 FORMAT=csv|json
	$(if $(IMAGES),,$(error pass IMAGES=path/to/images (files or folders)))
	@$(PYTHON) -m pipeline predict $(IMAGES) $(PREDICT_FLAGS)

test: ## run the whole test suite (unit, fault-injection and the integration test on ../shared/data/cats-dogs)
	$(PYTHON) -m pytest

test-fast: ## unit tests only (no fault injection, torchrun or real data)
	$(PYTHON) -m pytest -m "not slow and not integration"

bench: ## measure stage one, time-to-head, CPU runtimes, memory, and cost against N (SCALE_N="10000 100000"); writes CACHE/bench.json
	$(PYTHON) benchmarks/bench.py $(call flag,BACKBONE,backbone) $(call flag,CACHE,cache) $(call flag,DEVICE,device) \
		$(call flag,BATCH_SIZE,batch-size) $(call flag,DATA,data)
	$(PYTHON) benchmarks/scale.py $(call flag,CACHE,cache) $(if $(SCALE_N),--n $(SCALE_N))

clean: ## delete everything written under CACHE (default cache/), keeping the folder
	find $(or $(CACHE),cache) -mindepth 1 ! -name .gitkeep -delete
