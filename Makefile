# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install the project into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PIPI   := $(PIP) install -q -c constraints.txt
CORE   := $(VENV)/.stamp-core
FULL   := $(VENV)/.stamp-full
PYTEST_ARGS ?=

.PHONY: setup setup-full demo demo-quick test test-fast bench clean

$(CORE): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned resolve would pull a multi-GB CUDA build on a CPU machine.
	$(PY) -c "import torch" 2>/dev/null || $(PIPI) torch==2.13.0
	$(PIPI) -e ".[test]"
	touch $@

# The EasyEdit host (PyPI release, installed without its impossible pins) and the
# Triton interpreter used by the kernel tests. Never timm/torchvision.
$(FULL): $(CORE)
	$(PIPI) -e ".[test,triton,easyedit]"
	$(PIP) install -q --no-deps easyeditor==0.0.1.dev0
	touch $@

setup: $(CORE)
setup-full: $(FULL)

demo: $(CORE)
	$(VENV)/bin/rledit demo

demo-quick: $(CORE)
	$(VENV)/bin/rledit demo --quick

test: $(FULL)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(FULL)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(FULL)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
