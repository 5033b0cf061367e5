# The README's two commands: `make test` and `make demo`. Both set up .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-slow demo bench lint system-deps

# espeak-ng synthesises the speech companion's corpus; installed when we may (root, apt).
system-deps:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null) \
	      || echo "warning: could not install espeak-ng; speech companion tests will skip"; \
	  else echo "note: install espeak-ng for the speech companion"; fi; }

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first: on these machines this exact version installs from local disk.
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q "torch>=2.4"
	$(PY) -m pip install -q -e ".[test,companions]"
	touch $(STAMP)

test: $(STAMP) system-deps
	$(PY) -m pytest -q

test-slow: $(STAMP) system-deps
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(PY) -m bbem.demo --config configs/demo.yaml --run-dir runs/demo

bench: $(STAMP)
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
