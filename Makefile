# The Makefile is the project's dependency graph. Every target that runs Python first makes
# sure the virtual environment exists (created once, no root needed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha1sum requirements.txt | cut -c1-12)
# Extra pip options, e.g. PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu"
# on a machine without a local CPU wheel of torch 2.13.0 (see README).
PIP_EXTRA ?=

.PHONY: env test report clean-env

env: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(PIP_EXTRA) -r requirements.txt
	$(BIN)/python -c "import torch, sys; v = torch.__version__; \
	    sys.exit(0 if v.startswith('2.13.0') else f'torch {v} installed, 2.13.0 expected: a requirement upgraded it')"
	@rm -f $(VENV)/.installed-*
	@touch $@

test: env
	$(BIN)/python -m pytest -q tests

report: env
	@echo "make report: the measurement notebooks and the rendered report arrive with the measurement-backbone issue (#3)."

clean-env:
	rm -rf $(VENV)
