"""The same updates whatever the world size and split (real gloo ranks); the smoke recipe end to end."""
import json
import math
import shutil

import torch

import pytest

from helpers import (ROOT, assert_bitwise, base_recipe, checkpoint_steps, cli, final_params, metric_rows,
                     train_ranks)
from launcher.run.tracking import WALL_FIELDS

FIELDS = {"epoch", "step", "samples", "batch", "micro_batch", "accum", "lr", "beta", "gamma", "train_loss",
          "train_acc", "test_loss", "test_acc", "grad_norm", "min_grad_norm", "wall_time", "samples_per_s",
          "grad_sq", "trace_cov", "noise_scale"}


def equivalence_recipe(**over):
    # n = 577: every stage ends with a partial batch, two of them of a single sample, so with two
    # processes rank 1 has no sample at all in those steps and must still join the reduce.
    return base_recipe(**{"precision": "fp64", "epochs": 3, "data.size": 577, "schedule.batch.initial": 32,
                          "checkpoint.every_steps": 0, **over})


def test_one_process_micro32_equals_two_processes_micro4_accum4(tmp_path):
    one = train_ranks(equivalence_recipe(name="one", **{"distributed.nproc_per_node": 1,
                                                        "distributed.max_micro_batch": 32}), tmp_path)
    two = train_ranks(equivalence_recipe(name="two", **{"distributed.nproc_per_node": 2,
                                                        "distributed.max_micro_batch": 4}), tmp_path)
    pa, pb = final_params(one), final_params(two)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-10, atol=1e-12)
    ra, rb = metric_rows(one), metric_rows(two)
    assert [(r["micro_batch"], r["accum"]) for r in ra] == [(32, 1), (32, 2), (32, 4)]
    assert [(r["micro_batch"], r["accum"]) for r in rb] == [(4, 4), (4, 8), (4, 16)]
    for x, y in zip(ra, rb):
        assert x["samples"] == y["samples"] and x["step"] == y["step"]
        assert math.isclose(x["grad_norm"], y["grad_norm"], rel_tol=1e-9)       # the full-gradient norm
        assert math.isclose(x["train_loss"], y["train_loss"], rel_tol=1e-9)
        assert math.isclose(x["test_acc"], y["test_acc"], rel_tol=1e-12)


def test_full_grad_norm_is_the_exact_mean_gradient(tmp_path):
    """Recompute ||grad f|| at the final parameters in one plain process and compare with the log."""
    from launcher import data as D
    from launcher.train import models
    run = train_ranks(equivalence_recipe(name="g", epochs=1), tmp_path)
    ds = D.load(D.Data(dataset="synthetic", size=577), torch.device("cpu"), torch.float64)
    model = models.build("small_cnn", ds.shape, 10, 0, torch.float64)
    model.load_state_dict(final_params(run))
    model.eval()
    loss = torch.nn.functional.cross_entropy(model(ds.train.images), ds.train.labels)   # mean over n
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expect = float(torch.cat([g.reshape(-1) for g in grads]).norm())
    assert math.isclose(metric_rows(run)[-1]["grad_norm"], expect, rel_tol=1e-9)


@pytest.mark.e2e
def test_smoke_recipe_runs_with_wandb_offline_and_writes_the_run_folder(tmp_path):
    proc = cli(["run", str(ROOT / "recipes" / "smoke.yaml"), "--set", "epochs=2", "--set", "schedule.interval=1",
                "--set", "output=" + str(tmp_path / "runs")], cwd=tmp_path, check=0,
               env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)})
    run = tmp_path / "runs" / "smoke"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and set(rows[0]) == FIELDS | {"world_size"}
    assert [r["batch"] for r in rows] == [8, 16]
    assert rows[1]["min_grad_norm"] == min(r["grad_norm"] for r in rows)
    assert rows[1]["samples"] == 2 * 1500 and rows[1]["test_acc"] > 0.5
    assert (run / "recipe.yaml").exists() and (run / "final_model.pt").exists()
    assert list(run.glob("wandb/offline-run-*")), "W&B offline files in the run folder"
    assert "metrics" in proc.stdout and str(run / "checkpoints") in proc.stdout
    # the demo did not choose a process count: one per visible GPU, here none, so two CPU processes
    assert "distributed.nproc_per_node auto: 2 processes, no GPU here" in proc.stdout
    assert rows[0]["world_size"] == 2
    # a second identical command finds the run complete and touches nothing
    before = (run / "metrics.jsonl").read_text()
    again = cli(["run", str(ROOT / "recipes" / "smoke.yaml"), "--set", "epochs=2", "--set", "schedule.interval=1",
                 "--set", "output=" + str(tmp_path / "runs")], cwd=tmp_path, check=0)
    assert "already complete" in again.stdout and (run / "metrics.jsonl").read_text() == before


def test_evaluation_inside_epochs_changes_no_update_and_its_rows_survive_a_resume(tmp_path):
    """eval.every_steps: rows at global steps 4, 8, ... (none at an epoch's last step, which the epoch row
    evaluates), the epoch rows and the parameters those of a run without it; a resume from a mid-epoch
    checkpoint drops only the rows written after it and writes them again."""
    over = {"epochs": 2, "data.size": 400, "checkpoint.every_steps": 5, "checkpoint.keep": 100}
    plain = train_ranks(base_recipe(name="plain", **over), tmp_path)
    mid = base_recipe(name="mid", **over, **{"eval.every_steps": 4})
    run = train_ranks(mid, tmp_path)
    assert_bitwise(final_params(run), final_params(plain))
    inside = [r for r in metric_rows(run) if r.get("mid_epoch")]
    epochs = [r for r in metric_rows(run) if not r.get("mid_epoch")]
    # the running minimum of the full-gradient norm takes every evaluation, inside epochs too
    assert epochs[-1]["min_grad_norm"] == min(r["grad_norm"] for r in metric_rows(run))
    drop = WALL_FIELDS + ("min_grad_norm",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in epochs] == metric_rows(plain, drop=drop)
    # 400 samples at batch 16 then 32: epochs of 25 and 13 steps
    assert [(r["epoch"], r["step"]) for r in inside] == [(0 if s <= 25 else 1, s) for s in range(4, 38, 4)]
    assert all(r["test_acc"] is not None and r["grad_norm"] > 0 for r in inside)
    assert [r["step"] for r in metric_rows(run)] == sorted(r["step"] for r in metric_rows(run))

    uninterrupted = metric_rows(run)
    for path in (run / "final_model.pt", run / "complete.json"):
        path.unlink()
    for step in checkpoint_steps(run):
        if step > 15:
            shutil.rmtree(run / "checkpoints" / f"step-{step:09d}")
    resumed = train_ranks(mid, tmp_path)
    assert "resumed from" in resumed.output and "step-000000015" in resumed.output
    assert metric_rows(resumed) == uninterrupted
    assert_bitwise(final_params(resumed), final_params(plain))
