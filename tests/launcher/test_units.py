"""Schedules in steps, samples and tokens: the batch changes inside an epoch with the data order keyed on
the samples consumed, runs shorter than an epoch, tokens counted, evaluation on a shared grid, per-step
hyper-parameters against their formulas, and exact resume at the step where the batch changes."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

import qhm
from helpers import (assert_bitwise, base_recipe, checkpoint_steps, cli, final_params, killed_at_checkpoint,
                     metric_rows, train_ranks, write_recipe)
from launcher import config, keys
from launcher.cli.main import main
from launcher.config import units
from launcher.run.files import read_jsonl
from launcher.train import planning

DIGITS = 1797                  # the size of scikit-learn's digits, the example


def doubling_at_1000(name: str, nproc: int, micro: int, **over) -> dict:
    """An epoch of 1,797 samples, batch 8 until sample 1,000 and 16 after it: 125 steps at 8, then the
    epoch's 797 samples at 16 (49 full steps and one of 13)."""
    return base_recipe(name=name, **{
        "epochs": 1, "precision": "fp64", "data": {"dataset": "synthetic", "size": DIGITS}, "schedule.unit": "sample",
        "schedule.batch": {"kind": "steps", "points": [[0, 8], ["1K", 16]]},
        "schedule.lr": {"kind": "cosine", "max": 0.05, "min": 0.005, "warmup": 200},
        "schedule.beta": {"kind": "constant", "max": 0.9}, "schedule.gamma": {"kind": "constant", "max": 0.7},
        "distributed.nproc_per_node": nproc, "distributed.max_micro_batch": micro,
        "eval.full_grad_norm": False, "checkpoint.every_steps": 0, "checkpoint.keep": 100,
        "tracking.log_every_steps": 5, **over})


@pytest.mark.parametrize("text,unit,expect", [
    (500, "step", ("step", 500)), ("2.5K", "sample", ("sample", 2500)), ("10M tokens", "step", ("token", 10 ** 7)),
    ("2B", "token", ("token", 2 * 10 ** 9)), ("300 steps", "epoch", ("step", 300)), ("1T", "token", ("token", 10 ** 12)),
    ("1e3", "sample", ("sample", 1000)), (4.0, "epoch", ("epoch", 4)), ("10Ktokens", "step", ("token", 10 ** 4)),
])
def test_amounts_as_people_write_them(text, unit, expect):
    assert units.parse("k", text, unit) == expect


def test_a_batch_change_inside_an_epoch_is_planned_by_the_samples_consumed():
    recipe = config.from_dict(doubling_at_1000("p", 2, 4))
    p = planning.plan(recipe, DIGITS, 2)
    assert [(s.epoch, s.first, s.steps, s.offset, s.batch, s.micro_batch, s.accum) for s in p.stages] == \
        [(0, 0, 125, 0, 8, 4, 1), (0, 125, 50, 1000, 16, 4, 2)]
    assert p.total_steps == 175 and p.total_samples == DIGITS and p.epochs == 1
    # every sample of the epoch exactly once, in the permutation's order: [c_k, c_k + b_k) back to back
    covered = [(s.start(k), s.start(k) + s.size(k, DIGITS)) for s in p.stages for k in range(s.first, s.end)]
    assert covered[0] == (0, 8) and covered[125] == (1000, 1016) and covered[-1] == (1784, 1797)
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
    # two epochs: the second starts over at offset 0, at batch 16 throughout
    two = planning.plan(config.from_dict(doubling_at_1000("p", 2, 4, epochs=2)), DIGITS, 2)
    assert [(s.epoch, s.first, s.steps, s.offset, s.batch) for s in two.stages][2:] == [(1, 0, 113, 0, 16)]


def test_a_batch_that_doubles_at_sample_1000_trains_alike_on_any_split(tmp_path):
    one = train_ranks(doubling_at_1000("one", 1, 16), tmp_path)
    two = train_ranks(doubling_at_1000("two", 2, 4), tmp_path)
    pa, pb = final_params(one), final_params(two)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-10, atol=1e-12)
    rows = read_jsonl(two / "steps.jsonl")
    assert {(r["batch"], r["micro_batch"], r["accum"]) for r in rows} == {(8, 4, 1), (16, 4, 2)}
    assert next(r["samples"] for r in rows if r["batch"] == 16) == 1000 + 5 * 16      # step 130: 125 x 8 + 5 x 16
    last = metric_rows(two)[-1]
    assert (last["step"], last["samples"]) == (175, DIGITS)
    assert last["train_loss"] == pytest.approx(metric_rows(one)[-1]["train_loss"], rel=1e-9)


