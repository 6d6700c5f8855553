# The Makefile is the project's dependency graph. Every target that runs Python first makes sure the
# virtual environment exists (created once in .venv, no root needed).
PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat requirements.txt | sha1sum | cut -c1-12)
# Extra pip options, e.g. PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu" on a
# machine without a local CPU wheel of torch 2.13.0 (see README).
PIP_EXTRA ?=

# Parameter profile of the study notebooks (notebooks/profiles.json): default | full | tiny
PROFILE   ?= default
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
EXECUTED  := $(patsubst notebooks/%,build/$(PROFILE)/%,$(NOTEBOOKS))
# each executed notebook exported to HTML beside the report, outputs included (the sections link to them)
RUNS_HTML := $(patsubst notebooks/%.ipynb,report/notebooks/%.html,$(NOTEBOOKS))
# what every notebook's run depends on besides its code: the parameter profiles; the quality notebooks also
# read the trained mini model
PROFILES  := notebooks/profiles.json
MINI_WEIGHTS := $(wildcard data/mini-model/*/model.safetensors)
MINI_MODEL := notebooks/train_mini_model.ipynb
# what the notebooks that only read records (90-99) depend on
READING   := utils/report/sections/s90_cross_platform.py utils/measure/results.py data/prices.csv \
    $(wildcard data/results/*/*.json)
# each notebook's code dependencies, derived from its imports (utils/imports.py; the report's modules are not
# code a notebook runs); made again whenever a file under utils/ or a notebook changes
NOTEBOOK_DEPS := build/notebook-deps.mk
SMOKE     := build/smoke
# `make arm-check`: Graviton profiles emulated with qemu-user (tools/arm-python.sh); ARM_STORE=1 keeps the
# records in data/results (by default they go to build/arm/results)
ARM_PROFILES ?= g2 g3 g4
# JupyterLab refuses to start as root (containers, cloud images) unless told that it may
LAB_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)
ARM_STORE    ?=

.PHONY: env test smoke report render report-check report-pdf video mini-model lab lab-env lab-check tensorboard arm-check \
    clean-env
.NOTPARALLEL:
# a notebook that fails leaves no executed copy behind, so the next `make report` runs it again
.DELETE_ON_ERROR:

env: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(PIP_EXTRA) -r requirements.txt
	$(BIN)/python -c "import torch, sys; v = torch.__version__; \
	    sys.exit(0 if v.startswith('2.13.0') else f'torch {v} installed, 2.13.0 expected: a requirement upgraded it')"
	@# the repository root on the environment's path, so notebooks and JupyterLab import `utils`
	$(BIN)/python -c "import site, pathlib; pathlib.Path(site.getsitepackages()[0], 'opensora_cpu_study.pth').write_text('$(CURDIR)\n')"
	@rm -f $(VENV)/.installed-*
	@touch $@

test: env
	$(BIN)/python -m pytest -q tests
	$(MAKE) smoke

# Every notebook on the tiny profile into a scratch folder; never touches data/results, figures/, report/.
smoke: env
	rm -rf $(SMOKE)
	@for nb in $(NOTEBOOKS); do \
	    $(BIN)/python -m utils.notebooks $$nb $(SMOKE)/$$(basename $$nb) --profile tiny \
	        --results $(SMOKE)/results --figures $(SMOKE)/figures --traces $(SMOKE)/traces || exit 1; \
	done
	$(BIN)/python -m utils.notebooks $(MINI_MODEL) $(SMOKE)/$(notdir $(MINI_MODEL)) --profile tiny \
	    --results $(SMOKE)/results --figures $(SMOKE)/figures --traces $(SMOKE)/traces
	$(BIN)/python -m utils.report --results $(SMOKE)/results --figures $(SMOKE)/figures --out $(SMOKE)/report

