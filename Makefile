# Two entry points (see README): `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Where the known data set `hymenoptera` is looked up before any download: the
# team's shared copy when it is beside the checkout, plus anything the user set.
SHARED_DATA := $(abspath ../shared/data)
export VISIONTUNE_DATA := $(if $(VISIONTUNE_DATA),$(VISIONTUNE_DATA):)$(SHARED_DATA)

.PHONY: setup train test clean

$(BIN)/visiontune: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

setup: $(BIN)/visiontune

train: setup
	$(BIN)/visiontune train hymenoptera

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
