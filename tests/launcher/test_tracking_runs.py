"""Tracking across preemptions, read from the files a user has: per-step rows in steps.jsonl, one W&B
history per run (W&B's own records in the offline .wandb files), and status / report / plot over runs
in every state."""
import json
import signal

import pytest

from helpers import (base_recipe, checkpoint_steps, cli, metric_rows, run_ranks, start, train_ranks, wait_for,
                     write_recipe)
from launcher.run.files import read_jsonl
from launcher.run.tracking import WALL_FIELDS
from wandb_records import history, of_kind, records

SLOW = {"QHM_TEST_STEP_DELAY": "0.05"}
pytestmark = pytest.mark.e2e      # runs preempted and resumed through the real process tree


def recipe(**over):
    return base_recipe(**{"name": "w", "epochs": 4, "data.size": 400, "tracking.log_every_steps": 2,
                          "tracking.step_grad_norm": True, **over})


def step_rows(run):
    return [{k: v for k, v in r.items() if k not in WALL_FIELDS} for r in read_jsonl(run / "steps.jsonl")]


def preempt_when(proc, run, enough, what):
    wait_for(lambda: enough(checkpoint_steps(run)), proc=proc, what=what)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75


def test_a_run_preempted_twice_keeps_one_wandb_history_and_every_row_once(tmp_path):
    pytest.importorskip("wandb")
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    reference = train_ranks(recipe(), ref_dir)

    path = write_recipe(tmp_path, recipe(**{"tracking.wandb.mode": "offline"}))
    run = tmp_path / "runs" / "w"
    env = {**SLOW, "WANDB_DIR": str(tmp_path)}
    preempt_when(start(["run", str(path)], cwd=tmp_path, env=env), run, lambda s: len(s) >= 2, "two checkpoints")
    first_stop = max(checkpoint_steps(run))
    preempt_when(start(["run", str(path)], cwd=tmp_path, env=env), run,
                 lambda s: any(x > first_stop + 6 for x in s), "checkpoints after the first resume")
    cli(["run", str(path)], cwd=tmp_path, check=0, env={"WANDB_DIR": str(tmp_path)})

    # the files the user keeps: identical to an uninterrupted run's, wall-clock fields aside
    assert metric_rows(run) == metric_rows(reference)
    assert step_rows(run) == step_rows(reference) and len(step_rows(run)) == 49 // 2
    assert all(r["minibatch_grad_norm"] > 0 for r in step_rows(run))

    # W&B: three offline folders, one run id, one history
    wandb_id = (run / "wandb_id").read_text().strip()
    folders = list(run.glob("wandb/offline-run-*"))
    assert len(folders) == 3
    segments = []
    for folder in folders:
        recs = records(next(folder.glob("*.wandb")))
        segments.append((of_kind(recs, "run")[0].start_time.ToNanoseconds(), recs))
    segments.sort(key=lambda s: s[0])
    assert {r.run_id for _, recs in segments for r in of_kind(recs, "run")} == {wandb_id}
    rows = [h for _, recs in segments for h in history(recs)]
    steps = [h["_step"] for h in rows]
    assert steps == sorted(set(steps)), "W&B steps strictly increase across all segments"
    for row in metric_rows(run):                      # every epoch row exactly once, at its global step
        hits = [h for h in rows if "train_loss" in h and h["_step"] == row["step"]]
        assert len(hits) == 1 and hits[0]["train_loss"] == pytest.approx(row["train_loss"], rel=1e-12)
    assert sum("train_loss" in h for h in rows) == len(metric_rows(run))
    for row in step_rows(run):                        # every per-step row exactly once
        hits = [h for h in rows if "step/train_loss" in h and h["_step"] == row["step"]]
        assert len(hits) == 1 and hits[0]["step/train_loss"] == pytest.approx(row["train_loss"], rel=1e-12)
    assert sum("step/train_loss" in h for h in rows) == len(step_rows(run))
    # the preempted segments are marked preempting and not failed; the last one carries the summary
    for _, recs in segments[:2]:
        assert of_kind(recs, "preempting") and [e.exit_code for e in of_kind(recs, "exit")] == [0]
    final = segments[2][1]
    assert [e.exit_code for e in of_kind(final, "exit")] == [0]
    summary = {i.key: json.loads(i.value_json) for s in of_kind(final, "summary") for i in s.update}
    assert {"best_test_acc", "min_grad_norm", "total_steps", "total_sfo", "final_test_acc"} <= set(summary)
    assert summary["total_steps"] == 49 and summary["total_sfo"] == 4 * 400


