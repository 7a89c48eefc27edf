# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install what they need.
VENV   ?= .venv
PY     := $(VENV)/bin/python
CACHE  ?= $(HOME)/.cache/qhm-launch
export PIP_CACHE_DIR        ?= $(CACHE)/pip
export TORCH_EXTENSIONS_DIR ?= $(CACHE)/torch_extensions
export TORCHINDUCTOR_CACHE_DIR ?= $(CACHE)/inductor
export MPLBACKEND           ?= Agg

.PHONY: demo demo-lm test test-fast study scaling scaling-lm adaptive bench clean
STUDY_RUNS = runs/study/study_*
SCALING_RUNS = runs/scaling/scaling_*
SCALING_TARGET = train_loss<=0.3
ADAPTIVE_RUNS = runs/adaptive/adaptive_*
ADAPTIVE_TARGET = test_loss<=0.13

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/qhm-launch run recipes/smoke.yaml

# The language-model demo: tokenizes the Python standard library (byte level, offline), trains a small GPT
# with a batch that warms up in tokens on 2 processes (about two minutes on 2 cores), draws its losses.
demo-lm: $(VENV)/.installed
	$(VENV)/bin/qhm-launch run recipes/lm/demo.yaml
	$(VENV)/bin/qhm-launch plot runs/lm-demo --metric test_loss --x tokens --out runs/lm-demo/test_loss.png
	$(VENV)/bin/qhm-launch plot runs/lm-demo --metric train_loss --rows steps --x tokens --out runs/lm-demo/train_loss.png

# everything: unit tests, in-process gloo ranks, and the real process tree (torchrun, DeepSpeed, Slurm)
test: $(VENV)/.installed
	$(PY) -m pytest -q

# the edit-test loop (under 2 minutes): everything but the tests marked e2e
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not e2e"

# The CPU-sized study: 18 runs on digits (about 8 minutes on 2 cores), then the figures in docs/.
study: $(VENV)/.installed
	$(VENV)/bin/qhm-launch sweep recipes/study/sweep.yaml --local
	$(VENV)/bin/qhm-launch plot $(STUDY_RUNS) --metric test_acc --out docs/study_test_acc.png
	$(VENV)/bin/qhm-launch plot $(STUDY_RUNS) --metric min_grad_norm --out docs/study_min_grad_norm.png
	$(VENV)/bin/qhm-launch report $(STUDY_RUNS) > docs/study_report.md

# The CPU-sized scaling study: 14 runs on digits, then steps/SFO to a target and the critical batch size.
scaling: $(VENV)/.installed
	$(VENV)/bin/qhm-launch sweep recipes/scaling/sweep.yaml --local
	$(VENV)/bin/qhm-launch report $(SCALING_RUNS) --target '$(SCALING_TARGET)' > docs/scaling_report.md
	$(VENV)/bin/qhm-launch scaling $(SCALING_RUNS) --target '$(SCALING_TARGET)' --out docs/scaling.png > docs/scaling_fit.md

# The CPU-sized adaptive-batch study: the batch grown by the measured noise scale against the fixed doubling.
adaptive: $(VENV)/.installed
	$(VENV)/bin/qhm-launch sweep recipes/adaptive/sweep.yaml --local
	$(VENV)/bin/qhm-launch report $(ADAPTIVE_RUNS) > docs/adaptive_report.md
	echo >> docs/adaptive_report.md
	$(VENV)/bin/qhm-launch report $(ADAPTIVE_RUNS) --target '$(ADAPTIVE_TARGET)' >> docs/adaptive_report.md
	$(VENV)/bin/qhm-launch plot $(ADAPTIVE_RUNS) --metric noise_scale --out docs/adaptive.png
	$(VENV)/bin/qhm-launch plot $(ADAPTIVE_RUNS) --metric train_loss --out docs/adaptive_loss.png

bench: $(VENV)/.installed
	$(PY) benchmarks/optimizer_step.py
	$(PY) benchmarks/launcher_overhead.py
	$(PY) benchmarks/checkpoint_io.py
	$(PY) benchmarks/engines.py
	$(PY) benchmarks/lm_throughput.py

clean:
	rm -rf runs .pytest_cache
