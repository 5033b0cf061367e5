# The README's two commands: `make test` and `make demo`. Both set up .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-slow demo bench lint system-deps

# espeak-ng synthesises the speech companion's corpus; installed when we may (root, apt).
# Xvfb gives napari's OpenGL canvas a display in the plugin tests (pytest-xvfb starts it); the
# libxcb-* libraries are what PyQt6's bundled xcb platform plugin links against.
QT_DEBS := xvfb libgl1 libgl1-mesa-dri libegl1 libglib2.0-0 libfontconfig1 libdbus-1-3 \
  libx11-xcb1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-glx0 libxcb-icccm4 libxcb-image0 \
  libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 libxcb-xkb1
system-deps:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null) \
	      || echo "warning: could not install espeak-ng; speech companion tests will skip"; \
	  else echo "note: install espeak-ng for the speech companion"; fi; }
	@command -v Xvfb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(QT_DEBS) >/dev/null) \
	      || echo "warning: could not install Xvfb and Qt's X libraries; napari widget tests will skip"; \
	  else echo "note: install xvfb for the napari plugin tests"; fi; }

$(STAMP): pyproject.toml napari_plugin/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first: on these machines this exact version installs from local disk.
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q "torch>=2.4"
	$(PY) -m pip install -q -e ".[test,companions]"
	# the napari plugin (its own distribution) with a Qt binding, pytest-qt and pytest-xvfb
	$(PY) -m pip install -q -e "./napari_plugin[qt,testing]"
	touch $(STAMP)

test: $(STAMP) system-deps
	$(PY) -m pytest -q

test-slow: $(STAMP) system-deps
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(PY) -m bbem.demo --config configs/demo.yaml --run-dir runs/demo

bench: $(STAMP)
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# ruff (rules in pyproject.toml [tool.ruff]), its formatter, and mypy (pyproject.toml [tool.mypy])
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