def test_a_resume_at_the_step_where_the_batch_changes_is_bitwise(tmp_path, reference_runs):
    """checkpoint.every "1K samples": the first save is after step 125, the last at batch 8; the run
    resumed from it equals the uninterrupted one bit for bit, rows too."""
    recipe = doubling_at_1000("r", 2, 4, precision="fp32", **{"checkpoint.every": "1K samples"})
    reference = reference_runs(recipe)
    run = train_ranks(recipe, tmp_path)
    assert checkpoint_steps(run)[0] == 125
    for path in (run / "final_model.pt", run / "complete.json"):
        path.unlink()
    for step in checkpoint_steps(run)[1:]:
        shutil.rmtree(run / "checkpoints" / f"step-{step:09d}")
    resumed = train_ranks(recipe, tmp_path)
    assert "resumed from" in resumed.output and "step-000000125" in resumed.output
    assert_bitwise(final_params(resumed), final_params(reference))
    assert metric_rows(resumed) == metric_rows(reference)
    assert [r for r in read_jsonl(resumed / "steps.jsonl")] and \
        metric_rows(resumed, drop=()) and metric_rows(resumed) == metric_rows(reference)


def tokens_recipe(name="tok", **over) -> dict:
    return base_recipe(name=name, epochs=None, **{
        "data.size": 200, "data.tokens_per_sample": 64, "train": {"tokens": "10K"}, "schedule.unit": "token",
        "schedule.batch": {"kind": "constant", "size": 16}, "schedule.lr": {"kind": "constant", "max": 0.05},
        "eval.every": "2K tokens", "eval.full_grad_norm": False, "checkpoint.every_steps": 0,
        "tracking.log_every_steps": 1, **over})


def test_a_run_of_10k_tokens_stops_after_the_first_step_that_reaches_them(tmp_path):
    """16 samples x 64 tokens = 1,024 tokens a step: step 10 is the first to reach 10,000 (10,240), inside
    the first epoch (13 steps of 200 samples); evaluations at the first steps reaching 2K, 4K, 6K, 8K."""
    run = train_ranks(tokens_recipe(), tmp_path)
    rows = metric_rows(run)
    inside = [r for r in rows if r.get("mid_epoch")]
    assert [(r["step"], r["tokens"]) for r in inside] == [(2, 2048), (4, 4096), (6, 6144), (8, 8192)]
    last = rows[-1]
    assert not last.get("mid_epoch") and (last["step"], last["samples"], last["tokens"]) == (10, 160, 10240)
    steps = read_jsonl(run / "steps.jsonl")
    assert [r["tokens"] for r in steps] == [1024 * k for k in range(1, 11)]
    assert all(r["tokens_per_s"] == pytest.approx(64 * r["samples_per_s"], rel=1e-3) for r in steps)
    complete = json.loads((run / "complete.json").read_text())
    assert complete["global_step"] == 10 and (run / "final_model.pt").exists()