# Notebooks run again only when they or what they depend on changed.
$(NOTEBOOK_DEPS): $(shell find utils -name '*.py') $(wildcard notebooks/*.ipynb)
	@mkdir -p $(@D)
	$(PYTHON) -m utils.imports make-deps > $@.tmp && mv $@.tmp $@
-include $(NOTEBOOK_DEPS)

build/$(PROFILE)/0%.ipynb: notebooks/0%.ipynb $(PROFILES) | env
	$(BIN)/python -m utils.notebooks $< $@ --profile $(PROFILE)

build/$(PROFILE)/03_quality_baseline.ipynb build/$(PROFILE)/04_precision_threads_memory.ipynb \
    build/$(PROFILE)/06_int8.ipynb build/$(PROFILE)/07_step_caching.ipynb build/$(PROFILE)/08_end_to_end.ipynb \
    build/$(PROFILE)/09_runtimes.ipynb: \
    $(MINI_WEIGHTS)

build/$(PROFILE)/9%.ipynb: notebooks/9%.ipynb $(READING) | env
	$(BIN)/python -m utils.notebooks $< $@ --profile $(PROFILE)

report: env $(EXECUTED) $(RUNS_HTML) render

# an executed notebook as HTML, its progress bars coalesced into their final lines
report/notebooks/%.html: build/$(PROFILE)/%.ipynb | env
	$(BIN)/jupyter nbconvert --to html --CoalesceStreamsPreprocessor.enabled=True --output-dir report/notebooks $<

# Train the quality testbed's mini model into data/mini-model (under an hour on 2 cores; the time of the
# run that made the committed weights is in the report). Neither `make report` nor `make test` runs this.
mini-model: env
	$(BIN)/python -m utils.notebooks $(MINI_MODEL) build/$(PROFILE)/$(notdir $(MINI_MODEL)) --profile $(PROFILE)

# The report from stored records alone (any machine, nothing measured).
render: env
	$(BIN)/python -m utils.report

# The HTML report as a person sees it: its first screen rendered in Chromium (Debian's package, installed here when
# missing, which needs root), every figure loaded, no table wider than the page (tools/report_check.py)
report-check: env
	@command -v chromium >/dev/null || { echo "report-check: installing Debian's chromium package"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(PIP_EXTRA) -r requirements-report.txt
	$(BIN)/python tools/report_check.py report/report.html --out build/report-check

# The report as a PDF through LaTeX: pandoc with XeLaTeX (Debian's packages, installed here when missing, which needs
# root), landscape A4 for the wide tables; its pages rendered to images and checked (tools/pdf_check.py)
PDF_TOOLS := pandoc xelatex pdftoppm
report-pdf: env
	@for tool in $(PDF_TOOLS); do command -v $$tool >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then echo "report-pdf: installing Debian's pandoc, texlive-xetex and poppler-utils"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pandoc \
	        texlive-xetex texlive-latex-recommended texlive-fonts-recommended lmodern fonts-dejavu-core poppler-utils; fi
	cd report && pandoc report.md --from gfm --pdf-engine=xelatex --resource-path=. -o report.pdf \
	    -V geometry:a4paper,landscape,margin=1.2cm -V mainfont="DejaVu Serif" -V monofont="DejaVu Sans Mono" \
	    -V fontsize=10pt -V colorlinks=true -H ../tools/pdf-header.tex
	$(BIN)/python tools/pdf_check.py report/report.pdf --markdown report/report.md --out build/report-pdf

# One video with a named recipe (utils.optim.recipes: faithful, upstream, fast, small, graviton), e.g.
#   make video RECIPE=small PROMPT="a red panda eating bamboo" ARGS="--num-frames 4s"
RECIPE ?= fast
PROMPT ?=
ARGS   ?=
VIDEO  ?= build/videos/$(RECIPE).mp4
video: env
	@test -n "$(PROMPT)" || { echo 'make video: give PROMPT="..." (and RECIPE=faithful|upstream|fast|small|graviton)' >&2; exit 2; }
	@mkdir -p $(dir $(VIDEO))
	$(BIN)/python -m utils.generate --recipe $(RECIPE) --prompt "$(PROMPT)" --out $(VIDEO) $(ARGS)

lab-env: env
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(PIP_EXTRA) -r requirements-lab.txt
	$(BIN)/python -m ipykernel install --sys-prefix --name opensora-cpu --display-name "OpenSora CPU study"

lab: lab-env
	cd notebooks && ../$(BIN)/jupyter lab $(LAB_ROOT)

# `make lab`'s server started headless on loopback, its status and kernels asked over HTTP, then stopped (CI)
lab-check: lab-env
	$(BIN)/python tools/lab_check.py $(LAB_ROOT)

tensorboard: env
	$(BIN)/tensorboard --logdir build/traces --host 127.0.0.1

# The aarch64 functional check, each profile under emulation: the upstream-fixture parity tests, a tiny
# generation, bf16, fp32 fast math, int8, KleidiAI int4 and SDPA against fp64, and which kernels ran.
# Its own cache in ~/.cache/opensora-cpu-study/arm/ (no .venv; tools/arm-python.sh); the first set-up needs root
# (apt-get, mmdebstrap). The profiles run side by side (emulation is mostly one busy thread per process), each into
# build/arm/<profile>.log, printed when it ends. Emulated timings are not performance.
arm-check: env
	tools/arm-python.sh --setup
	$(BIN)/python -m utils.experiments.arm_check --export-runtime-files
	@mkdir -p build/arm; pids=""; for profile in $(ARM_PROFILES); do \
	    ARM_PROFILE=$$profile ARM_STORE=$(ARM_STORE) tools/arm-python.sh -m utils.experiments.arm_check \
	        > build/arm/$$profile.log 2>&1 & pids="$$pids $$profile:$$!"; \
	done; echo "arm-check: $(ARM_PROFILES) running side by side (build/arm/<profile>.log)"; failed=""; \
	for entry in $$pids; do \
	    wait $${entry#*:} || failed="$$failed $${entry%%:*}"; cat build/arm/$${entry%%:*}.log; \
	done; \
	if [ -n "$$failed" ]; then echo "arm-check: failed on$$failed"; exit 1; fi; echo "arm-check: $(ARM_PROFILES) passed"

clean-env:
	rm -rf $(VENV)
