# The two commands. Each creates the virtual environment if it is missing, installs what is needed, then runs:
#
#   make demo      # python -m ptfast.demo     (DEMO_ARGS="--smoke" for the quick run)
#   make test      # python tests/run.py       (the default test tier; TEST_ARGS="--slow" for the slow tier too)
#   make setup     # only the set-up both of them start with
#
# Set-up is done once: a stamp file in the environment records it, and it is redone only when pyproject.toml or
# setup.py change (or EXTRAS does). torch: if $(PYTHON) already imports a CUDA build of torch, the environment is
# created with --system-site-packages and reuses that torch; otherwise the CPU build of torch $(TORCH_VERSION) is
# installed, with PyTorch's CPU wheel index as an extra index for torch alone (a plain `pip install torch` on Linux
# pulls the multi-GB CUDA wheels; its dependencies come from the usual indexes). TORCH_INDEX= (empty) takes torch
# from pip's configured indexes only. Either way that torch is pinned while ptfast installs: nothing replaces it.
#
# Overrides, e.g. for CI:  make test VENV=.ci-venv PYTHON=python3.12 EXTRAS=test,triton,demo,dev

PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= test,triton,demo
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TEST_ARGS ?=
DEMO_ARGS ?=

VPY := $(VENV)/bin/python
STAMP := $(VENV)/.ptfast-setup-$(EXTRAS)
TORCH_PIN := $(VENV)/.ptfast-torch-pin.txt

.PHONY: demo test setup

demo: setup
	$(VPY) -m ptfast.demo $(DEMO_ARGS)

test: setup
	$(VPY) tests/run.py $(TEST_ARGS)

setup: $(STAMP)

$(VENV)/pyvenv.cfg:
	@if $(PYTHON) -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' >/dev/null 2>&1; then \
	  echo "make: $(PYTHON) has a CUDA build of torch; $(VENV) reuses it (--system-site-packages)"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  echo "make: creating $(VENV) with $(PYTHON)"; \
	  $(PYTHON) -m venv $(VENV); \
	fi

$(STAMP): $(VENV)/pyvenv.cfg pyproject.toml setup.py
	@# setuptools >= 77 builds the package (pyproject's build-system; --no-build-isolation uses the installed one).
	@$(VPY) -c 'import sys, setuptools, wheel; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' \
	  >/dev/null 2>&1 || $(VPY) -m pip install -q "setuptools>=77" wheel
	@if $(VPY) -c 'import torch' >/dev/null 2>&1; then \
	  echo "make: using the torch already in $(VENV): $$($(VPY) -c 'import torch; print(torch.__version__)')"; \
	else \
	  echo "make: installing torch==$(TORCH_VERSION) (CPU build)"; \
	  $(VPY) -m pip install -q --no-deps "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)); \
	fi
	@$(VPY) -c 'from importlib.metadata import version; print("torch==" + version("torch"))' > $(TORCH_PIN)
	@# torch came without its dependencies (so only torch itself is looked up in TORCH_INDEX): this step adds them.
	@# --no-build-isolation: setup.py sees this torch (and builds the CUDA extension where CUDA and nvcc are found).
	$(VPY) -m pip install -q --no-build-isolation -c $(TORCH_PIN) -e ".[$(EXTRAS)]"
	@touch $@
	@echo "make: $(VENV) is set up (ptfast[$(EXTRAS)], $$(cat $(TORCH_PIN)))"
