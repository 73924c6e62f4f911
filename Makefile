# Two set-up commands for a fresh machine (see README):
#   make demo   - create .venv, install, run a method on the embedded demo dataset
#   make test   - create .venv, install with the test extras (mmseg, crf: needs a C++ compiler, sam, spacy), run the test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
METHOD ?= maskclip
PRETRAINED ?= openai
ARGS ?=

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[mmseg,crf,sam,spacy,test]"
	touch $@

.PHONY: install demo test
install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/ovseg-bench run --method $(METHOD) --dataset demo --pretrained $(PRETRAINED) $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q
