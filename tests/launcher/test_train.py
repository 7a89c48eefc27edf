"""The same updates whatever the world size and split (real gloo ranks); the smoke recipe end to end."""
import json
import math

import torch

import pytest

from helpers import ROOT, base_recipe, cli, final_params, metric_rows, train_ranks

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
