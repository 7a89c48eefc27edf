"""FSDP2 (``fully_shard``) as an engine: the same updates as DDP (fp64 to 1e-10, fp32 to rounding), with
batch growth by accumulation, clipping, AdamW, QHAdam and QHM; sharded DCP checkpoints that resume bitwise
on the same world size and, resharded, on another; bad recipes refused in one line. Real gloo processes."""
import json
import re
import shutil

import pytest
import torch

from helpers import (assert_bitwise, checkpoint_steps, cli, close_params, final_params, killed_at_checkpoint,
                     metric_rows, rewound, train_ranks, write_recipe)
from launcher.run.files import read_jsonl
from helpers import lm_recipe

GROWTH = {"distributed.max_micro_batch": 4, "schedule.batch": {"kind": "steps", "points": [[0, 8], ["4K", 16]]},
          "train.tokens": "8K"}


@pytest.mark.parametrize("optimizer", [
    {"name": "adamw", "weight_decay": 0.1, "clip_grad_norm": 0.5},
    pytest.param({"name": "qhadam", "clip_grad_norm": 0.5}, marks=pytest.mark.slow),   # adamw's path again
    pytest.param({"name": "qhm"}, marks=pytest.mark.slow),
])
def test_fsdp_is_ddp_in_fp64(token_files, tmp_path, optimizer):
    """Sharded parameters, a reduce-scatter per step instead of an all-reduce, the clip norm over every
    rank's shards: the same training as DDP, to fp64 rounding, through batch growth with accumulation."""
    over = {**GROWTH, "precision": "fp64", "optimizer": optimizer}
    if optimizer["name"] == "qhm":
        over["schedule.lr"] = {"kind": "constant", "max": 0.3}
    ddp = train_ranks(lm_recipe(token_files, "ddp", **over), tmp_path)
    fsdp = train_ranks(lm_recipe(token_files, "fsdp", **over, **{"distributed.engine": "fsdp"}), tmp_path)
    close_params(final_params(fsdp), final_params(ddp), rtol=1e-10, atol=1e-12)
    a, b = metric_rows(ddp), metric_rows(fsdp)
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 2
    for ra, rb in zip(a, b):
        assert rb["test_loss"] == pytest.approx(ra["test_loss"], rel=1e-10)
    steps = read_jsonl(fsdp / "steps.jsonl")
    assert {(s["micro_batch"], s["accum"]) for s in steps} == {(4, 1), (4, 2)}, "8 → 16 by accumulation"
    model = torch.load(fsdp / "final_model.pt", weights_only=True)
    assert not any(type(v).__name__ == "DTensor" for v in model.values()), "the final model is unsharded"


def test_fsdp_is_ddp_in_fp32_to_rounding(token_files, tmp_path):
    ddp = train_ranks(lm_recipe(token_files, "ddp", **GROWTH), tmp_path)
    fsdp = train_ranks(lm_recipe(token_files, "fsdp", **GROWTH, **{"distributed.engine": "fsdp"}), tmp_path)
    # fp32: the reduce-scatter and the all-reduce add in other orders, and 30 AdamW steps carry that
    # rounding on; a bias near 0 ends ~1e-5 apart (the fp64 test above is the equivalence, to 1e-10)
    close_params(final_params(fsdp), final_params(ddp), rtol=1e-4, atol=5e-5)
    assert metric_rows(fsdp)[-1]["test_loss"] == pytest.approx(metric_rows(ddp)[-1]["test_loss"], rel=1e-4)


