# medm: `make demo` trains and evaluates the tiny demo model; `make test` runs the suite.
# Both create .venv when it is missing or when requirements.txt / pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medm-installed

.PHONY: venv test demo demo3d bench lint clean browser

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# The playground's browser test drives Debian's chromium + chromedriver: installed here when missing and apt-get can
# (as root); never fatal, the test skips without them.
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
	{ command -v apt-get >/dev/null 2>&1 && \
	  echo "installing chromium and chromium-driver with apt-get, for the playground's browser test (a minute or two)" && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; }; } || \
	echo "chromium / chromedriver not installed (apt-get as root): the playground's browser test will skip"

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/medm demo

# Every benchmarks/bench_*.py, one JSON line of figures each (docs/performance.md); `make bench BENCH_ARGS=--quick`
# only checks they run.
bench: $(STAMP)
	@for f in benchmarks/bench_*.py; do echo "== $$f"; HF_HUB_OFFLINE=1 $(PY) $$f $(BENCH_ARGS) || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check medm tests benchmarks

clean:
	rm -rf runs .pytest_cache
