# gpuscale — common tasks.  `make install` once, then `make demo` or `make test`.
PY ?= .venv/bin/python
VENV_BIN := .venv/bin

.PHONY: install test lint demo bench images clean

install:  ## create .venv and install gpuscale with test and dev extras
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"

test:  ## the whole test suite (starts its own PostgreSQL, Docker engine, Prometheus)
	$(PY) -m pytest -q

lint:  ## ruff, mypy, hadolint on both Dockerfiles
	$(VENV_BIN)/ruff check gpuscale tests
	$(VENV_BIN)/ruff format --check gpuscale tests
	$(VENV_BIN)/mypy
	$(VENV_BIN)/hadolint containers/visual/Dockerfile containers/text/Dockerfile

demo:  ## the whole loop on this machine, no GPU needed
	$(VENV_BIN)/gpuscale demo

bench:  ## queue benchmark against the configured (or embedded) database
	$(VENV_BIN)/gpuscale bench queue --tasks 20000 --concurrency 8

images:  ## build both worker images (needs a Docker engine with registry access)
	docker build -f containers/visual/Dockerfile -t gpuscale-visual:latest .
	docker build -f containers/text/Dockerfile -t gpuscale-text:latest .

clean:
	rm -rf .gpuscale build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
