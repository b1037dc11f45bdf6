# Thin layer over `python -m pipeline <command>`. Defaults live in pipeline/config.py:
# a variable below is passed as a flag only when you set it, e.g. `make all DATA=path BACKBONE=efficientnet_lite0`.
VENV   ?= .venv
PYTHON ?= $(VENV)/bin/python
BOOTSTRAP_PYTHON ?= python3

flag = $(if $($(1)),--$(2) "$($(1))")
switch = $(if $(filter-out 0 no false,$($(1))),--$(2))
include settings.mk  # SETTINGS and <COMMAND>_FLAGS, generated from pipeline/config.py

MAKE_VARIABLES := VENV PYTHON BOOTSTRAP_PYTHON NPROC IMAGES ARGS SCALE_N
GIVEN := $(foreach a,$(filter-out -%,$(MAKEOVERRIDES)),$(if $(findstring =,$(a)),$(firstword $(subst =, ,$(a)))))
UNKNOWN := $(filter-out $(SETTINGS) $(MAKE_VARIABLES),$(GIVEN))
ifneq ($(UNKNOWN),)
$(error unknown variable $(UNKNOWN); settings are $(SETTINGS), plus $(MAKE_VARIABLES) (ARGS="--flag value" is passed as is); see `make help`)
endif

.PHONY: help install data features train-head sweep report all export compare predict test test-fast bench clean

help: ## list targets and variables
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  settings (each the upper-case name of a --flag; defaults and help: pipeline/config.py, python -m pipeline <command> --help):"
	@echo "    $(SETTINGS)"
	@echo "  also: NPROC (torchrun processes), IMAGES (predict), SCALE_N (bench), ARGS (extra flags, passed as is)"
	@echo "  results: CACHE/BACKBONE/report.html (open it in a browser), report.md, metrics.json"

install: ## create .venv and install the package with its dev extra
	$(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install -e '.[dev]'

data: ## download the seed's Cats-vs-Dogs photos (about 25k) into DATA (default Cat_Dog_data/) unless it holds train/ and test/
	$(PYTHON) -m pipeline data $(DATA_FLAGS) $(ARGS)

features: ## stage one: cache backbone vectors of DATA in CACHE/BACKBONE/features.h5 (NPROC=N: N processes, torchrun)
	$(if $(NPROC),$(VENV)/bin/torchrun --standalone --nproc-per-node=$(NPROC),$(PYTHON)) -m pipeline features $(FEATURES_FLAGS) $(ARGS)

train-head: ## stage two: train the head and the logistic baseline on the cached vectors, kept as CACHE/BACKBONE/runs/RUN
	$(PYTHON) -m pipeline train-head $(TRAIN_HEAD_FLAGS) $(ARGS)

sweep: ## train a grid of heads from the cache, e.g. LR="0.001 0.003 0.01" HIDDEN="256 512" SEED="0 1 2" (also DROPOUT); each is a run, compared on validation
	$(PYTHON) -m pipeline sweep $(SWEEP_FLAGS) $(ARGS)

report: ## test accuracy of head and baseline side by side (metrics.json, report.md); RUN=name, default the best on validation
	$(PYTHON) -m pipeline report $(REPORT_FLAGS) $(ARGS)

all: $(if $(DATA),,data) features train-head report ## the main job: features, train-head, report (without DATA: make data first)

export: ## write the backbone and trained head as model.pt2, model.onnx (and torchvision_model.pth) beside the head
	$(PYTHON) -m pipeline export $(EXPORT_FLAGS) $(ARGS)

compare: ## the pipeline for each of BACKBONES="densenet121 resnet50 efficientnet_lite0", one table
	$(PYTHON) -m pipeline compare $(COMPARE_FLAGS) $(ARGS)

predict: ## classify IMAGES (files or folders) with the trained head; MODEL=logreg TOP_K=3 FORMAT=csv|json
	$(if $(IMAGES),,$(error pass IMAGES=path/to/images (files or folders)))
	@$(PYTHON) -m pipeline predict $(IMAGES) $(PREDICT_FLAGS) $(ARGS)

test: ## run the whole test suite (unit, fault-injection and the integration test on ../shared/data/cats-dogs)
	$(PYTHON) -m pytest

test-fast: ## unit tests only (no fault injection, torchrun, export, 100-class reports, CLI in fresh processes or real data)
	$(PYTHON) -m pytest -m "not slow and not integration"

bench: ## measure stage one, time-to-head, CPU runtimes, memory, and cost against N (SCALE_N="10000 100000"); writes CACHE/bench.json and benchmarks/RESULTS.md
	$(PYTHON) benchmarks/bench.py $(call flag,BACKBONE,backbone) $(call flag,CACHE,cache) $(call flag,DEVICE,device) \
		$(call flag,BATCH_SIZE,batch-size) $(call flag,DATA,data)
	$(PYTHON) benchmarks/default_path.py $(call flag,CACHE,cache)
	$(PYTHON) benchmarks/scale.py $(call flag,CACHE,cache) $(if $(SCALE_N),--n $(SCALE_N))
	$(PYTHON) benchmarks/results.py $(or $(CACHE),cache)

clean: ## delete everything written under CACHE (default cache/), keeping the folder
	find $(or $(CACHE),cache) -mindepth 1 ! -name .gitkeep -delete
