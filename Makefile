# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install what they need.
VENV   ?= .venv
PY     := $(VENV)/bin/python
CACHE  ?= $(HOME)/.cache/qhm-launch
export PIP_CACHE_DIR        ?= $(CACHE)/pip
export TORCH_EXTENSIONS_DIR ?= $(CACHE)/torch_extensions
export TORCHINDUCTOR_CACHE_DIR ?= $(CACHE)/inductor
export MPLBACKEND           ?= Agg

.PHONY: demo test study bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/qhm-launch run recipes/smoke.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/optimizer_step.py
	$(PY) benchmarks/launcher_overhead.py
	$(PY) benchmarks/checkpoint_io.py

clean:
	rm -rf runs .pytest_cache
