# The two front-door commands (README): `make demo` and `make test`.  Both create .venv with
# python3 -m venv and (re)install the project into it when it is missing or older than
# pyproject.toml.  pip's and setuptools' chatter goes to .venv/install.log, and is shown only
# when the install fails, so that `make demo` writes nothing to stderr.  Afterwards the command
# is .venv/bin/smpkprobes (or `smpkprobes` after `. .venv/bin/activate`).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOG    := $(VENV)/install.log
JOBS   ?= 2

.PHONY: demo test lint bench kernels clean

$(STAMP): pyproject.toml setup.py smpkprobes/machine/_blockbudget_native.c smpkprobes/machine/_tracefold_native.c \
          smpkprobes/machine/_codehook_native.c
	@echo "setting up $(VENV) (python3 -m venv, pip install -e '.[test]'; log in $(LOG))"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --upgrade pip > $(LOG) 2>&1 || { cat $(LOG) >&2; exit 1; }
	@$(BIN)/python -m pip install -e '.[test]' >> $(LOG) 2>&1 || { cat $(LOG) >&2; exit 1; }
	@touch $(STAMP)
	@echo "done: run .venv/bin/smpkprobes, or \`. .venv/bin/activate\` and then smpkprobes"

demo: $(STAMP)
	$(BIN)/smpkprobes demo

test: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/smpkprobes bench

# Rebuild the committed kernel images (needs clang and ld.lld; `make test` does not).
CLANG ?= $(or $(SMPK_CLANG),clang)
LLD   ?= $(or $(SMPK_LD),ld.lld)
kernels:
	$(if $(shell command -v $(CLANG)),,$(error make kernels needs $(CLANG) and $(LLD) on the PATH (e.g. apt-get install clang lld); make demo and make test use the committed images))
	$(if $(shell command -v $(LLD)),,$(error make kernels needs $(LLD) on the PATH (e.g. apt-get install lld)))
	$(PYTHON) smpkprobes/machine/kernel/build.py --all

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
