"""schedule.batch.kind adaptive: decisions against the rule (injected noise scales and a real run's), the
exponential schedule reproduced bitwise when it always grows, bounds at the batches used, the plan, the
refusals, and kill -9 right after a decision resumed bitwise."""
import itertools
import json
import math

import pytest
import yaml

import qhm

from helpers import (assert_bitwise, base_recipe, cli, final_params, killed_at_checkpoint,
                     metric_rows, train_ranks, write_recipe)
from launcher.cli.main import main

N = 400


def adaptive(name, epochs=4, batch=None, **over):
    return base_recipe(name=name, epochs=epochs, **{
        "data.size": N, "checkpoint.every_steps": 0, "eval.full_grad_norm": False,
        "schedule.batch": {"kind": "adaptive", "initial": 16, "growth": 2, **(batch or {})}, **over})


def decisions(run) -> list[str]:
    return [line.split("] ", 1)[1] for line in run.output.splitlines() if "noise scale" in line and "epoch " in line]


def test_decisions_follow_the_rule_on_injected_noise_scales(tmp_path):
    """16 -> (100 >= 2 x 16) 32 -> (40 < 2 x 32) stays -> (100 >= 64) 64, capped at 48 -> (1000) at its cap."""
    run = train_ranks(adaptive("inj", epochs=5, batch={"max": 48, "factor": 2.0}), tmp_path,
                      env={"QHM_TEST_NOISE_SCALES": "100,40,100,1000"})
    rows = metric_rows(run)
    assert [r["batch"] for r in rows] == [16, 32, 32, 48, 48]
    assert [r["step"] for r in rows] == list(itertools.accumulate(math.ceil(N / b) for b in [16, 32, 32, 48, 48]))
    assert decisions(run) == ["epoch 1: noise scale 100 >= 2 x 16: batch 16 -> 32",
                              "epoch 2: noise scale 40 < 2 x 32: batch stays 32",
                              "epoch 3: noise scale 100 >= 2 x 32: batch 32 -> 48",
                              "epoch 4: noise scale 1000 >= 2 x 48: batch stays 48, its cap (schedule.batch.max or "
                              "the training set)"]
    assert all("noise_scale" in r for r in rows)


def test_always_growing_is_the_exponential_schedule_bitwise_and_bounds_take_the_batches_used(tmp_path, capsys):
    grown = train_ranks(adaptive("grown"), tmp_path, env={"QHM_TEST_NOISE_SCALES": "1e9,1e9,1e9"})
    fixed = train_ranks(base_recipe(name="fixed", epochs=4, **{"data.size": N, "checkpoint.every_steps": 0,
                                                              "eval.full_grad_norm": False}), tmp_path)
    assert [r["batch"] for r in metric_rows(grown)] == [16, 32, 64, 128]
    assert_bitwise(final_params(grown), final_params(fixed))
    assert main(["bounds", str(grown), "--json"]) == 0
    used = json.loads(capsys.readouterr().out)
    from launcher import config
    expect = qhm.summary(config.from_dict(yaml.safe_load((fixed / "recipe.yaml").read_text())).schedule_spec(), N)
    assert used["batches"] == [16, 32, 64, 128] and used["K"] == expect["K"] == 25 + 13 + 7 + 4
    for theorem, term in (("theorem2", "B_K"), ("theorem2", "A_K"), ("theorem4", "B'_K")):
        assert used[theorem][term] == pytest.approx(expect[theorem][term], rel=1e-12)
    assert used["theorem2"]["corollary3"] == {}
    assert main(["bounds", str(grown)]) == 0
    assert "batches as the run used them, epochs 0-3: 16 x1, 32 x1, 64 x1, 128 x1" in capsys.readouterr().out


