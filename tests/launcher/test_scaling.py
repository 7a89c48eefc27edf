"""`report --target` and `qhm-launch scaling`: steps, SFO and seconds to a target, the trade-off fit
S = S_min (1 + B_crit / B), and throughput per world size, against values computed by hand."""
import json

import pytest
import yaml

from helpers import base_recipe
from launcher import config
from launcher.cli import analysis, scaling
from launcher.cli.main import main
from launcher.errors import UserError

S_MIN, B_CRIT = 50.0, 32.0


def fake_run(root, name, batch, seed=0, world=1, reach_at=None, steps=300, rate=1000.0, kind="constant"):
    """A run folder whose train_loss (step rows, every step) falls linearly from 2.0 and crosses 0.5
    exactly at step ``reach_at`` (never, if None); test_acc (epoch rows, 10 steps an epoch) rises."""
    folder = root / name
    folder.mkdir(parents=True)
    batch_spec = ({"kind": "constant", "size": batch} if kind == "constant"
                  else {"kind": "exponential", "initial": batch, "growth": 2})
    recipe = config.from_dict(base_recipe(name=name, seed=seed, **{"schedule.batch": batch_spec,
                                                                   "distributed.nproc_per_node": world}))
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict()))
    slope = 1.5 / (reach_at - 0.5) if reach_at else 1.0 / steps      # first at or below 0.5 at step reach_at
    step_rows = [{"step": s, "epoch": (s - 1) // 10, "samples": s * batch, "batch": batch, "world_size": world,
                  "train_loss": 2.0 - slope * s, "wall_time": s * 0.5, "samples_per_s": rate * world * (0.5 if s < 10 else 1),
                  "noise_scale": 10.0 + s} for s in range(1, steps + 1)]
    epoch_rows = [{"epoch": e, "step": 10 * (e + 1), "samples": 10 * (e + 1) * batch, "world_size": world,
                   "batch": batch, "test_acc": 0.1 * e, "wall_time": 5.0 * (e + 1), "samples_per_s": rate * world,
                   "noise_scale": 10.0 * (e + 1)}
                  for e in range(steps // 10)]
    (folder / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in step_rows))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in epoch_rows))
    return folder


def tradeoff_steps(batch):
    return round(S_MIN * (1 + B_CRIT / batch))


def test_fit_recovers_a_known_tradeoff():
    batches = [8, 16, 32, 64, 256]
    fit = scaling.fit_tradeoff(batches, [S_MIN * (1 + B_CRIT / b) for b in batches])
    assert fit == pytest.approx({"s_min": S_MIN, "b_crit": B_CRIT, "e_min": S_MIN * B_CRIT}, rel=1e-9)
    # more steps at larger batches: no trade-off curve through them
    assert scaling.fit_tradeoff([8, 16, 32], [10, 20, 40])["b_crit"] is None


