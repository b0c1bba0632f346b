# The two front-door commands (README): `make demo` and `make test`.  Both create .venv with
# python3 -m venv and (re)install the project into it when it is missing or older than
# pyproject.toml.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
JOBS   ?= 2

.PHONY: demo test bench kernels clean

$(STAMP): pyproject.toml setup.py smpkprobes/machine/_blockbudget_native.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/smpkprobes demo

test: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/smpkprobes bench

# Rebuild the committed kernel images (needs clang and ld.lld; `make test` does not).
kernels:
	$(PYTHON) smpkprobes/machine/kernel/build.py --all

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
