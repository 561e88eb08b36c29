# The two quick-start targets create .venv when it is missing, install the
# pinned requirements and the package (editable), then run.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
HUB_STAMP := $(VENV)/.installed-hub

.PHONY: demo lint test test-all clean

$(STAMP): requirements.txt setup.py
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found: ASCL needs Python 3.11 (set PYTHON=...)"; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $(STAMP)

# the optional KerasHub extra, for its tests
$(HUB_STAMP): $(STAMP) requirements-hub.txt
	$(VENV)/bin/pip install -q -r requirements-hub.txt
	touch $(HUB_STAMP)

demo: $(STAMP)
	$(VENV)/bin/ascl demo

# ruff.toml states the lint rules, .importlinter the packages' layering
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: lint $(HUB_STAMP)
	$(VENV)/bin/python -m pytest -m "not slow"

test-all: $(STAMP) $(HUB_STAMP)
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
