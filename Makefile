# Set-up and entry points. `make demo` and `make test` are the README's two commands.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARCH := $(shell uname -m)
# torch/torchvision pairs that install together on these machines (see DEVELOPERS.md).
ifeq ($(ARCH),aarch64)
TORCH_PINS ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
endif
PYTEST_ARGS ?=

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/amap demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/pytest -n 2 $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check amap tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
