# The two commands a new machine needs: `make demo` and `make test`.
# Each creates .venv in the repo root when it is missing and installs the project into it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Prefect's temporary server: no telemetry (it only prints errors offline).
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# Material for MkDocs' notice about MkDocs 2 (printed on every build; nothing to act on here).
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test bench lint docs clean install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/imgscore demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

# mypy reads modules by folder, so it checks a link tree that lays flows/, tasks/ and configs/ out
# as installed (imgscore.flows, imgscore.tasks, imgscore.configs; pyproject.toml's package-dir).
TYPECHECK := build/typecheck
lint: $(STAMP)
	$(BIN)/ruff check imgscore flows tasks tests benchmarks
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/imgscore
	for f in imgscore/* flows tasks configs; do ln -s "$(CURDIR)/$$f" $(TYPECHECK)/imgscore/; done
	cd $(TYPECHECK) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p imgscore

# The docs site (mkdocs.yml, pages under docs/): --strict fails on a broken link or a page missing from the nav.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) site build outputs/demo outputs/predictions outputs/errors outputs/errors_history outputs/embeddings \
		outputs/runs outputs/_prefect outputs/_locks