@pytest.mark.e2e
def test_a_sharded_checkpoint_resumes_bitwise_and_on_another_world_size(token_files, tmp_path):
    recipe = lm_recipe(token_files, **GROWTH, **{"distributed.engine": "fsdp", "precision": "fp64",
                                                 "checkpoint.every": "3K tokens", "checkpoint.keep": 100})
    run = train_ranks(recipe, tmp_path)
    reference = final_params(run), metric_rows(run)
    kept = checkpoint_steps(run)[0]
    saved = run / "checkpoints" / f"step-{kept:09d}"
    manifest = json.loads((saved / "manifest.json").read_text())
    shards = [name for name in manifest["files"] if name.startswith("fsdp/")]
    assert len([n for n in shards if n.endswith(".distcp")]) == 2, "each rank writes its own shard file"
    assert "fsdp/.metadata" in shards, "every DCP file is in the manifest, checksummed"
    pristine = tmp_path / "pristine"
    shutil.copytree(run, pristine)
    resumed = train_ranks(rewound(run, pristine, recipe, 2), tmp_path)
    assert f"step-{kept:09d}" in resumed.output
    assert_bitwise(final_params(resumed), reference[0])
    assert metric_rows(resumed) == reference[1]
    for world in (1, 3):          # DCP reshards the model and optimizer; the sums' order alone differs
        moved = train_ranks(rewound(run, pristine, recipe, world), tmp_path)
        assert f"step-{kept:09d}" in moved.output
        close_params(final_params(moved), reference[0], rtol=1e-10, atol=1e-12)
        assert [r["step"] for r in metric_rows(moved)] == [r["step"] for r in reference[1]]