def test_status_report_and_plot_over_runs_in_every_state(tmp_path, capsys):
    from launcher.cli import analysis
    from launcher.cli.status import run_status
    runs = tmp_path / "runs"
    path = write_recipe(tmp_path, recipe(**{"tracking.step_grad_norm": False}))
    run = runs / "w"
    assert run_status(run)["state"] == "not started"
    proc = start(["run", str(path)], cwd=tmp_path, env=SLOW)
    wait_for(lambda: len(checkpoint_steps(run)) >= 2, proc=proc, what="two checkpoints")
    now = run_status(run)
    assert now["state"] == "running" and now["detail"].startswith("pid ") and now["step"] >= 3
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75
    assert run_status(run)["state"] == "preempted"
    stopped = max(checkpoint_steps(run))
    proc = start(["run", str(path)], cwd=tmp_path, env=SLOW)
    wait_for(lambda: max(checkpoint_steps(run)) > stopped, proc=proc, what="progress after the resume")
    proc.kill()                              # the launcher only: its agent and workers die with it
    proc.wait()
    wait_for(lambda: run_status(run)["state"] == "interrupted", timeout=30, what="the run to end")
    cli(["run", str(path)], cwd=tmp_path, check=0)
    done = run_status(run)
    assert (done["state"], done["epoch"], done["step"]) == ("done", 4, 49)

    bad = write_recipe(tmp_path, recipe(name="nan", **{"schedule.lr.max": 1e12, "schedule.lr.kind": "constant"}), "bad.yaml")
    assert cli(["run", str(bad)], cwd=tmp_path).returncode == 1
    failed = run_status(runs / "nan")
    assert failed["state"] == "failed" and "not finite at global step" in failed["detail"]

    (runs / "never").mkdir()                       # submitted (its recipe written), not started yet
    (runs / "never" / "recipe.yaml").write_text("name: never\n")
    out = cli(["status", str(run), str(runs / "nan"), str(runs / "never")], cwd=tmp_path, check=0).stdout
    assert "| done | 4 | 49 |" in out and "| failed |" in out and "| not started |" in out
    assert out.strip().splitlines()[-1] == "1 done, 1 failed, 1 not started"

    # report and plot take the runs that have metrics and list the others in one line
    table = analysis.report([run, runs / "nan", runs / "never"], rank="best_test_acc")
    assert len(table.splitlines()) == 3 and "| w |" in table
    err = capsys.readouterr().err
    assert "left out 2 run(s) without metrics yet" in err and str(runs / "never") in err
    drawn = analysis.plot([run, runs / "never"], "train_loss", "step", str(tmp_path / "steps.png"), rows="steps")
    assert len(drawn) == 1 and len(drawn[0]["x"]) == len(read_jsonl(run / "steps.jsonl"))
    assert drawn[0]["legend"].endswith("(1 seed)")                 # seeds counted as distinct seeds


def test_status_refuses_what_is_not_a_run_and_finds_a_local_sweep_by_name(tmp_path, capsys):
    from launcher.cli.main import main
    for path in ("/nonexistent/xyz", "/etc", "/etc/passwd", str(tmp_path)):
        assert main(["status", path]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"runs: {path!r} is not a run folder" in err, err
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert main(["status", str(loop)]) == 2 and "is not a run folder" in capsys.readouterr().err
    for point in ("s_seed=1", "s_seed=2"):                 # what sweep --local writes: <output>/<name>_<point>
        (tmp_path / point).mkdir()
        (tmp_path / point / "recipe.yaml").write_text("name: x\n")
    (tmp_path / "s_seed=1" / "complete.json").write_text('{"epochs": 1, "global_step": 3}')
    assert main(["status", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "s_seed=1 | interrupted |" in out and "complete.json without final_model.pt" in out   # not done
    assert "s_seed=2 | not started |" in out
    (tmp_path / "s_seed=1" / "final_model.pt").write_bytes(b"x")
    assert main(["status", str(tmp_path / "s")]) == 0 and "s_seed=1 | done | 1 | 3 |" in capsys.readouterr().out


def _count_collectives(comm, recipe: dict):
    """Train ``recipe`` in this process, counting the launcher's all-reduces of its float64 sums on the
    default group (not the gradient buckets, float32, which the noise-scale hook reduces) and the stop
    checks."""
    import torch
    import torch.distributed as dist
    from launcher import config
    from launcher.train import signals, trainer
    counts, all_reduce, poll = {"sent": 0, "checks": 0}, dist.all_reduce, signals.Agreement.poll

    def counting_all_reduce(tensor, *args, **kwargs):
        counts["sent"] += kwargs.get("group") is None and tensor.dtype == torch.float64
        return all_reduce(tensor, *args, **kwargs)

    def counting_poll(self, *args):
        stop = poll(self, *args)
        counts["checks"] += self.checked
        return stop
    dist.all_reduce, signals.Agreement.poll = counting_all_reduce, counting_poll
    try:
        done = trainer.run(config.from_dict(recipe), comm, log=lambda *a, **k: None)
    finally:
        dist.all_reduce, signals.Agreement.poll = all_reduce, poll
    return counts, done.state.global_step


def test_a_log_point_sends_no_collective_its_rows_leave_together_at_the_stop_checks(tmp_path):
    """A row every step, yet the all-reduces that carry them go out at most once per stop check (plus
    each epoch end's): a log point costs no collective. Every row is still written, in step order."""
    recipe = base_recipe(epochs=2, **{"data.size": 480, "tracking.log_every_steps": 1, "checkpoint.every_steps": 0,
                                      "eval.every_epochs": 100, "eval.full_grad_norm": False})
    recipe["output"] = str(tmp_path / "runs")
    (counts, steps), _ = run_ranks(_count_collectives, 2, recipe)
    rows = step_rows(tmp_path / "runs" / recipe["name"])
    assert [r["step"] for r in rows] == list(range(1, steps + 1)) and steps > 20
    assert counts["sent"] <= counts["checks"] + 5 * 2 < steps, (counts, steps)    # 5: an epoch end's
