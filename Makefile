# gpuscale — common tasks.  On a fresh clone `make test` or `make demo` is enough: each creates
# .venv and installs gpuscale (with the test and dev extras) first when it is missing or older
# than pyproject.toml, and skips that step otherwise.
PY ?= .venv/bin/python
VENV_BIN := .venv/bin
# Written after a successful install; re-installs when pyproject.toml changes.
STAMP := .venv/.gpuscale-installed
POOLS := visual text

.PHONY: install test lint demo bench images clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(STAMP)  ## create .venv and install gpuscale with test and dev extras (once)

test: $(STAMP)  ## the whole test suite (starts its own PostgreSQL, Docker engine, Prometheus)
	$(PY) -m pytest -q

lint: $(STAMP)  ## ruff, mypy, hadolint on the worker images' Dockerfile
	$(VENV_BIN)/ruff check gpuscale tests
	$(VENV_BIN)/ruff format --check gpuscale tests
	$(VENV_BIN)/mypy
	$(VENV_BIN)/hadolint containers/Dockerfile

demo: $(STAMP)  ## the whole loop on this machine, no GPU needed
	$(VENV_BIN)/gpuscale demo

bench: $(STAMP)  ## queue benchmark against the configured (or embedded) database
	$(VENV_BIN)/gpuscale bench queue --tasks 20000 --concurrency 8

# One Dockerfile for every pool; containers/<pool>/build.args holds the pool's --build-arg values.
images:  ## build the worker image of each pool (needs a Docker engine with registry access)
	for pool in $(POOLS); do \
		docker build -f containers/Dockerfile $$(sed 's/^/--build-arg /' containers/$$pool/build.args) \
			-t gpuscale-$$pool:latest . || exit 1; \
	done

clean:
	rm -rf .gpuscale build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
