"""A smoke-size study (a sweep's grid points trained on real gloo ranks), then `plot` (mean and min-max
over seeds, bound terms) and `report`, checked against the metrics files and the qhm formulas; and
`sweep --local` end to end."""
import json

import numpy as np
import pytest
import yaml

import qhm
from helpers import base_recipe, checkpoint_steps, cli, kill_group, start, train_ranks, wait_for, write_recipe
from launcher import config
from launcher.cluster import sweep
from launcher.cli import analysis
from launcher.cli.main import main


STUDY = {"recipe": "base.yaml", "name": "st", "seeds": [0, 1],
         "grid": {"schedule.batch": [{"kind": "constant", "size": 16},
                                     {"kind": "exponential", "initial": 8, "growth": 2}]}}


def study_base():
    return base_recipe(epochs=2, **{"distributed.nproc_per_node": 1, "checkpoint.every_steps": 0})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The sweep's points, each trained as `sweep --local` would run it (its overrides, its name)."""
    folder = tmp_path_factory.mktemp("study")
    for point in sweep.grid_points(STUDY):
        train_ranks(config.apply_overrides(study_base(), point["overrides"]), folder)
    return folder, sorted((folder / "runs").glob("st_*"))


@pytest.mark.e2e
def test_sweep_local_runs_every_point_through_the_cli(tmp_path):
    write_recipe(tmp_path, base_recipe(epochs=1, **{"distributed.nproc_per_node": 1, "data.size": 320,
                                                    "checkpoint.every_steps": 1}), "base.yaml")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({**STUDY, "seeds": [0]}))
    # a SIGTERM while the first point trains: that point saves, the sweep stops (75) before the second
    import signal
    proc = start(["sweep", str(tmp_path / "sweep.yaml"), "--local"], cwd=tmp_path,
                 env={"QHM_TEST_STEP_DELAY": "0.2"})
    first = tmp_path / "runs" / "st_schedule.batch=constant-size16_s0"
    try:
        wait_for(lambda: checkpoint_steps(first), proc=proc, what="the first point's first checkpoint")
        proc.send_signal(signal.SIGTERM)
        stopped = proc.communicate(timeout=120)[0]
    finally:
        kill_group(proc)
    assert proc.returncode == 75 and "sweep stopped at point 1/2" in stopped, stopped[-3000:]
    assert (first / "preempted.json").exists() and not list((tmp_path / "runs").glob("st_*exponential*"))
    out = cli(["sweep", str(tmp_path / "sweep.yaml"), "--local"], cwd=tmp_path, check=0)
    assert "2 runs done" in out.stdout and out.stdout.count("resumed from") == 1
    assert sorted(p.parent.name for p in (tmp_path / "runs").glob("st_*/complete.json")) == [
        "st_schedule.batch=constant-size16_s0", "st_schedule.batch=exponential-growth2-initial8_s0"]


def rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_plot_draws_mean_and_band_over_seeds(study, tmp_path):
    folder, runs = study
    assert [r.name for r in runs] == ["st_schedule.batch=constant-size16_s0", "st_schedule.batch=constant-size16_s1",
                                      "st_schedule.batch=exponential-growth2-initial8_s0",
                                      "st_schedule.batch=exponential-growth2-initial8_s1"]
    out = tmp_path / "acc.png"
    drawn = analysis.plot(runs, "test_acc", "epoch", str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(drawn) == 2 and all(len(d["runs"]) == 2 for d in drawn)
    assert drawn[0]["label"] == "constant batch 16" and drawn[1]["label"] == "increasing 8→16, ×2 every epoch"
    seeds = np.array([[r["test_acc"] for r in rows(run)] for run in runs[:2]])
    np.testing.assert_allclose(drawn[0]["mean"], seeds.mean(0))
    np.testing.assert_allclose(drawn[0]["min"], seeds.min(0))
    np.testing.assert_allclose(drawn[0]["max"], seeds.max(0))
    np.testing.assert_array_equal(drawn[0]["x"], [1, 2])


def test_min_grad_norm_plot_carries_the_theorem2_terms(study, tmp_path):
    folder, runs = study
    drawn = analysis.plot(runs, "min_grad_norm", "samples", str(tmp_path / "g.pdf"))
    assert (tmp_path / "g.pdf").read_bytes()[:4] == b"%PDF"
    spec = qhm.Schedule(epochs=2, batch=qhm.BatchSchedule("exponential", 8, growth=2, interval=1),
                        lr=qhm.LRSchedule("cosine", 0.05, 0.0, epochs=2),
                        beta=qhm.BetaSchedule("step_decay", max=0.9, factor=0.5, interval=1),
                        gamma=qhm.GammaSchedule("step_decay", max=0.7, factor=0.5, interval=1))
    table = qhm.epoch_table(spec, 200)
    steps = np.cumsum(table.steps)                                   # K at the end of each epoch
    lrs = qhm.step_sequences(table).lr
    np.testing.assert_allclose(drawn[1]["bounds"]["A_K"], [1 / lrs[:k].sum() for k in steps])
    np.testing.assert_array_equal(drawn[1]["x"], [r["samples"] for r in rows(runs[2])])


def test_report_and_cli(study, tmp_path, capsys):
    folder, runs = study
    assert main(["report", *map(str, runs)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| run | epochs | final test acc") and len(table) == 2 + 4
    last = rows(runs[0])[-1]
    assert f"| st_schedule.batch=constant-size16_s0 | 2 | {last['test_acc']:.4f} |" in table[2]
    assert f"| {last['samples']} |" in table[2]
    assert main(["plot", *map(str, runs), "--metric", "nope"]) == 2
    assert "--metric: 'nope' is not valid" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2


def test_runs_that_measure_the_gradient_norm_differently_are_separate_curves():
    from launcher import config as R
    def run(seed, mode, eval_batch):
        rec = R.from_dict(base_recipe(seed=seed, **{"eval.grad_norm_mode": mode, "eval.batch_size": eval_batch}))
        return {"dir": f"{mode}-{seed}", "rows": [], "recipe": rec.to_dict()}
    curves = analysis.group([run(0, "exact", 64), run(1, "exact", 500), run(0, "paper", 64), run(1, "paper", 64)])
    assert len(curves) == 2 and [len(c["runs"]) for c in curves] == [2, 2]
    assert curves[0]["label"] == "grad norm exact" and curves[1]["label"] == "grad norm paper"


def test_world_size_separates_curves_of_throughput_but_not_of_accuracy():
    """A 1-process and a 2-process run of one recipe: one accuracy curve, two throughput curves, each
    labelled by its process count."""
    from launcher import config as R
    def run(seed, world):
        rec = R.from_dict(base_recipe(seed=seed, **{"distributed.nproc_per_node": world}))
        return {"dir": f"w{world}-{seed}", "rows": [{"epoch": 0, "world_size": world}], "recipe": rec.to_dict()}
    runs = [run(0, 1), run(1, 1), run(0, 2)]
    assert len(analysis.group(runs, "test_acc")) == 1
    curves = analysis.group(runs, "samples_per_s")
    assert [(c["label"], len(c["runs"])) for c in curves] == [("world size 1", 2), ("world size 2", 1)]


def test_batch_schedules_in_steps_or_tokens_are_labelled_in_their_unit():
    """A study of constant batches beside a batch warmup in tokens (the LM sweep): each curve says its
    batch in words, the warmup's sizes and the positions where it grows in the schedule's unit."""
    from launcher import config as R
    def run(batch, unit="token"):
        over = {"epochs": None, "train.tokens": "300K", "schedule.unit": unit, "schedule.batch": batch,
                "data.tokens_per_sample": 64}
        return {"dir": str(batch), "rows": [], "recipe": R.from_dict(base_recipe(**over)).to_dict()}
    warmup = {"kind": "steps", "points": [[0, 8], ["60K", 16], ["150K", 64]]}
    curves = analysis.group([run({"kind": "constant", "size": 8}), run(warmup),
                             run({"kind": "exponential", "initial": 8, "growth": 2}, )])
    assert [c["label"] for c in curves] == ["constant batch 8", "batch 8→16→64 at 60K, 150K tokens",
                                            "exponential from 8, ×2 every token"]
