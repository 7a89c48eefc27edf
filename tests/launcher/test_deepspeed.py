"""DeepSpeed ZeRO 0/1/2 on CPU (gloo): the same updates as DDP, exact step grouping, exact resume."""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from helpers import (assert_bitwise, base_recipe, checkpoint_steps, cli, close_params, final_params, kill_group,
                      killed_at_checkpoint, metric_rows, rewound, start, train_ranks, wait_for, write_recipe)
from launcher import config as R
from launcher.run.checkpoint import describe


class Evil:
    """A pickle that runs a command when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))

# 200 samples, batches 16 -> 32 -> 64 at micro 8 on 2 ranks: accumulation 1 -> 2 -> 4, partial last batches
def ds_recipe(name, stage=None, **over):
    extra = {} if stage is None else {"distributed.engine": "deepspeed", "distributed.zero_stage": stage}
    return base_recipe(name=name, **{**extra, **over})


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    run = train_ranks(ds_recipe("ddp"), tmp_path_factory.mktemp("ddp"))
    return final_params(run), metric_rows(run)


def run_deepspeed(folder, stage, launcher="torchrun"):
    """One DeepSpeed run of the recipe at ``stage``, logging how each optimizer step was grouped."""
    path, log = write_recipe(folder, ds_recipe("ds", stage)), folder / "steps.jsonl"
    if launcher == "torchrun":
        cli(["run", str(path)], cwd=folder, check=0, env={"QHM_TEST_STEP_LOG": str(log)})
    else:            # DeepSpeed's own launcher instead: `deepspeed --num_gpus 2 --module launcher run RECIPE`
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        out = subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                              "29613", "--module", "launcher", "run", str(path)], cwd=folder, capture_output=True,
                             text=True, timeout=600, env={**env, "QHM_TEST_STEP_LOG": str(log)})
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return folder / "runs" / "ds", path, log


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    """Uninterrupted ZeRO 2: one of the engine comparisons and the kill -9 test's reference."""
    return run_deepspeed(tmp_path_factory.mktemp("zero2"), 2)


