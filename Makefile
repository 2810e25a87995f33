# Every target installs what it needs first: on a fresh clone `make demo` and `make test` are enough.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# ruff, then the stage layers and the no-circle rule of pyproject.toml's [tool.importlinter].
lint: $(STAMP)
	$(BIN)/ruff check bnaudit tests benchmarks
	$(BIN)/ruff format --check bnaudit tests benchmarks
	$(BIN)/lint-imports

# Measures the audit against the forward passes it needs (time, memory, growth) and writes
# benchmarks/RESULTS.md; a few minutes on 2 CPU cores. Not a test: it asserts nothing.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

# The demo plants one stale layer, so `bnaudit check` exits 1 (findings) by design; any other
# exit code is a real failure.
demo: $(STAMP)
	$(BIN)/python -m bnaudit.demo demo
	@echo "demo: auditing demo/model.pt on demo/calib.pt (8 batches; reports in demo/):"
	$(BIN)/bnaudit check demo/model.pt --model bnaudit.demo:build_model --data demo/calib.pt \
		--markdown demo/report.md --csv demo/report.csv --json demo/report.json; \
	rc=$$?; if [ $$rc -eq 1 ]; then echo "demo: exit 1 = findings, as planted (reports in demo/)"; \
	else exit $$rc; fi

clean:
	rm -rf $(VENV) demo .pytest_cache .ruff_cache .hypothesis
