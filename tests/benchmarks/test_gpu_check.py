"""The GPU check's smoke mode runs here (CPU, a few steps), so the script a device loan depends on
cannot rot between loans."""
import os
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.e2e
def test_the_gpu_check_runs_every_section_in_smoke_mode_on_cpu():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "QHM_COMPILE_BACKEND")}
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    text = out.stdout
    assert out.returncode == 0, out.stderr[-3000:]
    for title in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5."):
        assert title in text, title
    assert "| 8 |" in text and "| 16 |" in text                        # the speed table's rows
    assert "compile default at batch 8 (eager)" in text                 # the compile path, built by nothing
    assert "bitwise equal to the run not stopped: True" in text and "resumed at global step 3: True" in text
    assert "refused: distributed.nproc_per_node: 2 processes asked, 1 GPU visible here" in text
    assert "gpu check done" in text and "Traceback" not in out.stderr
