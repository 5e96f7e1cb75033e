# Set-up is two commands: `make main` and `make test`. Both create .venv and install what
# they need on first use (torch and torchvision resolve from pip's index/cache).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: main data test test-slow lint format clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

main: $(INSTALLED) data  ## ResNet-20 with and without CBAM on Fashion-MNIST, side by side
	$(BIN)/cbam compare --output runs/main

data:  ## Debian's Fashion-MNIST package (cbam falls back to a download if this fails)
	test -d $(FASHION_MNIST) || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq dataset-fashion-mnist; } || \
		echo "warning: could not install dataset-fashion-mnist; cbam will try to download it"

test: $(INSTALLED)  ## the default test suite (about a minute on 2 cores)
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: $(INSTALLED)  ## tests that take minutes (full-resolution models)
	$(BIN)/python -m pytest -m slow -q

lint: $(INSTALLED)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: $(INSTALLED)
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
