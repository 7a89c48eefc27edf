"""Sweep points: names that say what a point is and stay put when the grid is edited; seeds counted."""
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
