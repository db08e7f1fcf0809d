# medm: `make demo` trains and evaluates the tiny demo model; `make test` runs the suite.
# Both create .venv when it is missing or when requirements.txt / pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medm-installed

.PHONY: venv test demo demo3d bench lint clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/medm demo

bench: $(STAMP)
	@for f in benchmarks/bench_*.py; do echo "== $$f"; HF_HUB_OFFLINE=1 $(PY) $$f || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check medm tests

clean:
	rm -rf runs .pytest_cache
