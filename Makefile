# Set-up is two commands: `make main` and `make test`. Both create .venv and install what
# they need on first use (torch and torchvision resolve from pip's index/cache).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

# Fashion-MNIST: Debian's package, in the folder it installs. FASHION_MNIST=DIR uses your own
# copy of the four idx files instead. `main` and the tests read the data from that folder
# alone ($$CBAM_FASHION_MNIST), so they cannot pass on data that `data` did not provide.
FASHION_MNIST_PACKAGE := dataset-fashion-mnist
FASHION_MNIST_PACKAGE_DIR := /usr/share/datasets/fashion-mnist
FASHION_MNIST ?= $(FASHION_MNIST_PACKAGE_DIR)
FASHION_MNIST_FILES := train-images-idx3-ubyte train-labels-idx1-ubyte \
	t10k-images-idx3-ubyte t10k-labels-idx1-ubyte
HAVE_FASHION_MNIST := $(foreach f,$(FASHION_MNIST_FILES),\
	{ test -f $(FASHION_MNIST)/$(f).gz || test -f $(FASHION_MNIST)/$(f); } &&) true
WITH_DATA := CBAM_FASHION_MNIST=$(FASHION_MNIST)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: main data test test-slow lint format clean gpu-check docs

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

main: $(INSTALLED) data  ## ResNet-20 with and without CBAM on Fashion-MNIST, side by side
	$(WITH_DATA) $(BIN)/cbam compare --output runs/main

data:  ## Debian's Fashion-MNIST package, installed with apt-get unless already there
ifeq ($(FASHION_MNIST),$(FASHION_MNIST_PACKAGE_DIR))
	@$(HAVE_FASHION_MNIST) || { echo "installing Debian's $(FASHION_MNIST_PACKAGE)"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq $(FASHION_MNIST_PACKAGE) >/dev/null; } || true
endif
	@$(HAVE_FASHION_MNIST) || { \
		echo "error: Fashion-MNIST's files are not in $(FASHION_MNIST). With FASHION_MNIST" \
			"left at its default, this step installs Debian's $(FASHION_MNIST_PACKAGE)" \
			"there, which needs apt-get as root or through sudo and Debian's package" \
			"registry. Install it yourself (\`sudo apt-get install $(FASHION_MNIST_PACKAGE)\`)," \
			"or put $(FASHION_MNIST_FILES) (each may be .gz) in a folder DIR and run" \
			"\`make $(or $(MAKECMDGOALS),data) FASHION_MNIST=DIR\` (cbam itself takes" \
			"--data-dir DIR)." >&2; exit 1; }

test: $(INSTALLED) data  ## the default test suite (about three minutes on 2 cores)
	$(WITH_DATA) $(BIN)/python -m pytest -m "not slow" -q

test-slow: $(INSTALLED) data  ## tests that take minutes (full-resolution models)
	$(WITH_DATA) $(BIN)/python -m pytest -m slow -q

gpu-check:  ## the CUDA path on one GPU (~8 min), with the machine's own python3; OUTPUT=DIR, ARGS=--dry-run
	PYTHONPATH=src $(PYTHON) scripts/gpu_check.py --output $(or $(OUTPUT),runs/gpu-check) $(ARGS)

docs: $(INSTALLED)  ## the documentation site (mkdocs.yml) into site/, strict: a broken link fails
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: $(INSTALLED)
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

format: $(INSTALLED)
	$(BIN)/ruff check --fix src tests scripts
	$(BIN)/ruff format src tests scripts

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .ruff_cache