# stage 1 runs under DeepSpeed's launcher (on CPU: 2 processes), 0 and 2 under torchrun
@pytest.mark.e2e
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_matches_ddp_and_every_step_spans_the_planned_micro_batches(tmp_path, ddp_reference, zero2_run,
                                                                              stage):
    run, path, log = zero2_run if stage == 2 else run_deepspeed(tmp_path, stage, "deepspeed" if stage == 1 else "torchrun")
    params, rows = ddp_reference
    got = final_params(run)
    for k in params:                                  # float32: summation order differs, 1e-5 relative
        torch.testing.assert_close(got[k], params[k], rtol=1e-5, atol=1e-6)
    for a, b in zip(metric_rows(run), rows):
        assert a["samples"] == b["samples"] and a["step"] == b["step"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    # every optimizer step spanned exactly the planned micro-batches of rank 0; DeepSpeed's own GAS and
    # step counter follow the plan across the switches 1 -> 2 -> 4
    steps = [json.loads(x) for x in log.read_text().splitlines()]
    plan = json.loads(cli(["plan", str(path), "--json"], cwd=tmp_path, check=0).stdout)["epochs"]
    expected = []
    for e in plan:
        n = 200
        for k in range(e["steps"]):
            size = min(e["batch"], n - k * e["batch"])
            mine = min(-(-size // 2), size)                           # rank 0's slice
            expected.append((e["accum"], e["micro_batch"], -(-mine // e["micro_batch"])))
    assert [(s["gas"], s["micro"], s["micro_batches"]) for s in steps] == expected
    assert [s["global_steps"] for s in steps] == list(range(1, len(expected) + 1))


@pytest.mark.e2e
def test_kill_9_and_resume_under_zero2_is_bitwise(tmp_path, zero2_run):
    reference = final_params(zero2_run[0]), metric_rows(zero2_run[0])
    path = write_recipe(tmp_path, ds_recipe("ds", 2))
    run = tmp_path / "runs" / "ds"
    proc = start(["run", str(path)], cwd=tmp_path, env={"QHM_TEST_STEP_DELAY": "0.1"})
    wait_for(lambda: len([s for s in checkpoint_steps(run) if s >= 15]) >= 2, proc=proc,
             what="two second-stage checkpoints")
    kill_group(proc)
    newest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    manifest = json.loads((newest / "manifest.json").read_text())
    assert any(name.startswith("deepspeed/") for name in manifest["files"]), "DeepSpeed's files are checksummed"
    # a planted DeepSpeed file whose manifest entry vouches for it: loading must not run its code
    planted = "deepspeed/mp_rank_00_model_states.pt"
    assert planted in manifest["files"]
    (newest / planted).write_bytes(pickle.dumps(Evil(str(tmp_path / "PWNED"))))
    manifest["files"][planted] = describe(newest / planted)
    (newest / "manifest.json").write_text(json.dumps(manifest))
    out = cli(["run", str(path)], cwd=tmp_path, check=0)
    assert not (tmp_path / "PWNED").exists(), "DeepSpeed's files are loaded weights_only"
    assert f"checkpoint {newest.name} is not valid (fails to load" in out.stdout
    assert "resumed from" in out.stdout
    assert_bitwise(final_params(run), reference[0])
    assert metric_rows(run) == reference[1]

    # ZeRO 2 state cannot move to another world size here: one line, before any worker starts
    (run / "complete.json").unlink()
    moved = cli(["run", str(path), "--set", "distributed.nproc_per_node=1"], cwd=tmp_path)
    assert moved.returncode == 2 and moved.stderr.count("\n") == 1
    assert "ZeRO stage 2" in moved.stderr and "resume on 2 processes" in moved.stderr
    assert "universal checkpoint, which moves it, carries Adam's state only (exp_avg, exp_avg_sq), not qhm's" in moved.stderr


def test_owned_deepspeed_keys_cannot_be_overridden():
    with pytest.raises(R.RecipeError, match="distributed.deepspeed_config.train_batch_size"):
        R.from_dict(ds_recipe("x", 1, **{"distributed.deepspeed_config": {"train_batch_size": 4}}))
    with pytest.raises(R.RecipeError, match="zero_optimization.stage"):
        R.from_dict(ds_recipe("x", 1, **{"distributed.deepspeed_config": {"zero_optimization": {"stage": 3}}}))
    ok = R.from_dict(ds_recipe("x", 2, **{"distributed.deepspeed_config": {"zero_optimization":
                                                                          {"overlap_comm": False}}}))
    from launcher.engines.deepspeed import build_config
    cfg = build_config(ok, 8, 2, 2)
    assert cfg["zero_optimization"] == {"overlap_comm": False, "stage": 2, "compute_grad_norm": False}
    assert cfg["train_batch_size"] == 32
    # ZeRO-3 allocates its gradient bucket whole: never larger than the model, unless the user says so
    zero3 = R.from_dict(ds_recipe("x", 3, **UNEVEN))
    assert build_config(zero3, 8, 2, 2, parameters=3_200_000)["zero_optimization"]["reduce_bucket_size"] == 3_200_000
    assert build_config(zero3, 8, 2, 2, parameters=10**10)["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    mine = R.from_dict(ds_recipe("x", 3, **UNEVEN, **{"distributed.deepspeed_config": {"zero_optimization":
                                                                            {"reduce_bucket_size": 1000}}}))
    assert build_config(mine, 8, 2, 2, parameters=3_200_000)["zero_optimization"]["reduce_bucket_size"] == 1000
    assert "reduce_bucket_size" not in build_config(ok, 8, 2, 2, parameters=3_200_000)["zero_optimization"]


def test_deepspeed_syncs_nothing_per_micro_batch_unless_the_user_asks():
    """Its throughput timer synchronises in every forward and step; ZeRO 1/2 computes the gradient norm
    (a host sync) every step for clipping, which is off. Both off by default, the user's choice kept."""
    from launcher.engines.deepspeed import build_config
    from deepspeed.runtime.config import DeepSpeedConfig
    for stage, norm in ((0, None), (1, False), (2, False)):
        cfg = build_config(R.from_dict(ds_recipe("x", 2, **{"distributed.zero_stage": stage})), 8, 2, 1)
        assert cfg["timers"] == {"throughput": {"enabled": False, "synchronized": False}}
        assert cfg["zero_optimization"].get("compute_grad_norm") is norm
        parsed = DeepSpeedConfig(cfg)                       # what DeepSpeed itself reads from it
        assert not parsed.timers_config.enabled and not parsed.timers_config.synchronized
        assert parsed.zero_config.compute_grad_norm is (norm is None)
    mine = R.from_dict(ds_recipe("x", 2, **{"distributed.deepspeed_config": {
        "timers": {"throughput": {"enabled": True}}, "zero_optimization": {"compute_grad_norm": True}}}))
    cfg = build_config(mine, 8, 2, 2)
    assert cfg["timers"]["throughput"]["enabled"] is True and cfg["zero_optimization"]["compute_grad_norm"] is True


@pytest.mark.parametrize("config,expect", [
    ({"zero_optimization": 5}, "distributed.deepspeed_config.zero_optimization: 5 is not valid; allowed: a mapping"),
    ({"zero_optimization": {"overlap_comm": "maybe"}}, "distributed.deepspeed_config: DeepSpeed refuses it: "
                                                       "ValidationError: 1 validation error for DeepSpeedZeroConfig"),
])
def test_a_config_deepspeed_refuses_is_one_line_before_any_worker(tmp_path, monkeypatch, capsys, config, expect):
    from launcher.cli.main import main
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path, ds_recipe("bad", 1, **{"distributed.deepspeed_config": config}))
    assert main(["run", str(path)]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("qhm-launch: error: " + expect), lines
    assert not (tmp_path / "runs").exists()


UNEVEN = {"data.size": 209, "eval.full_grad_norm": False}


@pytest.mark.slow       # ZeRO-3 ends the pool's processes (see helpers.train_ranks): the next test respawns them
def test_zero3_is_zero2_in_lockstep_and_writes_the_whole_model(tmp_path, reference_runs):
    """ZeRO-3 partitions the parameters (the 1024 x 128 layer; DeepSpeed keeps those under 1e5 elements
    whole): on 209 samples the last batch of each epoch splits unevenly (1 + 0 at batch 16, 9 + 8 at 32 and
    64, micro-batch 8), so one rank runs an empty micro-step or one fewer, which under ZeRO 2 and 3 (a
    collective in every backward, and in every forward) joins the other's in lockstep: before, ZeRO-2 hung
    there. ZeRO-3's updates are ZeRO-2's, bit for bit; final_model.pt holds every parameter whole."""
    zero2 = train_ranks(ds_recipe("z2", 2, **UNEVEN), tmp_path)
    zero3 = reference_runs(ds_recipe("z3", 3, **UNEVEN))
    a, b = final_params(zero2), final_params(zero3)
    assert b["6.weight"].shape == (128, 1024), "the partitioned parameter is gathered whole"
    assert_bitwise(b, a)
    rows2, rows3 = metric_rows(zero2), metric_rows(zero3)
    assert [(r["step"], r["samples"]) for r in rows3] == [(r["step"], r["samples"]) for r in rows2] and len(rows3) == 3
    for r2, r3 in zip(rows2, rows3):
        assert r3["train_loss"] == pytest.approx(r2["train_loss"], rel=1e-6)
        assert r3["test_loss"] == pytest.approx(r2["test_loss"], rel=1e-6)


@pytest.mark.e2e
def test_kill_9_at_the_stage_change_under_zero3_resumes_bitwise(tmp_path, reference_runs):
    """The torchrun tree killed (kill -9) once the checkpoint at the end of epoch 0 (step 14, where the batch
    doubles) exists: the same command resumes from DeepSpeed's partitioned files and ends bitwise the run
    that never stopped; another process count is refused in one line (the partitions are per rank)."""
    recipe = ds_recipe("k3", 3, **UNEVEN)
    reference = reference_runs(recipe)
    path, run = killed_at_checkpoint(tmp_path, recipe, 14, delay="0.1")
    done = cli(["run", str(path)], cwd=tmp_path, check=0)
    assert "resumed from" in done.stdout and "not valid" not in done.stdout
    assert_bitwise(final_params(run), final_params(reference))
    assert metric_rows(run) == metric_rows(reference)
    (run / "complete.json").unlink()
    moved = cli(["run", str(path), "--set", "distributed.nproc_per_node=1"], cwd=tmp_path)
    assert moved.returncode == 2 and moved.stderr.count("\n") == 1
    assert "ZeRO stage 3" in moved.stderr and "resume on 2 processes" in moved.stderr and "not qhm's" in moved.stderr


# adamw (two groups: decay on matrices, none on biases), lr small enough that Adam's g / sqrt(v) does not
# magnify the sums' rounding; every checkpoint kept (the first is resumed from), 209 samples (uneven splits)
MOVABLE = {**UNEVEN, "optimizer.name": "adamw", "optimizer.weight_decay": 0.1, "schedule.lr.max": 0.003,
           "checkpoint.keep": 100}


@pytest.mark.e2e
@pytest.mark.parametrize("stage", [2, 3])
def test_a_zero_checkpoint_of_adamw_moves_to_another_world_size_through_the_universal_format(tmp_path, stage):
    """A 2-process ZeRO checkpoint (partitions per rank) resumes on 1 and on 3 processes: DeepSpeed's
    ds_to_universal converts it and each rank loads its new partitions; the run then ends where the one that
    never stopped ended (the same global batches; the sums' order alone differs). The same world size loads
    the partitions directly, bitwise; the converted copy is removed. (QHM's refusal: the kill -9 tests.)"""
    one_group = {"optimizer.weight_decay_all": True} if stage == 3 else {}   # ZeRO-3 moves one group only
    recipe = ds_recipe("mv", stage, **MOVABLE, **one_group)
    run = train_ranks(recipe, tmp_path)
    reference = final_params(run), metric_rows(run)
    kept = checkpoint_steps(run)[0]
    pristine = tmp_path / "pristine"
    shutil.copytree(run, pristine)
    resumed = train_ranks(rewound(run, pristine, recipe, 2), tmp_path)
    assert f"step-{kept:09d}" in resumed.output
    assert_bitwise(final_params(resumed), reference[0])
    for world in (1, 3):
        moved = train_ranks(rewound(run, pristine, recipe, world), tmp_path)
        assert f"step-{kept:09d} (epoch" in moved.output and "written by 2 processes" in moved.output
        assert f"partitions of 2 processes converted for {world}" in moved.output
        close_params(final_params(moved), reference[0], rtol=1e-5, atol=1e-6)   # measured: 2.4e-7 at most
        assert [r["step"] for r in metric_rows(moved)] == [r["step"] for r in reference[1]]
        assert not list((run / "checkpoints").glob(".tmp-universal-*")), "the converted copy is removed"


def test_which_deepspeed_checkpoints_move_to_another_world_size():
    """ZeRO 0 always; ZeRO 1-3 through the universal format, which carries Adam's moments only; ZeRO-3's
    universal load restores one parameter group (measured: two groups 1e-3 off within 3 steps)."""
    from launcher import engines

    def zero(stage):
        return {"engine": "deepspeed", "zero_stage": stage}

    def move_refusal(distributed, optimizer):     # a recipe's sections, as its mapping holds them
        return engines.move_refusal({"distributed": distributed, "optimizer": optimizer})
    adamw = {"name": "adamw", "weight_decay": 0.1, "weight_decay_all": False}
    assert move_refusal(zero(0), {"name": "qhm"}) is None
    for stage in (1, 2):
        assert move_refusal(zero(stage), adamw) is None
        assert "not qhm's" in move_refusal(zero(stage), {"name": "qhm"})
        assert "not qhadam's" in move_refusal(zero(stage), {**adamw, "name": "qhadam"})
    assert "restores a second parameter group wrongly" in move_refusal(zero(3), adamw)
    assert move_refusal(zero(3), {**adamw, "weight_decay_all": True}) is None
    assert move_refusal(zero(3), {**adamw, "weight_decay": 0.0}) is None
    for engine in ("ddp", "fsdp"):                  # replicated, or resharded by DCP: always
        assert move_refusal({"engine": engine, "zero_stage": 0}, {"name": "qhm"}) is None
