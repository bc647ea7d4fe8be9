# Two entry points: `make demo` (the main job) and `make test` (the test suite).
# Both create their own virtualenv in .venv from the pinned constraints.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet
# The CPU build on CPU machines. A GPU user installs a CUDA torch 2.13.0 into .venv first
# (see README); pip then keeps it, since it already satisfies this pin.
TORCH_SPEC ?= torch==2.13.0

export DVC_NO_ANALYTICS := 1

.PHONY: setup demo test lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)"
	$(BIN)/python -c "import torch; print('torch', torch.__version__)"
	$(PIP) install -c requirements/constraints.txt -e ".[test]"
	$(BIN)/python -c "import pkt_pipeline, torch, transformers, zarr, dvc; print('pkt', pkt_pipeline.__version__, 'ready')"
	touch $@

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro
	@cat report/report.md

test: setup
	@$(BIN)/python -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests, which counts as a failure" >&2; fi; \
	exit $$status

lock: setup
	{ sed -n '/^#/p' requirements/constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > requirements/constraints.new
	mv requirements/constraints.new requirements/constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