def test_report_target_per_run_and_per_group(tmp_path, capsys):
    runs = [fake_run(tmp_path, "a_s0", 16, seed=0, reach_at=140), fake_run(tmp_path, "a_s1", 16, seed=1, reach_at=160),
            fake_run(tmp_path, "b_s0", 64, reach_at=None)]
    assert main(["report", *map(str, runs), "--target", "train_loss<=0.5", "--json"]) == 0
    got = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert got[str(runs[0])] | {"group": None} == {"run": str(runs[0]), "steps_to_target": 140, "sfo_to_target": 140 * 16,
                                                   "tokens_to_target": None, "seconds_to_target": 70.0,
                                                   "interpolated": False, "group": None}
    assert got[str(runs[1])]["steps_to_target"] == 160
    assert got[str(runs[2])]["steps_to_target"] is None and got[str(runs[2])]["sfo_to_target"] is None
    assert main(["report", *map(str, runs), "--target", "train_loss<=0.5"]) == 0
    table = capsys.readouterr().out
    assert "| 150 (140–160) | 2,400 (2,240–2,560) | 75 (70–80) |" in table       # the two seeds: mean (min–max)
    assert f"| {runs[2]} | not reached | not reached | not reached |" in table
    # epoch rows when the step rows do not carry the metric: test_acc 0.1 e at the end of epoch e (step 10(e+1)),
    # 0.3 at step 40 and 0.4 at step 50: 0.35 is crossed half-way, interpolated between the two evaluations
    assert main(["report", str(runs[0]), "--target", "test_acc>=0.35", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)[0]
    assert got["steps_to_target"] == pytest.approx(45) and got["interpolated"]


def test_evaluations_inside_epochs_refine_the_crossing_and_stay_out_of_epoch_curves(tmp_path, capsys):
    """eval.every_steps rows (mid_epoch) count for a target the step rows do not carry; plot and report's
    per-epoch tables never see them."""
    run = fake_run(tmp_path, "r", 16, reach_at=100)
    # test_acc 0.35 first at step 43, inside epoch 4 (its epoch row, at step 50, has 0.4)
    inside = [{"epoch": s // 10, "step": s, "samples": s * 16, "mid_epoch": True, "test_acc": 0.01 * (s - 8),
               "wall_time": s * 0.5} for s in range(41, 50)]
    with open(run / "metrics.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in inside))
    assert main(["report", str(run), "--target", "test_acc>=0.35", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)[0]
    assert (got["steps_to_target"], got["sfo_to_target"], got["seconds_to_target"]) == (43, 43 * 16, 21.5)
    loaded = analysis.load_run(run)
    assert not any(r.get("mid_epoch") for r in loaded["rows"]) and len(loaded["mid_epoch_rows"]) == 9
    assert [r["epoch"] for r in loaded["rows"]] == list(range(30))


@pytest.mark.parametrize("bad", ["test_acc", "test_acc>0.9", "test_acc>=x", "test_acc>=nan", "1x>=2"])
def test_a_malformed_target_is_one_line(tmp_path, capsys, bad):
    run = fake_run(tmp_path, "r", 16, reach_at=100)
    assert main(["report", str(run), "--target", bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--target: {bad!r} is not valid; allowed: METRIC>=VALUE" in err


def test_a_metric_no_run_carries_is_one_line(tmp_path, capsys):
    run = fake_run(tmp_path, "r", 16, reach_at=100)
    assert main(["scaling", str(run), "--target", "val_acc>=0.9"]) == 2
    assert "--target: 'val_acc' is in none of the runs' rows" in capsys.readouterr().err


def test_scaling_fits_the_critical_batch_and_draws_it(tmp_path, capsys):
    batches = [8, 16, 32, 64, 128]
    runs = [fake_run(tmp_path, f"c{b}_s{s}", b, seed=s, reach_at=tradeoff_steps(b)) for b in batches for s in (0, 1)]
    runs.append(fake_run(tmp_path, "never", 256, reach_at=None))
    runs.append(fake_run(tmp_path, "increasing", 8, reach_at=90, kind="exponential"))      # drawn, not fitted
    out = tmp_path / "fig" / "scaling.png"
    assert main(["scaling", *map(str, runs), "--target", "train_loss<=0.5", "--json", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    expect = scaling.fit_tradeoff(batches, [tradeoff_steps(b) for b in batches])      # the rounded steps' fit
    assert result["b_crit"] == pytest.approx(expect["b_crit"]) and abs(result["b_crit"] - B_CRIT) < 1
    assert result["s_min"] == pytest.approx(expect["s_min"]) and result["e_min"] == pytest.approx(expect["e_min"])
    assert [p["batch"] for p in result["points"]] == batches and all(len(p["runs"]) == 2 for p in result["points"])
    assert [p["sfo"] for p in result["points"]] == [tradeoff_steps(b) * b for b in batches]
    assert result["sfo_best_batch"] == 8 and result["not_reached"] == [str(runs[-2])]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="reached by constant-batch runs of 2 batch size"):
        scaling.scaling(runs[:4], "train_loss<=0.5")


def test_throughput_per_world_size(tmp_path, capsys):
    """Steady step rows only (the first epoch's, at half rate, left out); efficiency against world 1."""
    runs = [fake_run(tmp_path, "w1", 16, world=1, rate=1000.0, reach_at=50),
            fake_run(tmp_path, "w2", 16, world=2, rate=900.0, reach_at=50),
            fake_run(tmp_path, "w4", 16, world=4, rate=800.0, reach_at=50)]
    assert main(["scaling", *map(str, runs), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["throughput"]
    assert [(r["world_size"], r["samples_per_s_per_process"], r["efficiency"]) for r in rows] == [
        (1, 1000.0, 1.0), (2, 900.0, 0.9), (4, 800.0, 0.8)]
