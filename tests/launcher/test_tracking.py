"""Metrics files and W&B: rows dropped and rewritten on resume, a torn last line survived, the run id
kept, and W&B failures (its service killed) reported in one line while training goes on."""
import json
import os
import subprocess
import sys

import pytest

from launcher.run.tracking import MetricsLog, run_id


def test_metrics_rows_after_the_resume_point_are_dropped_and_a_torn_line_is_survived(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for e in range(4):
        log.append({"epoch": e, "x": e * 1.5})
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"epoch": 4, "x"')                       # a kill in the middle of an append
    assert [r["epoch"] for r in log.rows()] == [0, 1, 2, 3]
    log.keep(lambda r: r["epoch"] < 2)
    assert (tmp_path / "m.jsonl").read_text() == "".join(json.dumps({"epoch": e, "x": e * 1.5}) + "\n"
                                                         for e in range(2))
    steps = MetricsLog(tmp_path / "s.jsonl")
    for s in (10, 20, 30):
        steps.append({"step": s})
    steps.keep(lambda r: r["step"] <= 20)
    assert [r["step"] for r in steps.rows()] == [10, 20]


def test_the_run_id_is_created_once_and_the_checkpoint_wins(tmp_path):
    first = run_id(tmp_path / "wandb_id", None)
    assert len(first) == 12 and run_id(tmp_path / "wandb_id", None) == first
    assert run_id(tmp_path / "wandb_id", "fromckpt") == "fromckpt"
    assert (tmp_path / "wandb_id").read_text().strip() == "fromckpt"


KILLED_SERVICE = """
import os, signal, sys, time
from launcher import config as R
from launcher.cluster.supervise import children
from launcher.run.tracking import Tracker
recipe = R.from_dict({"name": "t", "output": sys.argv[1], "tracking": {"wandb": {"mode": "offline"}},
                      "schedule": {"batch": {"kind": "constant", "size": 8}}})
before = set(children(os.getpid()))
tracker = Tracker(recipe, recipe.folder.wandb, "abcdef123456")
assert tracker.run is not None
tracker.log_row({"epoch": 0, "loss": 1.0}, step=1)
service = [p for p in children(os.getpid()) if p not in before]
assert service, "W&B started its service process"
for pid in service:                  # what a SIGTERM to every step of a Slurm job does to it
    os.kill(pid, signal.SIGTERM)
time.sleep(1.0)
tracker.log_row({"epoch": 1, "loss": 0.5}, step=2)
tracker.summarise({"best": 1})
tracker.finish(preempted=True)
print("trained on", flush=True)
"""


@pytest.mark.slow
def test_wandb_killed_by_a_signal_is_one_line_and_nothing_raises(tmp_path):
    pytest.importorskip("wandb")
    out = subprocess.run([sys.executable, "-c", KILLED_SERVICE, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, WANDB_MODE="offline"))
    assert out.returncode == 0 and out.stdout.strip() == "trained on", out.stderr[-3000:]
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("[qhm-launch] W&B failed (") and "training continues" in lines[0]
    assert "Traceback" not in out.stderr        # not even from W&B's own exit hook


def test_an_online_resume_logs_the_owed_evaluation_row_after_its_last_step_and_skips_the_others():
    """An online W&B run resumed at global step 25 already has rows up to 25 (W&B's own rule: a step at or
    below the last is dropped). The evaluation a preemption interrupted at 25 was never logged: its row goes
    at 26 instead of being lost; any other row at or below 25 (a repeat) stays skipped."""
    from types import SimpleNamespace
    from launcher.run.tracking import Tracker
    logged = []
    tracker = Tracker.__new__(Tracker)
    tracker.run, tracker.log, tracker.last_step, tracker.owed_step = SimpleNamespace(
        log=lambda row, step: logged.append((step, row))), print, 25, None
    tracker.owe(25)
    tracker.log_row({"train_loss": 1.0}, step=24)            # a repeat: skipped
    tracker.log_row({"test_loss": 2.0, "epoch": 0}, step=25)  # the owed row: right after the run's last step
    tracker.log_row({"test_loss": 3.0}, step=25)              # owed once only
    tracker.log_row({"train_loss": 0.5}, step=27)
    assert logged == [(26, {"test_loss": 2.0, "epoch": 0}), (27, {"train_loss": 0.5})]