def test_a_real_run_grows_and_stays_by_its_measured_noise_scale(tmp_path):
    """No injection: each decision is the rule applied to the epoch row's noise scale (interval 1: the
    epoch's sums are the interval's); on 1,600 samples this problem (noise scale ~80-110, under n/10) grows,
    then stays. On 400 the same scale is n/10 or more, where training biases it low: every decision skips
    it (the row holds a lower bound), and the batch stays."""
    run = train_ranks(adaptive("real", batch={"factor": 4.0}, **{"data.size": 1600}), tmp_path)
    rows = metric_rows(run)
    for before, after in zip(rows, rows[1:]):
        ns, b = before["noise_scale"], before["batch"]
        assert after["batch"] == (2 * b if ns is not None and ns >= 4.0 * b else b), (before, after)
    batches = [r["batch"] for r in rows]
    assert any(b2 > b1 for b1, b2 in zip(batches, batches[1:])) and any(b2 == b1 for b1, b2 in zip(batches, batches[1:]))
    small = train_ranks(adaptive("small", batch={"factor": 4.0}), tmp_path)
    assert [r["batch"] for r in metric_rows(small)] == [16, 16, 16, 16]
    assert all(r["noise_scale"] is None and r["noise_scale_lower_bound"] >= N / 10 for r in metric_rows(small)[:-1])
    said = decisions(small)
    assert len(said) == 3 and all("is n/10 of the 400 training samples or more" in line and
                                  line.endswith("batch stays 16") for line in said)


def test_plan_shows_the_first_interval_and_the_range_of_steps(tmp_path, capsys):
    path = write_recipe(tmp_path, adaptive("p", epochs=6, batch={"max": 64}, **{"schedule.interval": 2}))
    assert main(["plan", str(path), "--nproc", "2"]) == 0
    out = capsys.readouterr().out
    # growing at every chance: 16, 16, 32, 32, 64, 64 -> 2 x (25 + 13 + 7); never: 6 x 25
    assert f"{2 * (25 + 13 + 7)} to {6 * 25} optimizer steps" in out
    assert "2-5     decided at run time: at the end of every 2 epoch(s), x2 when the noise scale" in out
    assert main(["plan", str(path), "--nproc", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [e["batch"] for e in plan["epochs"]] == [16, 16]
    assert plan["decided_at_run_time"] | {"rule": None} == {"first_epoch": 2, "rule": None, "fewest_steps": 90,
                                                             "most_steps": 150, "max_batch": 64}


@pytest.mark.parametrize("over,args,expect", [
    ({"distributed.nproc_per_node": 1, "distributed.max_micro_batch": 64}, ["run"],
     "schedule.batch.kind: 'adaptive' is not valid here: the noise scale it grows by cannot be measured (one process"),
    ({"tracking.noise_scale": False}, ["run"], "(tracking.noise_scale is off)"),
    ({"distributed.engine": "deepspeed"}, ["run"], "(DeepSpeed keeps its gradients"),
    ({}, ["submit", "--dry-run", "--elastic"], "--elastic: not valid with schedule.batch.kind adaptive"),
    ({}, ["plan", "--elastic"], "--elastic: not valid with schedule.batch.kind adaptive"),
    ({}, ["bounds"], "bounds: schedule.batch.kind adaptive decides its batches at run time"),
    ({"schedule.batch.max": 8}, ["plan"], "schedule.batch.max: 8 is not valid; allowed: an integer >= "),
    ({"schedule.batch.factor": -1}, ["plan"], "schedule.batch.factor: -1.0 is not valid; allowed: > 0"),
])
def test_refusals_are_one_line_before_anything_starts(tmp_path, capsys, monkeypatch, over, args, expect):
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path, base_recipe(**{"schedule.batch": {"kind": "adaptive", "initial": 16}, **over}))
    assert main([args[0], str(path), *args[1:]]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("qhm-launch: error: ") and expect in err[0], err
    assert not (tmp_path / "runs").exists()


@pytest.mark.e2e
def test_kill_9_right_after_a_decision_resumes_bitwise(tmp_path, reference_runs):
    """The decision at the end of epoch 0 is saved with that epoch's checkpoint (global step 25): killed
    there, the same command resumes with the batch chosen and ends bitwise as the uninterrupted run."""
    recipe = adaptive("kill", batch={"factor": 4.0})
    reference = reference_runs(recipe)
    path, run = killed_at_checkpoint(tmp_path, recipe, 25)
    out = cli(["run", str(path)], cwd=tmp_path, check=0).stdout
    assert "resumed from" in out and "step-000000025" in out
    assert_bitwise(final_params(run), final_params(reference))
    assert metric_rows(run) == metric_rows(reference)
