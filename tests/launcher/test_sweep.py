"""Sweep points: names that say what a point is and stay put when the grid is edited; seeds counted; a grid
over resources as one job array per shape."""
import os
import signal

import pytest
import yaml

from helpers import base_recipe, write_recipe
from launcher.cli.main import main
from launcher.cluster.sweep import grid_points, point_name


def spec(grid, seeds=(0,)):
    return {"name": "g", "grid": grid, "seeds": list(seeds), "recipe": "r.yaml"}


def test_a_point_s_name_is_its_values_and_survives_grid_edits():
    before = grid_points(spec({"schedule.lr.max": [0.05, 0.1], "schedule.beta.max": [0.5]}, seeds=[0, 1]))
    names = [p["name"] for p in before]
    assert names == ["g_lr.max=0.05_beta.max=0.5_s0", "g_lr.max=0.05_beta.max=0.5_s1",
                     "g_lr.max=0.1_beta.max=0.5_s0", "g_lr.max=0.1_beta.max=0.5_s1"]
    after = grid_points(spec({"schedule.lr.max": [0.01, 0.05, 0.1], "schedule.beta.max": [0.3, 0.5]}, seeds=[0, 1, 2]))
    assert set(names) <= {p["name"] for p in after}, "adding values renames no existing point"
    group = {p["name"]: [o for o in p["overrides"] if o.startswith("tracking.wandb.group=")] for p in after}
    assert group["g_lr.max=0.05_beta.max=0.5_s2"] == ["tracking.wandb.group=g_lr.max=0.05_beta.max=0.5"]


def test_names_are_filesystem_safe_and_bounded():
    name = point_name("g", ["schedule.batch", "model"], ({"kind": "exponential", "initial": 8}, "a/b c"))
    assert name == "g_schedule.batch=exponential-initial8_model=a-b-c"
    same = point_name("g", ["schedule.batch", "model"], ({"initial": 8, "kind": "exponential"}, "a/b c"))
    assert same == name, "a mapping's key order does not change the name"
    long = point_name("g", [f"k{i}" for i in range(30)], tuple(range(30)))
    assert len(long) == 100 and "~" in long


def test_extra_overrides_reach_every_point():
    points = grid_points(spec({"seed": [1, 2]}, seeds=[None]), extra=["epochs=5"])
    assert all("epochs=5" in p["overrides"] for p in points)


def test_a_grid_over_node_counts_is_one_job_array_per_shape(tmp_path, capsys, monkeypatch):
    """slurm.nodes in the grid: one array per shape, each with its own --nodes (and --gpus-per-node), point
    names that say the shape, the command line's --gpus-per-node winning over the recipe's."""
    monkeypatch.chdir(tmp_path)
    write_recipe(tmp_path, base_recipe(epochs=1, **{"slurm.gpus_per_node": 2}), "base.yaml")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(
        {"recipe": "base.yaml", "name": "shape", "grid": {"slurm.nodes": [1, 2], "schedule.lr.max": [0.01, 0.05]}}))
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 run(s) as one job array --array=0-1%4 on 1 node(s) x 2 GPU(s)" in out
    assert "2 run(s) as one job array --array=0-1%4 on 2 node(s) x 2 GPU(s)" in out
    scripts = out.split("#!/")[1:]
    assert len(scripts) == 2
    assert "#SBATCH --nodes=1" in scripts[0] and "runs/shape_lr.max=0.05_slurm.nodes=1/recipe.yaml" in scripts[0]
    assert "#SBATCH --nodes=2" in scripts[1] and "runs/shape_lr.max=0.01_slurm.nodes=2/recipe.yaml" in scripts[1]
    assert all("#SBATCH --gpus-per-node=2" in s for s in scripts)
    assert "\nsrun " not in scripts[0] and "\nsrun " in scripts[1] and '--nnodes="$SLURM_JOB_NUM_NODES"' in scripts[1]
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing"

    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--dry-run", "--gpus-per-node", "0"]) == 0
    assert "--gpus-per-node" not in capsys.readouterr().out.split("#!/", 1)[1]
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--local"]) == 2
    assert "--local: points ask for 2 nodes; allowed: slurm.nodes 1 here" in capsys.readouterr().err


