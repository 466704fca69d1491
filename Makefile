# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3.11
# Two environments: the service's (no torch, as in the Docker image) and the developer's.
SERVE_VENV ?= .venv-serve
DEV_VENV ?= .venv
SERVE_BIN = $(SERVE_VENV)/bin
DEV_BIN = $(DEV_VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test install install-dev lint

%/bin/python:
	$(PYTHON) -m venv $*
	$*/bin/pip install --quiet --upgrade pip

install: $(SERVE_BIN)/python
	$(SERVE_BIN)/pip install --quiet .

install-dev: $(DEV_BIN)/python
	$(DEV_BIN)/pip install --quiet -e '.[train,dev]'

## Set up the serving install (no torch) and start the service on the shipped models.
serve: install
	LSTM_SERVE_HOST=$(HOST) LSTM_SERVE_PORT=$(PORT) $(SERVE_BIN)/python -m app

## Set up the training + test install and run the whole suite.
test: install-dev
	$(DEV_BIN)/python -m pytest

lint: install-dev
	$(DEV_BIN)/ruff check app training tests