def test_lr_in_steps_follows_its_formula_at_every_step(tmp_path):
    """cosine over K = 40 steps with warm-up 5, and sqrt batch scaling at the change to 32 at step 20:
    each steps.jsonl row's lr is that of the step just done, by hand."""
    recipe = base_recipe(name="lr", epochs=None, **{
        "train.steps": 40, "schedule.unit": "step", "data.size": 400,
        "schedule.batch": {"kind": "steps", "points": [[0, 16], [20, 32]]},
        "schedule.lr": {"kind": "cosine", "max": 0.08, "min": 0.008, "warmup": 5, "batch_scaling": "sqrt"},
        "schedule.interval": 10, "schedule.beta": {"kind": "step_decay", "max": 0.9, "factor": 0.5},
        "eval.full_grad_norm": False, "checkpoint.every_steps": 0, "tracking.log_every_steps": 1})
    run = train_ranks(recipe, tmp_path)
    rows = read_jsonl(run / "steps.jsonl")
    assert len(rows) == 40
    for row in rows:
        k = row["step"] - 1
        batch = 16 if k < 20 else 32
        lr = 0.008 + (0.08 - 0.008) / 2 * (1 + math.cos(math.pi * k / 40))
        lr *= min(1.0, (k + 1) / 6) * math.sqrt(batch / 16)
        assert row["batch"] == batch and row["lr"] == pytest.approx(lr, rel=1e-12), row
        assert row["beta"] == pytest.approx(0.9 * 0.5 ** (k // 10), rel=1e-12)
    # 400 samples: 20 steps of 16 are the first 320, then 32s: 80 left in the epoch (3 steps, the last of 16)
    assert [(r["epoch"], r["samples"]) for r in rows][19:24] == [(0, 320), (0, 352), (0, 384), (0, 400), (1, 432)]


def test_bounds_sum_over_the_steps_as_scheduled(tmp_path, capsys):
    path = write_recipe(tmp_path, base_recipe(epochs=None, **{
        "train.steps": 300, "schedule.unit": "step", "data.size": 200,
        "schedule.batch": {"kind": "steps", "points": [[0, 8], [100, 16], [200, 32]]},
        "schedule.lr": {"kind": "cosine", "max": 0.1, "min": 0.01}, "schedule.interval": 50,
        "schedule.beta": {"kind": "step_decay", "max": 0.9, "factor": 0.5},
        "schedule.gamma": {"kind": "constant", "max": 0.7}}))
    assert main(["bounds", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    k = np.arange(300)
    lr = 0.01 + 0.09 / 2 * (1 + np.cos(np.pi * k / 300))
    b = np.where(k < 100, 8, np.where(k < 200, 16, 32))
    beta = 0.9 * 0.5 ** (k // 50)
    assert out["K"] == 300 and out["unit"] == "step" and out["theorem2"]["corollary3"] == {}
    assert out["theorem2"]["A_K"] == pytest.approx(1 / lr.sum(), rel=1e-12)
    assert out["theorem2"]["B_K"] == pytest.approx((lr ** 2 / b).sum() / lr.sum(), rel=1e-12)
    assert out["theorem2"]["C_K"] == pytest.approx((0.7 * beta).sum() / lr.sum(), rel=1e-12)
    assert out["theorem4"]["B'_K"] == pytest.approx(((1 - beta) / b).sum() / lr.sum(), rel=1e-12)


def test_plan_shows_stages_in_the_unit_with_tokens(tmp_path, capsys):
    path = write_recipe(tmp_path, tokens_recipe(**{"train": {"tokens": "50K"},
                                                   "schedule.batch": {"kind": "steps", "points": [[0, 16], ["20K", 32]]}}))
    assert main(["plan", str(path), "--nproc", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["unit"] == "token" and out["tokens_per_sample"] == 64
    # 1,024 tokens a step: epoch 0 is 13 steps (200 samples, 12,800 tokens), then 8 more reach 20,000
    # (20,992), and batches of 32 follow from the next step, inside epoch 1
    stages = [(s["epoch"], s["global_step"], s["steps"], s["offset"], s["batch"]) for s in out["stages"]]
    assert stages[:3] == [(0, 0, 13, 0, 16), (1, 13, 8, 0, 16), (1, 21, 3, 128, 32)]
    assert out["total_tokens"] >= 50_000 and out["total_tokens"] - 32 * 64 < 50_000
    assert main(["plan", str(path), "--nproc", "2"]) == 0
    text = capsys.readouterr().out
    assert "tokens (64 per sample)" in text and "schedules in tokens" in text


def test_adaptive_decides_every_interval_inside_epochs(tmp_path):
    """unit step, interval 10: a decision at steps 10, 20, 30 (inside 200-sample epochs of 13, 7, 4
    steps); always growing, it trains as the exponential schedule in steps does, bit for bit."""
    over = {"train.steps": 40, "schedule.unit": "step", "schedule.interval": 10, "data.size": 400,
            "eval.full_grad_norm": False, "checkpoint.every_steps": 0, "tracking.log_every_steps": 1,
            "schedule.lr": {"kind": "constant", "max": 0.05}}
    grown = train_ranks(base_recipe(name="grown", epochs=None, **over, **{
        "schedule.batch": {"kind": "adaptive", "initial": 8, "growth": 2}}), tmp_path,
        env={"QHM_TEST_NOISE_SCALES": "1e9,1e9,1e9"})
    fixed = train_ranks(base_recipe(name="fixed", epochs=None, **over, **{
        "schedule.batch": {"kind": "exponential", "initial": 8, "growth": 2}}), tmp_path)
    assert [r["batch"] for r in read_jsonl(grown / "steps.jsonl")] == [8] * 10 + [16] * 10 + [32] * 10 + [64] * 10
    assert_bitwise(final_params(grown), final_params(fixed))
    said = [line.split("] ", 1)[1] for line in grown.output.splitlines() if "noise scale" in line]
    assert said[:3] == ["step 10: noise scale 1e+09 >= 1 x 8: batch 8 -> 16", "step 20: noise scale 1e+09 >= 1 x 16: "
                        "batch 16 -> 32", "step 30: noise scale 1e+09 >= 1 x 32: batch 32 -> 64"]


def test_a_target_crossing_is_interpolated_between_two_evaluations(tmp_path):
    from launcher.cli import scaling
    run = {"dir": tmp_path, "step_rows": [], "mid_epoch_rows": [], "rows": [
        {"epoch": 0, "step": 10, "samples": 160, "tokens": 2000, "wall_time": 1.0, "test_loss": 1.0},
        {"epoch": 0, "step": 20, "samples": 320, "tokens": 4000, "wall_time": 3.0, "test_loss": 0.5},
        {"epoch": 1, "step": 30, "samples": 480, "tokens": 6000, "wall_time": 5.0, "test_loss": 0.2}]}
    hit = scaling.crossing(run, scaling.parse_target("test_loss<=0.6"))
    # 1.0 -> 0.5 crosses 0.6 at 4/5 of the way from step 10 to 20
    assert hit["interpolated"] and hit["steps_to_target"] == pytest.approx(18.0)
    assert hit["sfo_to_target"] == pytest.approx(288.0) and hit["tokens_to_target"] == pytest.approx(3600.0)
    assert hit["seconds_to_target"] == pytest.approx(2.6)
    first = scaling.crossing(run, scaling.parse_target("test_loss<=1.0"))      # reached at the first row
    assert not first["interpolated"] and first["steps_to_target"] == 10


BAD = [
    ("schedule.unit=weeks", "schedule.unit: 'weeks' is not valid; allowed: epoch | step | sample | token"),
    ("schedule.interval=0.5", "schedule.interval: 0.5 is not valid; allowed: a whole number"),
    ("schedule.interval=-3", "schedule.interval: -3 is not valid"),
    ("train.steps=0", "train.steps: 0 is not valid; allowed: a whole number"),
    ("train.steps=100", "epochs: 3 is not valid with train.steps; allowed: one duration"),
    ("train.tokens=10m", "train.tokens: '10m' is not valid; 'm' is no suffix"),
    ("schedule.lr.batch_scaling=cubic", "schedule.lr.batch_scaling: 'cubic' is not valid; allowed: none | sqrt | linear"),
    ("schedule.unit=token", "schedule.unit: counted in tokens, and data.tokens_per_sample is not set"),
    ("eval.every=5", "eval.every: 5 is not valid; allowed: a count with its unit"),
    ("checkpoint.every=10 stepz", "checkpoint.every: '10 stepz' is not valid; 'stepz' is no unit"),
]


@pytest.mark.parametrize("override,expect", BAD, ids=[b[0] for b in BAD])
def test_bad_values_are_one_line(tmp_path, capsys, override, expect):
    from test_bad_input import one_clean_line, run_main
    path = write_recipe(tmp_path, base_recipe())
    one_clean_line(*run_main(["plan", str(path), "--set", override], capsys), expect)


BAD_SCHEDULES = [
    ({"train.steps": 0}, "train.steps: 0 is not valid; allowed: a whole number"),
    ({"train.steps": 100, "train.samples": "1K"}, "train.samples: '1K' is not valid with train.steps"),
    ({"schedule.batch": {"kind": "steps", "points": [[0, 8], [100, 16], [50, 32]]}},
     "schedule.batch.points[2]: (50, 32) is not valid; allowed: a position after the previous point's (100)"),
    ({"schedule.batch": {"kind": "steps", "points": [[5, 8]]}}, "schedule.batch.points[0]: (5, 8) is not valid; "
                                                              "allowed: at position 0"),
    ({"schedule.batch": {"kind": "steps", "points": [[0, 8], ["1K samples", 16], ["2K tokens", 32]]}},
     "schedule.batch.points: [[0, 8], ['1K samples', 16], ['2K tokens', 32]] mixes units (sample, token)"),
    ({"schedule.batch": {"kind": "steps", "points": [[0, 8], ["1K samples", 16]]}},
     "schedule.batch.points[1]: '1K samples' is in samples, the schedule in steps"),
    ({"schedule.batch": {"kind": "steps", "points": [[0, 8], [10, 12.5]]}},
     "schedule.batch.points[1]: [10, 12.5] is not valid; allowed: [position, batch] with an integer batch >= 1"),
    ({"schedule.batch": {"kind": "steps"}}, "schedule.batch.points: missing"),
    ({"schedule.lr": {"kind": "cosine", "warmup": 500}}, "schedule.lr.warmup: 500 is not valid; allowed: an integer in "
                                                         "[0, the run's 100 steps)"),
    ({"schedule.batch": {"kind": "steps", "points": [[0, 8], [50, 512]]}},
     "schedule.batch: the batch reaches 512 at step 50, more than the 200 training samples"),
    ({"schedule.batch": {"kind": "adaptive", "initial": 8}, "train": {"samples": "1K"},
      "schedule.lr": {"kind": "cosine"}}, "schedule.lr.kind: 'cosine' is not valid with an adaptive batch in steps"),
]


@pytest.mark.parametrize("over,expect", BAD_SCHEDULES, ids=[b[1][:40] for b in BAD_SCHEDULES])
def test_bad_schedules_are_one_line_before_any_worker(tmp_path, capsys, over, expect):
    from test_bad_input import one_clean_line, run_main
    recipe = base_recipe(epochs=None, **{"train.steps": 100, "schedule.unit": "step",
                                         "schedule.batch": {"kind": "constant", "size": 16}})
    for key, value in over.items():
        keys.set_(recipe, key, value)
    if "train" in over and isinstance(over["train"], dict):
        recipe["train"] = over["train"]
    path = write_recipe(tmp_path, recipe)
    one_clean_line(*run_main(["plan", str(path), "--nproc", "2"], capsys), expect)


def test_an_elastic_chain_in_steps_cuts_between_global_steps(tmp_path, capsys):
    path = write_recipe(tmp_path, base_recipe(name="el", epochs=None, **{
        "train.steps": 60, "schedule.unit": "step", "data.size": 400, "distributed.nproc_per_node": 1,
        "distributed.min_rank_batch": 16, "schedule.batch": {"kind": "steps", "points": [[0, 16], [25, 32]]}}))
    assert main(["submit", str(path), "--nodes", "2", "--elastic", "--dry-run"]) == 0
    scripts = capsys.readouterr().out.split("#!/bin/bash")[1:]
    assert len(scripts) == 2 and "--until-step 25" in scripts[0] and "--until-step" not in scripts[1]
    assert "#SBATCH --nodes=1" in scripts[0] and "#SBATCH --nodes=2" in scripts[1]


def test_a_segment_until_a_global_step_stops_there_and_the_next_continues_bitwise(tmp_path):
    recipe = base_recipe(name="seg", epochs=None, **{
        "train.steps": 30, "schedule.unit": "step", "data.size": 400, "checkpoint.every_steps": 0,
        "schedule.batch": {"kind": "steps", "points": [[0, 16], [17, 32]]}, "eval.full_grad_norm": False})
    whole = train_ranks(dict(recipe, name="whole"), tmp_path)
    first = train_ranks(recipe, tmp_path, env={"QHM_UNTIL_STEP": "17"})
    assert checkpoint_steps(first) == [17] and not (first / "final_model.pt").exists()
    assert "segment done: steps up to 17 saved" in first.output
    rest = train_ranks(recipe, tmp_path)
    assert_bitwise(final_params(rest), final_params(whole))
    assert metric_rows(rest) == metric_rows(whole)


@pytest.mark.e2e
def test_kill_9_at_the_step_where_the_batch_changes_resumes_bitwise(tmp_path, reference_runs):
    recipe = doubling_at_1000("k", 2, 4, precision="fp32", **{"checkpoint.every": "1K samples"})
    reference = reference_runs(recipe)
    path, run = killed_at_checkpoint(tmp_path, recipe, 125, delay="0.05")
    done = cli(["run", str(path)], cwd=tmp_path, check=0)
    assert "resumed from" in done.stdout
    assert_bitwise(final_params(run), final_params(reference))
    assert metric_rows(run) == metric_rows(reference)


def test_the_schedules_in_qhm_against_their_formulas():
    lr = qhm.LRSchedule("cosine", 0.5, 0.1, unit="step", length=1000)
    assert lr(0) == pytest.approx(0.5) and lr(500) == pytest.approx(0.3) and lr(1000) == pytest.approx(0.1)
    wsd = qhm.LRSchedule("wsd", 0.4, 0.04, unit="token", length=10_000, warmup=999, decay=2000)
    assert wsd(0) == pytest.approx(0.4 / 1000) and wsd(999) == pytest.approx(0.4) and wsd(8000) == pytest.approx(0.4)
    assert wsd(9000) == pytest.approx(0.04 + 0.36 * 0.5) and wsd(10_000) == pytest.approx(0.04)
    b = qhm.BatchSchedule("steps", points=((0, 256), (2 * 10 ** 9, 512), (4 * 10 ** 9, 1024)))
    assert [b(u) for u in (0, 1999999999, 2 * 10 ** 9, 5 * 10 ** 9)] == [256, 256, 512, 1024]
    assert b.next_change(0) == 2 * 10 ** 9 and b.next_change(4 * 10 ** 9) is None
    e = qhm.BatchSchedule("exponential", 8, growth=2, interval=500)
    assert [e(u) for u in (0, 499, 500, 1700)] == [8, 8, 16, 64] and e.next_change(700) == 1000


def test_a_recipe_written_before_the_units_keeps_its_trajectory_hash():
    """complete.json and every manifest hold the trajectory hash: a recipe.yaml written before these keys
    existed (none of them in it) hashes as the same recipe resolved today, so a run completed or
    checkpointed then is still complete, and resumes, now; a key set away from its default changes it."""
    full = config.from_dict(base_recipe()).to_dict()
    before = json.loads(json.dumps(full))
    for section, key in (("schedule", "unit"), ("data", "tokens_per_sample")):
        del before[section][key]
    del before["train"], before["schedule"]["batch"]["points"]
    del before["schedule"]["lr"]["decay"], before["schedule"]["lr"]["batch_scaling"]
    assert config.trajectory_hash(before) == config.trajectory_hash(full)
    assert config.trajectory_diff(before, full) == []
    other = config.from_dict(base_recipe(**{"schedule.lr.batch_scaling": "sqrt"})).to_dict()
    assert config.trajectory_hash(other) != config.trajectory_hash(full)
    assert config.trajectory_diff(full, other) == ["schedule.lr.batch_scaling: 'none' -> 'sqrt'"]


def test_scaling_and_plot_count_tokens_where_the_runs_did(tmp_path, capsys):
    from test_scaling import fake_run
    runs = [fake_run(tmp_path, f"b{b}", b, reach_at=round(50 * (1 + 32 / b))) for b in (8, 16, 32, 64)]
    for run in runs:                          # as a run with 100 tokens per sample writes them
        for name in ("metrics.jsonl", "steps.jsonl"):
            rows = read_jsonl(run / name)
            (run / name).write_text("".join(json.dumps({**r, "tokens": 100 * r["samples"]}) + "\n" for r in rows))
    out = tmp_path / "s.png"
    assert main(["scaling", *map(str, runs), "--target", "train_loss<=0.5", "--x", "tokens", "--out", str(out),
                 "--json"]) == 0
    points = json.loads(capsys.readouterr().out)["points"]
    assert all(p["tokens"] == pytest.approx(100 * p["sfo"]) for p in points) and out.exists()
    assert main(["plot", *map(str, runs), "--metric", "train_loss", "--rows", "steps", "--x", "tokens",
                 "--out", str(out)]) == 0
    plain = fake_run(tmp_path, "plain", 16, reach_at=50)
    capsys.readouterr()
    assert main(["plot", str(plain), "--metric", "train_loss", "--x", "tokens", "--out", str(out)]) == 2
    assert "--x: 'tokens' is not valid for these runs: none counted tokens" in capsys.readouterr().err
    assert main(["scaling", str(plain), "--x", "words"]) == 2
    assert "--x: 'words' is not valid; allowed: samples | tokens | steps" in capsys.readouterr().err


def test_a_checkpoint_inside_a_stage_resumes_on_another_world_size(tmp_path):
    """Saved by 2 processes at global step 140 (inside the batch-16 stage of epoch 0), resumed on 1: the
    order is keyed on the samples consumed, so the run ends as an uninterrupted 1-process run (fp64)."""
    over = {"checkpoint.every": "140 steps", "checkpoint.keep": 100}
    whole = train_ranks(doubling_at_1000("whole", 1, 16, **over), tmp_path)
    two = train_ranks(doubling_at_1000("el", 2, 4, **over), tmp_path, env={"QHM_UNTIL_STEP": "140"})
    assert checkpoint_steps(two) == [140]
    one = train_ranks(doubling_at_1000("el", 1, 16, **over), tmp_path)
    assert "written by 2 processes" in one.output
    pa, pb = final_params(one), final_params(whole)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-10, atol=1e-12)
