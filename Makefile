# Two commands do all the set-up on a fresh machine:
#   make demo   install, then run acctattr on the bundled digits sample run
#   make test   install, then run the tests
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned for this CPU-only machine: 2.13.0 installs from local disk, an unpinned
# torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/acctattr run sample_runs/digits/manifest.yaml

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy acctattr

bench: install
	$(BIN)/python bench/fidelity.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
