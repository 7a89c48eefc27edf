"""The stage table: micro x accum x world == global batch, micro grows to the cap, then accum grows."""
import dataclasses
import json
import os
import sys

import pytest

from helpers import ROOT, base_recipe, write_recipe
from launcher.train import planning
from launcher.cli.main import main


@pytest.mark.parametrize("batch,world,cap,expect", [
    (8, 2, 64, (4, 1)), (256, 2, 64, (64, 2)), (4096, 8, 64, (64, 8)), (96, 1, 64, (48, 2)),
    (32, 2, 4, (4, 4)), (8, 8, 64, (1, 1)),
])
def test_split_batch(batch, world, cap, expect):
    micro, accum = planning.split_batch(batch, world, cap)
    assert (micro, accum) == expect and micro * accum * world == batch and micro <= cap


def test_plan_json_fields_and_totals(tmp_path, capsys):
    path = write_recipe(tmp_path, base_recipe(epochs=4, **{"distributed.max_micro_batch": 16}))
    assert main(["plan", str(path), "--nproc", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["epochs"]
    assert [r["batch"] for r in rows] == [16, 32, 64, 128]
    assert [r["steps"] for r in rows] == [13, 7, 4, 2]                    # ceil(200 / b)
    for r in rows:
        assert set(r) >= {"epoch", "batch", "steps", "micro_batch", "accum", "world_size", "lr", "beta", "gamma"}
        assert r["micro_batch"] * r["accum"] * r["world_size"] == r["batch"] and r["micro_batch"] <= 16
    assert rows[3]["micro_batch"] == 16 and rows[3]["accum"] == 4
    assert out["total_steps"] == 26 and out["total_samples"] == 800
    assert rows[1]["beta"] == pytest.approx(0.45)


def test_any_world_size_runs_any_schedule_and_idle_ranks_are_warned_about(tmp_path, capsys):
    """Batch 8 on 16 ranks used to be refused; now 8 ranks carry one sample each and the plan says so."""
    path = write_recipe(tmp_path, base_recipe(**{"schedule.batch.initial": 8, "epochs": 3}))
    assert main(["plan", str(path), "--nproc", "8", "--nnodes", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["epochs"]
    assert [(r["batch"], r["micro_batch"], r["accum"], r["data_ranks"]) for r in rows] == \
        [(8, 1, 1, 8), (16, 1, 1, 16), (32, 2, 1, 16)]
    assert main(["plan", str(path), "--nproc", "8", "--nnodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "warning: epochs 0-0: batch 8 gives data to 8 of 16 ranks" not in out       # half is not "most"
    assert main(["plan", str(path), "--nproc", "8", "--nnodes", "4"]) == 0
    assert "warning: epochs 0-0: batch 8 gives data to 8 of 32 ranks" in capsys.readouterr().out


@pytest.mark.parametrize("batch,world,expect", [(10, 4, (2, 2)), (2, 4, (1, 1)), (7, 3, (3, 1)), (7, 2, (4, 1))])
def test_uneven_splits_cover_the_largest_share(batch, world, expect):
    micro, accum = planning.split_batch(batch, world, 2 if batch == 10 else 64)
    assert (micro, accum) == expect and micro * accum >= -(-batch // world)


def test_every_shipped_recipe_plans_and_bounds(capsys, monkeypatch):
    paths = [p for p in sorted((ROOT / "recipes").rglob("*.yaml")) if "sweep" not in p.name]
    assert paths
    # Recipes that name their own factories are run from their folder (their README says so); the
    # import path is restored afterwards so no other test sees the example module.
    monkeypatch.setattr("sys.path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    for path in paths:
        monkeypatch.chdir(path.parent)
        assert main(["plan", str(path)]) == 0, path
        capsys.readouterr()
        if "adaptive" in path.parts:                # decided at run time: bounds take a run folder
            assert main(["bounds", str(path), "--json"]) == 2, path
            continue
        assert main(["bounds", str(path), "--json"]) == 0, path
        out = json.loads(capsys.readouterr().out)
        assert out["verdict"] and out["K"] > 0, path


def test_every_shipped_sweep_expands(capsys):
    expected = {"paper/sweep-qhm-grid.yaml": 108, "paper/sweep-nshb-grid.yaml": 36, "paper/sweep-figure1.yaml": 45,
                "study/sweep.yaml": 18, "scaling/sweep.yaml": 14,
                "adaptive/sweep.yaml": 4, "lm/sweep.yaml": 20}
    paths = sorted((ROOT / "recipes").rglob("sweep*.yaml"))
    assert {str(p.relative_to(ROOT / "recipes")) for p in paths} == set(expected)
    for path in paths:
        assert main(["sweep", str(path), "--dry-run"]) == 0, path
        out = capsys.readouterr().out
        assert f"{expected[str(path.relative_to(ROOT / 'recipes'))]} run(s) as one job array" in out, path


PAPER = str(ROOT / "recipes" / "paper" / "resnet18-qhm-cosine-increasing.yaml")


def test_elastic_segments_give_each_stage_the_nodes_its_batch_can_use():
    """The paper's schedule (8 * 2^(m // 30), 300 epochs) on up to 4 nodes of 8, at least 64 samples per
    rank: a stage of batch b gets clamp(b // (64 * 8), 1, 4) nodes; consecutive equal counts join."""
    from launcher import config as R
    recipe = R.load(PAPER, ["distributed.min_rank_batch=64"])
    by_hand = [min(4, max(1, 8 * 2 ** (m // 30) // 512)) for m in range(300)]
    runs = [(0, 0, by_hand[0])]
    for m, nodes in enumerate(by_hand[1:], 1):
        runs[-1:] = [(runs[-1][0], m, nodes)] if nodes == runs[-1][2] else [runs[-1], (m, m, nodes)]
    segments = planning.elastic_segments(recipe, 50_000, 8, 4)
    assert [(s.first, s.last, s.nodes) for s in segments] == runs == [(0, 209, 1), (210, 239, 2), (240, 299, 4)]


def test_gpu_hours_by_hand():
    from launcher import config as R
    recipe = R.from_dict(base_recipe(epochs=2, **{"schedule.interval": 1}))        # batch 16, then 32
    epochs = planning.split_epochs(recipe, 320, 4)                                           # 20 and 10 steps
    # 4 GPUs, 10 samples/s each, a rank with fewer than 8 samples no faster: epoch 0 ceil(16/4)=4 -> 8,
    # epoch 1 ceil(32/4)=8: 20*8/10 + 10*8/10 = 24 s of wall time, 96 GPU-seconds
    gpu, wall = planning.gpu_hours(epochs, lambda m: 4, 10.0, 8)
    assert (gpu * 3600, wall * 3600) == pytest.approx((96.0, 24.0))


def test_elastic_submit_and_sweep_chain_one_job_per_segment(tmp_path, capsys):
    path = write_recipe(tmp_path, base_recipe(name="el", **{"distributed.nproc_per_node": 1,
                                                            "distributed.min_rank_batch": 16}))
    assert main(["submit", str(path), "--nodes", "2", "--elastic", "--dry-run"]) == 0
    scripts = capsys.readouterr().out.split("#!/bin/bash")[1:]
    assert len(scripts) == 2 and "#SBATCH --nodes=1" in scripts[0] and "#SBATCH --nodes=2" in scripts[1]
    assert "--until-epoch 1" in scripts[0] and "--until-epoch" not in scripts[1]
    (tmp_path / "sweep.yaml").write_text(json.dumps({"recipe": "recipe.yaml", "name": "g",
                                                     "grid": {"schedule.lr.max": [0.01, 0.05]}}))
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--nodes", "2", "--elastic", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 run(s) as one job array --array=0-1%4 on 2 node(s), in 2 chained arrays (--elastic)" in out
    # points with different batch schedules cut differently: one line, nothing submitted
    (tmp_path / "sweep.yaml").write_text(json.dumps({"recipe": "recipe.yaml", "name": "g",
                                                     "grid": {"schedule.batch.initial": [16, 32]}}))
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--nodes", "2", "--elastic", "--dry-run"]) == 2
    assert "--elastic: the sweep's points cut into different segments" in capsys.readouterr().err
    zero = write_recipe(tmp_path, base_recipe(name="z", **{"distributed.engine": "deepspeed",
                                                           "distributed.zero_stage": 2}), "z.yaml")
    assert main(["submit", str(zero), "--nodes", "2", "--elastic", "--dry-run"]) == 2
    assert "--elastic: not valid here: ZeRO stage 2 partitions the optimizer state" in capsys.readouterr().err
    adamw = write_recipe(tmp_path, base_recipe(name="za", **{"distributed.engine": "deepspeed", "distributed.zero_stage": 2,
                                                             "optimizer.name": "adamw"}), "za.yaml")
    assert main(["submit", str(adamw), "--nodes", "2", "--elastic", "--dry-run"]) == 0, "adamw is converted"


@pytest.mark.parametrize("branch", [None, {"parent": "p", "at_step": 130, "factor": 2, "length": "300K"}])
def test_a_stage_that_repeats_over_epochs_is_in_each_epoch_the_stage_of_the_walk_epoch_by_epoch(monkeypatch, branch):
    """What the trainer and the resume checks ask of a plan (the stage of a step, an epoch's steps and end, the
    stage of a global step) is the same whether whole epochs at one batch are one stage or one each."""
    import functools

    import qhm
    from launcher import config
    recipe = config.from_dict(base_recipe(epochs=None, **{
        "train.tokens": "1M", "data.tokens_per_sample": 10, "schedule.unit": "token",
        "schedule.batch": {"kind": "steps", "points": [[0, 100], ["200K", 300]]},
        "schedule.lr": {"kind": "cosine", "max": 0.1, "min": 0.001}, "distributed.max_micro_batch": 16,
        **({"branch": branch} if branch else {})}))
    fast = planning.plan(recipe, 1500, 2)
    monkeypatch.setattr(qhm, "plan_steps", functools.partial(qhm.plan_steps, repeat_epochs=False))
    slow = planning.plan(recipe, 1500, 2)
    assert len(fast.stages) * 3 < len(slow.stages)
    assert (fast.epochs, fast.total_steps, fast.total_samples) == (slow.epochs, slow.total_steps, slow.total_samples)
    for epoch in range(slow.epochs + 1):
        assert fast.steps_in(epoch) == slow.steps_in(epoch)
        for step in range(slow.steps_in(epoch)):
            a, b = fast.at(epoch, step), slow.at(epoch, step)
            assert (a.lr, a.beta, a.gamma) == pytest.approx((b.lr, b.beta, b.gamma), rel=1e-12)
            assert dataclasses.replace(a, lr=0, beta=0, gamma=0) == dataclasses.replace(b, lr=0, beta=0, gamma=0)
        if slow.steps_in(epoch):
            assert fast.end_of(epoch) == slow.end_of(epoch)
    for global_step in range(0, slow.total_steps + 2, 7):
        assert fast.stage_at(global_step).global_step == slow.stage_at(global_step).global_step
    assert planning.gpu_hours(fast.stages, lambda s: 2, 10.0, 1) == pytest.approx(
        planning.gpu_hours(slow.stages, lambda s: 2, 10.0, 1))


def test_ten_to_the_fifteen_tokens_plan_at_once_and_bounds_over_steps_is_refused_in_one_line(tmp_path, capsys):
    """200 samples of 10 tokens: 10^15 tokens are 5 x 10^11 epochs. The plan is two stages (batch 100 to
    200K tokens, then 200), so it prints; the theorems' per-step sums would need terabytes: one line."""
    path = write_recipe(tmp_path, base_recipe(epochs=None, **{
        "train.tokens": "1e15", "data.tokens_per_sample": 10, "schedule.unit": "token",
        "schedule.batch": {"kind": "steps", "points": [[0, 100], ["200K", 200]]}}))
    assert main(["plan", str(path), "--nproc", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_tokens"] == 10 ** 15 and out["epochs_trained"] == 5 * 10 ** 11
    assert [(s["global_step"], s["steps"], s.get("repeat", 1)) for s in out["stages"]] == [
        (0, 2, 100), (200, 1, 5 * 10 ** 11 - 100)]
    assert out["total_steps"] == 200 + 5 * 10 ** 11 - 100
    assert main(["bounds", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("qhm-launch: error: bounds: the run has 500,000,000,100 steps, whose sums the theorems take one by "
                   "one; allowed: at most 10,000,000 (bound a shorter run: --set train.tokens=...)")
