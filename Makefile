# `make demo` and `make test` each create .venv if missing, install the pinned
# dependencies and the package with its extension, then run. Both are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo study paper test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Reinstall when the pins, the build script or the extension sources change.
$(STAMP): requirements.txt setup.py $(shell find csrc -type f 2>/dev/null) | $(PY)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m eval.study --preset embedded-quick --executor local --jobs 2 --out runs/demo

study: $(STAMP)
	$(PY) -m eval.study --preset embedded --executor local --jobs 2 --out runs/study

# Every claim of the paper on the world (eval/claims.py); resumable, 2 h 12 min on 2 cores.
paper: $(STAMP)
	$(PY) -m eval.study --preset world-paper --executor local --jobs 2 --out runs/paper

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info common/*.so
