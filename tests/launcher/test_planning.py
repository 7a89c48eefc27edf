"""The stage table: micro x accum x world == global batch, micro grows to the cap, then accum grows."""
import json
import os
import sys

import pytest

from conftest import ROOT, base_recipe, write_recipe
from launcher import planning
from launcher.cli import main


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
        assert main(["bounds", str(path), "--json"]) == 0, path
        out = json.loads(capsys.readouterr().out)
        assert out["verdict"] and out["K"] > 0, path


def test_every_shipped_sweep_expands(capsys):
    expected = {"sweep-qhm-grid.yaml": 108, "sweep-nshb-grid.yaml": 36, "sweep-figure1.yaml": 45, "sweep.yaml": 18}
    paths = sorted((ROOT / "recipes").rglob("sweep*.yaml"))
    assert {p.name for p in paths} == set(expected)
    for path in paths:
        assert main(["sweep", str(path), "--dry-run"]) == 0, path
        out = capsys.readouterr().out
        assert f"{expected[path.name]} runs as one job array" in out, path
