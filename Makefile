# Two entry points: `make demo` (the main job) and `make test` (the test suite; `make test-integration`
# runs the rest of it).
# Both create their own virtualenv in .venv from the pinned constraints.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet
# The CPU build on CPU machines. A GPU user installs a CUDA torch 2.13.0 into .venv first
# (see README); pip then keeps it, since it already satisfies this pin.
TORCH_SPEC ?= torch==2.13.0

export DVC_NO_ANALYTICS := 1

.PHONY: setup demo test test-integration lock clean

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

# `make test` is the default suite (~10 min on 2 cores); `make test-integration` the tests marked
# `integration` (whole pkt/dvc/torchrun processes, the S3 server). CI runs both. pytest's exit 5
# ("no tests collected") counts as a failure, so a marker typo cannot pass.
PYTEST_STATUS = status=$$?; \
	if [ $$status -eq 5 ]; then echo "make $@: pytest collected no tests, which counts as a failure" >&2; fi; \
	exit $$status

test: setup
	@$(BIN)/python -m pytest -m "not integration"; $(PYTEST_STATUS)

test-integration: setup
	@$(BIN)/python -m pytest -m integration; $(PYTEST_STATUS)

lock: setup
	{ sed -n '/^#/p' requirements/constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > requirements/constraints.new
	mv requirements/constraints.new requirements/constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
