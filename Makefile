# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install what they need.
VENV   ?= .venv
PY     := $(VENV)/bin/python
CACHE  ?= $(HOME)/.cache/qhm-launch
export PIP_CACHE_DIR        ?= $(CACHE)/pip
export TORCH_EXTENSIONS_DIR ?= $(CACHE)/torch_extensions
export TORCHINDUCTOR_CACHE_DIR ?= $(CACHE)/inductor
export MPLBACKEND           ?= Agg

.PHONY: demo demo-lm test test-fast lint typecheck study scaling scaling-lm branch-study adaptive bench clean
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

# everything: unit tests, in-process gloo ranks, and the real process tree (torchrun, DeepSpeed, Slurm).
# Two test files at a time on 2 cores (a process-tree test waits on its processes a third of its time;
# three at a time measured slower: 1,180 s against 1,087 s), then the tests marked serial one at a time:
# those that assert how soon a stop lands, and the two-launcher elastic runs.
JOBS ?= 2
test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile -m "not serial"
	$(PY) -m pytest -q -m serial

# ruff's rules (pyproject.toml: pyflakes, pycodestyle, bugbear, blind excepts, stale noqa) over all the code
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check qhm launcher tests benchmarks

# mypy over the packages that are typed so far (pyproject.toml's [tool.mypy] files: qhm, launcher/config)
typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

# the edit-test loop: everything but the tests marked e2e (the process tree) or slow (heavy in-process);
# two files at a time: 114-127 s in three runs, 128 s one at a time in one (2 cores, 2026-12-08)
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile -m "not e2e and not slow"

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

# The LM batch-size study: constant batches 8..64 at two LRs and a batch warmup, 2 seeds (about 20 minutes on 2
# cores), then steps and tokens to a test loss, the fit with the best LR per batch, and figures in docs/.
LM_RUNS = runs/lm-scaling/lm-scaling_*
LM_TARGET = test_loss<=2.2
scaling-lm: $(VENV)/.installed
	$(VENV)/bin/qhm-launch sweep recipes/lm/sweep.yaml --local
	$(VENV)/bin/qhm-launch report $(LM_RUNS) > docs/lm_report.md
	echo >> docs/lm_report.md
	$(VENV)/bin/qhm-launch report $(LM_RUNS) --target '$(LM_TARGET)' >> docs/lm_report.md
	$(VENV)/bin/qhm-launch scaling $(LM_RUNS) --target '$(LM_TARGET)' --x tokens --out docs/lm_scaling.png > docs/lm_scaling_fit.md
	$(VENV)/bin/qhm-launch plot $(LM_RUNS) --metric test_loss --x tokens --out docs/lm_test_loss.png

# The critical batch size measured directly: a pilot, branches at 3 positions x factors 1, 2, 4, 8 x 3 seeds for
# 100K tokens each (about 15 minutes on 2 cores), the CBS table with its intervals and figure in docs/.
branch-study: $(VENV)/.installed
	$(VENV)/bin/qhm-launch run recipes/lm/pilot.yaml
	$(VENV)/bin/qhm-launch branch runs/lm-branch/lm-pilot --at 100K,300K,500K --batch 1,2,4,8 --for 100K --seeds 3 --local
	$(VENV)/bin/qhm-launch scaling runs/lm-branch/lm-pilot.branches --cbs --tolerance 2% --out docs/lm_cbs.png > docs/lm_cbs.md

bench: $(VENV)/.installed
	$(PY) benchmarks/optimizer_step.py
	$(PY) benchmarks/launcher_overhead.py
	$(PY) benchmarks/checkpoint_io.py
	$(PY) benchmarks/engines.py
	$(PY) benchmarks/lm_throughput.py
	$(PY) benchmarks/fsdp_memory.py
	$(PY) benchmarks/ddp_fixed_buckets.py

clean:
	rm -rf runs .pytest_cache
