"""The GPU check's smoke mode runs here (CPU, a few steps), through the one command a device loan runs
(benchmarks/gpu_device.sh), so neither can rot between loans."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT


@pytest.mark.e2e
def test_the_gpu_check_runs_every_section_in_smoke_mode_on_cpu():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "QHM_COMPILE_BACKEND", "OUT")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # about 100 s on an idle 2-core host; the limit leaves room for a loaded CI machine (it once took 308 s)
    out = subprocess.run(["bash", "benchmarks/gpu_device.sh", "--smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    text = out.stdout
    assert out.returncode == 0, out.stderr[-3000:]
    for title in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5."):
        assert title in text, title
    assert "| 8 |" in text and "| 16 |" in text                        # the speed table's rows
    assert "compile default at batch 8 (eager)" in text                 # the compile path, built by nothing
    assert "bitwise equal to the run not stopped: True" in text and "resumed at global step 3: True" in text
    assert "refused: distributed.nproc_per_node: 2 processes asked, 1 GPU visible here" in text
    assert "0 seen by set_sync_debug_mode, 0 it cannot see" in text       # section 2's two counts, on CPU
    assert "gpu check done" in text and "Traceback" not in out.stderr


def test_the_refusal_is_read_from_the_launcher_itself_where_the_project_is_not_installed(tmp_path):
    """Section 5 on a GPU runs `python -m launcher run` in a temporary folder. Where the project is not
    installed (here: -S, so not even this checkout's editable install; torch from its folder) that is
    "No module named launcher", exit 1 -- once read as a clean refusal. With the project on PYTHONPATH,
    as the check now puts it, the launcher's own refusal comes: exit 2, its one line."""
    import torch
    source = (ROOT / "benchmarks" / "gpu_check.py").read_text()
    assert "PYTHONPATH=os.pathsep.join([str(ROOT)" in source and "out.returncode == 2 and len(lines) == 1" in source
    packages = str(Path(torch.__file__).resolve().parents[1])
    (tmp_path / "r.yaml").write_text("data: {dataset: synthetic, size: 64}\nschedule: {batch: {kind: constant, "
                                     "size: 8}}\nslurm: {gpus_per_node: 1}\n")

    def launch(path: str):
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": path, "HOME": os.environ.get("HOME", "/tmp")}
        return subprocess.run([sys.executable, "-S", "-m", "launcher", "run", "r.yaml"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
    bare = launch(packages)
    assert bare.returncode == 1 and "No module named launcher" in bare.stderr
    found = launch(os.pathsep.join([str(ROOT), packages]))
    lines = [x for x in found.stderr.splitlines() if x.strip()]
    assert found.returncode == 2 and len(lines) == 1, found.stderr[-2000:]
    assert "slurm.gpus_per_node: 1 GPU(s) per node asked, and torch sees no GPU here" in lines[0]
