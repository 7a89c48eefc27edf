"""Recipes: typed, validated once, one-line errors naming key, value and what is allowed."""

import pytest

from helpers import ROOT, base_recipe, cli, write_recipe
from launcher import config as R
from launcher.cli.main import main


def test_smoke_recipe_loads_with_the_issue_schema():
    r = R.load(ROOT / "recipes" / "smoke.yaml")
    assert r.schedule.batch.initial == 8 and r.distributed.nproc_per_node == "auto"
    spec = r.schedule_spec()
    assert [spec.batch(m) for m in (0, 4, 8)] == [8, 16, 32]


@pytest.mark.parametrize("key,value,expect", [
    ("schedule.beta.max", 1.0, "schedule.beta.max: 1.0 is not valid; allowed: in [0, 1)"),
    ("schedule.gamma.max", 1.5, "schedule.gamma.max: 1.5"),
    ("schedule.beta.factor", 1.0, "schedule.beta.factor"),
    ("schedule.batch.growth", 1.0, "schedule.batch.growth: 1.0 is not valid; allowed: > 1"),
    ("schedule.batch.initial", 0, "schedule.batch.initial: 0"),
    ("schedule.lr.max", -0.1, "schedule.lr.max: -0.1 is not valid; allowed: >= 0"),
    ("schedule.lr.min", 0.5, "schedule.lr.min: 0.5 is not valid; allowed: in [0, lr.max=0.05]"),
    ("epochs", 0, "epochs: 0 is not valid; allowed: >= 1"),
    ("schedule.interval", 0, "schedule.interval: 0"),
    ("data.dataset", "mnist", "data.dataset: 'mnist' is not valid; allowed: digits | synthetic | cifar10 | cifar100"),
    ("model", "resnet50", "model: 'resnet50' is not valid; allowed: small_cnn | resnet18 | vit_tiny"),
    ("distributed.engine", "horovod", "distributed.engine: 'horovod'"),
    ("epochs", "ten", "epochs: 'ten' is not valid; allowed: an integer"),
    ("schedule.lr.max", True, "schedule.lr.max: True is not valid; allowed: a number"),
    ("data.colour", 1, "data.colour: unknown key; allowed keys here: dataset, root, download, augment, size"),
    # a key its kind does not read was silently ignored
    ("schedule.batch", {"kind": "constant", "size": 8, "points": [[0, 8], [10, 16]]},
     "schedule.batch.points: [[0, 8], [10, 16]] is not valid with kind constant; allowed: [] (it would be ignored; "
     "points is read by kind steps)"),
    ("schedule.batch", {"kind": "exponential", "initial": 8, "size": 16}, "schedule.batch.size: 16 is not valid with "
                                                                            "kind exponential"),
    ("schedule.lr", {"kind": "cosine", "max": 0.1, "decay": 5}, "schedule.lr.decay: 5 is not valid with kind cosine"),
    ("schedule.batch", {"kind": "exponential", "initial": 8, "max": 64}, "schedule.batch.max: 64 is not valid with "
                                                                          "kind exponential; allowed: null"),
])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(key, value, expect):
    with pytest.raises(R.RecipeError) as info:
        R.from_dict(base_recipe(**{key: value}))
    assert expect in str(info.value)
    assert "\n" not in str(info.value)


def test_a_length_of_many_epochs_plans_in_stages_and_is_bounded():
    """1e11 tokens of a 1,500-sample set are 6.7M epochs (275 s to plan one by one, before): schedules in
    tokens plan them as one stage that repeats; schedules in epochs (a row per epoch) refuse them in one line;
    past 1e15 is refused naming the key the user wrote (1e30 planned for 471 s, then a traceback naming
    another key)."""
    from launcher.train import planning
    r = R.from_dict(base_recipe(epochs=None, **{"train.tokens": "1e15", "data.tokens_per_sample": 10,
                                                "schedule.unit": "token", "schedule.batch.kind": "constant",
                                                "schedule.batch.size": 100, "schedule.batch.initial": None}))
    p = planning.plan(r, 1500, 2)
    assert [(s.epoch, s.steps, s.repeat) for s in p.stages] == [(0, 15, 66_666_666_666), (66_666_666_666, 10, 1)]
    assert p.total_tokens == 10 ** 15 and p.at(1_000_000, 3).global_step == 15_000_000
    assert "0-66666666665" in planning.format_table(p)
    in_epochs = R.from_dict(base_recipe(epochs=None, **{"train.tokens": "100B", "data.tokens_per_sample": 10}))
    with pytest.raises(R.RecipeError, match="train.tokens: '100B' is not valid: about 6,666,666 epochs of the 1,500 "):
        planning.plan(in_epochs, 1500, 2)
    with pytest.raises(R.RecipeError, match=r"train.tokens: 1e\+30 is not valid; allowed: at most 1e\+15 tokens"):
        R.from_dict(base_recipe(epochs=None, **{"train.tokens": 1e30, "data.tokens_per_sample": 10,
                                                "schedule.unit": "token"}))


def test_overrides_are_typed_and_validated_the_same_way():
    r = R.from_dict(base_recipe(), ["schedule.lr.max=0.2", "seed=7", "tracking.wandb.tags=[a, b]"])
    assert r.schedule.lr.max == 0.2 and r.seed == 7 and r.tracking.wandb.tags == ["a", "b"]
    with pytest.raises(R.RecipeError, match="schedule.beta.max: 2"):
        R.from_dict(base_recipe(), ["schedule.beta.max=2"])
    with pytest.raises(R.RecipeError, match="schedule.lr.maxx: unknown key"):
        R.from_dict(base_recipe(), ["schedule.lr.maxx=1"])
    with pytest.raises(R.RecipeError, match="KEY.PATH=VALUE"):
        R.from_dict(base_recipe(), ["schedule.lr.max"])


def test_trajectory_diff_names_fields_and_ignores_wandb_and_nproc():
    a = R.from_dict(base_recipe()).to_dict()
    b = R.from_dict(base_recipe(), ["tracking.wandb.mode=offline", "distributed.nproc_per_node=1",
                                    "distributed.max_micro_batch=4"]).to_dict()
    assert R.trajectory_diff(a, b) == [] and R.trajectory_hash(a) == R.trajectory_hash(b)
    c = R.from_dict(base_recipe(), ["schedule.lr.max=0.2"]).to_dict()
    assert R.trajectory_diff(a, c) == ["schedule.lr.max: 0.05 -> 0.2"]


@pytest.mark.e2e
def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path, capsys):
    path = write_recipe(tmp_path, base_recipe(**{"schedule.gamma.factor": 2}))
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qhm-launch: error: schedule.gamma.factor: 2") and err.count("\n") == 1
    # the same through the real entry point, before any worker starts
    proc = cli(["run", str(path)], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.e2e
def test_debug_shows_the_traceback(tmp_path):
    path = write_recipe(tmp_path, base_recipe(epochs=0))
    proc = cli(["--debug", "plan", str(path)], cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_not_yaml_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    assert main(["plan", str(bad)]) == 2
    assert "not valid YAML at line" in capsys.readouterr().err
    assert main(["plan", str(tmp_path / "nope.yaml")]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_missing_cifar_root_is_refused_before_workers(tmp_path, capsys):
    path = write_recipe(tmp_path, base_recipe(**{"data": {"dataset": "cifar100", "root": str(tmp_path / "none")}}))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qhm-launch: error: data.root:") and "cifar-100-python" in err