@pytest.mark.e2e
def test_a_tampered_shard_is_not_loaded(token_files, tmp_path):
    recipe = lm_recipe(token_files, **GROWTH, **{"distributed.engine": "fsdp", "precision": "fp64",
                                                 "checkpoint.every": "3K tokens", "checkpoint.keep": 100})
    run = train_ranks(recipe, tmp_path)
    reference = final_params(run)
    for path in (run / "final_model.pt", run / "complete.json"):
        path.unlink()
    steps = checkpoint_steps(run)
    for step in steps[2:]:
        shutil.rmtree(run / "checkpoints" / f"step-{step:09d}")
    newest = run / "checkpoints" / f"step-{steps[1]:09d}"
    shard = next((newest / "fsdp").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    resumed = train_ranks(recipe, tmp_path)
    assert f"checkpoint {newest.name} is not valid" in resumed.output
    assert f"step-{steps[0]:09d}" in resumed.output
    assert_bitwise(final_params(resumed), reference)


@pytest.mark.parametrize("over, expect", [
    ({"distributed.batch_norm": "sync"}, "distributed.batch_norm: 'sync' is not valid with distributed.engine fsdp"),
    ({"eval.full_grad_norm": True}, "eval.full_grad_norm: True is not valid with distributed.engine fsdp"),
    ({"distributed.fsdp.shard": "Conv9d"}, "distributed.fsdp.shard: 'Conv9d' names no module of the model"),
    ({"distributed.fsdp.shard": "a b"}, "distributed.fsdp.shard: 'a b' is not valid; allowed: a module class name"),
    ({"distributed.fsdp.reshard_after_forward": "yes"}, "distributed.fsdp.reshard_after_forward"),
    ({"distributed.engine": "deepspeed", "distributed.zero_stage": 4},
     "distributed.zero_stage: 4 is not valid; allowed: 0 | 1 | 2 | 3"),
    ({"distributed.engine": "deepspeed", "distributed.zero_stage": 3, "distributed.batch_norm": "sync"},
     "distributed.batch_norm: 'sync' is not valid with DeepSpeed ZeRO-3 (distributed.zero_stage 3); allowed: local"),
    ({"distributed.engine": "deepspeed", "distributed.zero_stage": 3, "eval.full_grad_norm": True},
     "eval.full_grad_norm: True is not valid with DeepSpeed ZeRO-3"),
    ({"schedule.batch": {"kind": "adaptive", "initial": 8, "growth": 2, "max": 64}, "distributed.max_micro_batch": 4,
      "distributed.nproc_per_node": 1}, "measured (FSDP on one process: accumulation keeps"),
])
def test_bad_fsdp_recipes_are_one_line(token_files, tmp_path, capsys, over, expect):
    from test_bad_input import one_clean_line, run_main
    path = write_recipe(tmp_path, lm_recipe(token_files, **{"distributed.engine": "fsdp", **over}))
    one_clean_line(*run_main(["run" if "names no module" in expect else "plan", str(path)], capsys), expect)


@pytest.mark.e2e
def test_kill_9_at_the_stage_change_resumes_bitwise(token_files, tmp_path, reference_runs):
    """A real torchrun job under FSDP killed (kill -9, the whole tree) once the checkpoint at the step where
    the batch doubles (8 → 16 sequences at 4K tokens: step 32) exists; the resumed run equals one that
    never stopped, bit for bit."""
    recipe = lm_recipe(token_files, "k", **GROWTH, **{"distributed.engine": "fsdp", "checkpoint.every_steps": 8})
    reference = reference_runs(recipe)
    path, run = killed_at_checkpoint(tmp_path, recipe, 32, delay="0.1")
    newest = checkpoint_steps(run)[-1]
    done = cli(["run", str(path)], cwd=tmp_path, check=0)
    assert "resumed from" in done.stdout and f"step-{newest:09d}" in done.stdout and newest >= 32
    assert_bitwise(final_params(run), final_params(reference))
    assert metric_rows(run) == metric_rows(reference)


def _noise_rows(run) -> list[dict]:
    rows = read_jsonl(run / "steps.jsonl")
    return [{k: r[k] for k in ("step", "grad_sq", "trace_cov", "noise_scale")} for r in rows]


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_the_noise_scale_under_fsdp_is_ddps(token_files, tmp_path, world):
    """Each rank's gradient before the reduce, read in FSDP's reduce-scatter (per unit, zero-padded), and
    the reduced gradient's squares over every rank's shards: the same estimates as DDP reads per
    parameter, to fp64 rounding, every step (8 sequences, then 16 by accumulation; on 3 ranks split
    unevenly, 3 + 3 + 2, and FSDP divides fp64 gradients by 2 before its reduce-scatter); and the
    measuring leaves FSDP's updates bitwise what they are without it."""
    over = {**GROWTH, "precision": "fp64", "tracking.noise_scale": True, "distributed.nproc_per_node": world}
    ddp = train_ranks(lm_recipe(token_files, "ddp", **over), tmp_path)
    fsdp = train_ranks(lm_recipe(token_files, "fsdp", **over, **{"distributed.engine": "fsdp"}), tmp_path)
    a, b = _noise_rows(ddp), _noise_rows(fsdp)
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 20
    assert all(r["grad_sq"] is not None for r in a), "DDP measures every step"
    for ra, rb in zip(a, b):
        for key in ("grad_sq", "trace_cov"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-9, abs=1e-12), (ra, rb)
    assert sum(r["noise_scale"] is not None for r in b) >= len(b) // 2
    plain = train_ranks(lm_recipe(token_files, "plain", **{**over, "distributed.engine": "fsdp",
                                                             "tracking.noise_scale": False}), tmp_path)
    assert_bitwise(final_params(plain), final_params(fsdp))
    assert all(r["grad_sq"] is None for r in _noise_rows(plain))


def _decisions(run) -> list[tuple[int, float, int, int]]:
    """(token, noise scale, batch before, batch after) of each logged decision."""
    found = re.findall(r"token ([\d,]+): noise scale ([\d.e+-]+) [<>=]+ 1 x (\d+): batch (?:stays (\d+)|\d+ -> (\d+))",
                       run.output)
    return [(int(t.replace(",", "")), float(ns), int(b), int(stay or grown)) for t, ns, b, stay, grown in found]


def test_an_adaptive_batch_under_fsdp_decides_as_under_ddp(token_files, tmp_path):
    """schedule.batch.kind adaptive on 2 FSDP processes: every decision (every 2K tokens) is the rule applied
    to the noise scale FSDP measured (x2 when it is at least 1 x the batch), and the one DDP makes on the same
    recipe; the step rows' batches are DDP's. This data stays twice at 8, then grows to 16 and 32."""
    over = {"precision": "fp64", "tracking.noise_scale": True, "distributed.max_micro_batch": 4,
            "schedule.batch": {"kind": "adaptive", "initial": 8, "growth": 2, "max": 32, "factor": 1.0},
            "schedule.interval": "2K", "train.tokens": "10K"}
    ddp = train_ranks(lm_recipe(token_files, "ddp", **over), tmp_path)
    fsdp = train_ranks(lm_recipe(token_files, "fsdp", **over, **{"distributed.engine": "fsdp"}), tmp_path)
    made = _decisions(fsdp)
    assert len(made) == 4 and [d[0] for d in made] == [d[0] for d in _decisions(ddp)]
    for (_, measured, before, after), (_, theirs, _, their_after) in zip(made, _decisions(ddp)):
        assert after == (2 * before if measured >= before else before)
        assert after == their_after and measured == pytest.approx(theirs, rel=1e-3)   # as logged, 4 digits
    assert {d[3] for d in made} == {8, 16, 32}
    batches = [[row["batch"] for row in read_jsonl(run / "steps.jsonl")] for run in (ddp, fsdp)]
    assert batches[0] == batches[1]


def test_a_torch_whose_fsdp_takes_no_custom_reduce_scatter_says_why_the_noise_scale_is_null(token_files, monkeypatch):
    from launcher import config
    from launcher.engines import fsdp
    from launcher.train import noise
    recipe = config.from_dict(lm_recipe(token_files, **{"distributed.engine": "fsdp", "tracking.noise_scale": True}))
    assert noise.source(recipe, 2, True) == (noise.RANKS, "")
    monkeypatch.setattr(fsdp, "DefaultReduceScatter", None)
    kind, why = noise.source(recipe, 2, True)
    assert kind is None and "has no set_custom_reduce_scatter" in why


MIB = 2 ** 20


def memory_hook(base: int, per_sample: int, fit: list[int]) -> str:
    """QHM_TEST_DEVICE_MEMORY readings under which rank r's extrapolation gives ``fit[r]`` samples within 90%
    of its capacity (half a sample to spare, more than the optimizer state still to come)."""
    capacities = [int((base + per_sample * (m + 0.5)) / 0.9) for m in fit]
    return ",".join(str(x) for x in (base, per_sample, *capacities))


@pytest.mark.slow
def test_max_micro_batch_auto_under_fsdp_is_extrapolated_in_lockstep_and_changes_nothing(token_files, tmp_path):
    """Every rank runs the probe's two passes (1 and 2 samples: all-gathers and reduce-scatters, in
    lockstep), fits its peak, and the ranks agree on the smallest: rank 0 could take 6, rank 1 only 3, so 3,
    in both stages (shares 8 and 16). The passes leave nothing behind: the run equals, bit for bit, one with
    max_micro_batch 3."""
    fixed = train_ranks(lm_recipe(token_files, "fixed3", **{"distributed.engine": "fsdp",
                                                             "distributed.max_micro_batch": 3}), tmp_path)
    auto = train_ranks(lm_recipe(token_files, "auto", **{"distributed.engine": "fsdp", "distributed.max_micro_batch": "auto"}),
                       tmp_path, env={"QHM_TEST_DEVICE_MEMORY": memory_hook(200 * MIB, 10 * MIB, [6, 3])})
    # rank 0's line: 8 fit in all of its memory, 6 within 90%; rank 1's 3 is agreed
    assert "up to 8 samples fit here (of a share of 8), 3 over all ranks extrapolated from micro-batches 1 and 2" in auto.output
    assert "(of a share of 16), 3 over all ranks" in auto.output
    assert_bitwise(final_params(auto), final_params(fixed))
    splits = [[(r["micro_batch"], r["accum"]) for r in read_jsonl(run / "steps.jsonl")] for run in (auto, fixed)]
    assert splits[0] == splits[1] and set(splits[0]) == {(2, 4), (2, 8)}   # equal micro-batches under the cap 3


def test_an_out_of_memory_error_under_fsdp_auto_fails_in_one_line(token_files, tmp_path):
    """No back-off under FSDP (the others would wait in a collective): the run stops, naming the micro-batch."""
    from helpers import POOL, _train_rank
    recipe = lm_recipe(token_files, "oom", **{"distributed.engine": "fsdp", "distributed.max_micro_batch": "auto"})
    results = POOL.run(_train_rank, 2, recipe, str(tmp_path), {
        "QHM_TEST_DEVICE_MEMORY": memory_hook(200 * MIB, 10 * MIB, [4, 4]), "QHM_TEST_OOM_AT": "0:2"})
    assert [code for code, _ in results] == [1, 1]
    failed = json.loads((tmp_path / "runs" / "oom" / "failed.json").read_text())
    assert "CUDA out of memory at epoch 0 step 2 with the micro-batch of 4 that max_micro_batch auto extrapolated" \
        in failed["error"] and "allowed: distributed.max_micro_batch an integer below 4" in failed["error"]
