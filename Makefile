# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3.11
# Two environments: the service's (no torch, as in the Docker image) and the developer's.
SERVE_VENV ?= .venv-serve
DEV_VENV ?= .venv
SERVE_BIN = $(SERVE_VENV)/bin
DEV_BIN = $(DEV_VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
IMAGE ?= lstm-serve

.PHONY: serve test install install-dev lint image lock

%/bin/python:
	$(PYTHON) -m venv $*
	$*/bin/pip install --quiet --upgrade pip

# The serving install: the locked dependencies (each file checked against its hash), then the app alone.
install: $(SERVE_BIN)/python
	$(SERVE_BIN)/pip install --quiet --require-hashes -r requirements/serve.lock
	$(SERVE_BIN)/pip install --quiet --no-deps .

# Versions pinned by requirements/dev.lock (no hashes: torch's CPU build comes from a local wheel or
# PyTorch's index, whose files are not PyPI's).
install-dev: $(DEV_BIN)/python
	$(DEV_BIN)/pip install --quiet -c requirements/dev.lock -e '.[train,dev]'

## Set up the serving install (no torch) and start the service on the shipped models.
serve: install
	LSTM_SERVE_HOST=$(HOST) LSTM_SERVE_PORT=$(PORT) $(SERVE_BIN)/python -m app

## Set up the training + test install and run the whole suite.
test: install-dev
	$(DEV_BIN)/python -m pytest

lint: install-dev
	$(DEV_BIN)/ruff check app training tests

## Build the serving image with docker or podman, run it and check it (tests/test_image.py); IMAGE=name:tag.
image: install-dev
	@rm -f test-artifacts/image.json
	IMAGE=$(IMAGE) $(DEV_BIN)/python -m pytest tests/test_image.py -v
	@cat test-artifacts/image.json

## Re-resolve requirements/*.lock from pyproject.toml (needs PyPI); LOCK_FLAGS=--upgrade moves every pin to
## the newest release allowed. uv resolves for Python 3.11 to 3.13 at once; pip installs.
lock: install-dev
	$(DEV_BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes $(LOCK_FLAGS) \
		--custom-compile-command 'make lock' --output-file requirements/serve.lock
	$(DEV_BIN)/uv pip compile pyproject.toml --extra train --extra dev --universal --python-version 3.11 \
		--constraint requirements/serve.lock $(LOCK_FLAGS) --custom-compile-command 'make lock' \
		--output-file requirements/dev.lock