def test_a_sweep_larger_than_the_cluster_s_max_array_size_is_one_line(tmp_path, capsys, monkeypatch):
    """scontrol (here a stand-in on PATH that prints Slurm's own config line) says MaxArraySize = 3: an
    array of 4 points is refused before anything is written or submitted; 3 points would fit."""
    import os
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'MaxArraySize            = 3'\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    write_recipe(tmp_path, base_recipe(epochs=1), "base.yaml")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(
        {"recipe": "base.yaml", "name": "big", "grid": {"schedule.lr.max": [0.01, 0.02, 0.03, 0.04]}}))
    assert main(["sweep", str(tmp_path / "sweep.yaml")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and "MaxArraySize is 3" in err[0] and "allowed: at most 3 points per shape" in err[0]
    assert not (tmp_path / "runs").exists()


def test_submit_dry_run_warns_of_idle_ranks_and_of_a_stop_longer_than_the_signal_allows(tmp_path, capsys, monkeypatch):
    """What plan warns of (batches 4 and 8 on 2 nodes x 16 ranks leave most ranks idle), once each; and a
    first stage whose measured steps (an earlier segment's rows: 0.5 samples/s at batch 4, 8 s a step) make
    the stop (two steps) longer than a quarter of --signal-seconds."""
    import json
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path, base_recipe(epochs=2, **{"distributed.nproc_per_node": 16,
                                                          "schedule.batch.initial": 4}), "base.yaml")
    assert main(["submit", str(path), "--dry-run", "--nodes", "2"]) == 0
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 2 and err[0].startswith("qhm-launch: WARNING: epochs 0-0: batch 4 gives data to 4 of 32 ranks;")
    assert err[1].startswith("qhm-launch: WARNING: epochs 1-1: batch 8 gives data to 8 of 32 ranks;")
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "batch": 4, "samples_per_s": 0.5}) + "\n")
    assert main(["submit", str(path), "--dry-run", "--signal-seconds", "60"]) == 0
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 2 and err[1:] == [
                   "qhm-launch: WARNING: a preemption may take 16 s before its checkpoint starts (steps of 8 s at batch "
                   f"4 measured in {run}), more than a quarter of --signal-seconds 60; give --signal-seconds 65 or more "
                   "(or a larger first batch)"]
    assert main(["submit", str(path), "--dry-run", "--signal-seconds", "120"]) == 0
    assert len([x for x in capsys.readouterr().err.splitlines() if x.strip()]) == 1     # the idle ranks only


@pytest.fixture
def own_signal_handlers():
    """The handlers a local sweep installs, put back after the test (this is pytest's own process)."""
    from launcher import env
    names = [getattr(signal, n) for n in env.PREEMPTION_SIGNALS]
    before = {s: signal.getsignal(s) for s in names}
    yield
    for s, h in before.items():
        signal.signal(s, h)


@pytest.mark.parametrize("when", ["as the point ends", "between points"])
def test_a_local_sweep_stops_on_a_signal_at_a_point_boundary(tmp_path, capsys, own_signal_handlers, when):
    """SIGTERM right after a point's last step (the run forwarded it, then finished) or while no run is
    under way: the sweep stops before the next point with exit 75 and one line; it died of it (-15) or
    swallowed it and trained every point to exit 0."""
    from launcher import config
    from launcher.cluster import supervise
    from launcher.cluster.sweep import run_locally
    from launcher.errors import PREEMPTED
    ran = []

    def run_point(path):
        ran.append(path)
        if when == "as the point ends":
            supervise._received.append(signal.SIGTERM)      # what supervise() records as it forwards it
        else:
            os.kill(os.getpid(), signal.SIGTERM)             # nothing runs: the sweep's recorder takes it
        return 0
    recipes = [config.from_dict(base_recipe(name=f"p{i}", output=str(tmp_path))) for i in range(3)]
    points = [{"index": i, "label": f"point {i}"} for i in range(3)]
    assert run_locally(points, recipes, run_point) == PREEMPTED
    assert len(ran) == 1
    out = capsys.readouterr().out
    assert "qhm-launch: SIGTERM: sweep stopped before point 2/3; every point before it is complete" in out
