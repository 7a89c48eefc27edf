"""Defects a red-team round found (reliability round 3), each a test that failed before its fix: values
edited into a checkpoint, failure lines that named the wrong step or flattened a worker's traceback,
refusals that came late or never, folders in use written into, files that are folders, links."""
import json
import os
import shutil

import pytest
import torch
import yaml

from helpers import base_recipe, checkpoint_steps, train_ranks, write_recipe
from launcher.cli.main import main
from launcher.run.checkpoint import describe
from test_bad_input import one_clean_line, run_main


def tamper(run, step, edit):
    """Edit checkpoint ``step``'s state.pt with ``edit(state)`` and recompute its hash in the manifest, as
    an attacker (or a careless hand) would: the checksum alone cannot tell."""
    folder = run / "checkpoints" / f"step-{step:09d}"
    state = torch.load(folder / "state.pt", weights_only=True)
    edit(state)
    torch.save(state, folder / "state.pt")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["state.pt"] = describe(folder / "state.pt")
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def stopped(tmp_path):
    """A run of 3 epochs (200 samples; batches 16, 32, 64) with checkpoints every 3 steps, its final ones
    removed: it resumes from global step 12."""
    recipe = base_recipe(**{"checkpoint.keep": 100})
    run = train_ranks(recipe, tmp_path)
    for path in (run / "final_model.pt", run / "complete.json"):
        path.unlink()
    for step in checkpoint_steps(run):
        if step > 12:
            shutil.rmtree(run / "checkpoints" / f"step-{step:09d}")
    return recipe, run


@pytest.mark.parametrize("field,value,expect", [
    ("epoch", 10 ** 6, "train.epoch 1000000 is not valid; allowed: an epoch of the run's plan (0 to 3)"),
    ("step", -5, "train.step -5 is not valid; allowed: an integer >= 0"),
    ("step", 40, "train.step 40 is not valid; allowed: a step of epoch 0 (0 to 12)"),
    ("samples", 999, "train.global_step/samples (12, 999) is not valid; allowed: (12, 192)"),
])
def test_a_checkpoint_with_edited_values_and_a_recomputed_hash_is_refused_naming_the_field(stopped, tmp_path,
                                                                                          field, value, expect):
    recipe, run = stopped
    tamper(run, 12, lambda state: state["train"].update({field: value}))
    with pytest.raises(AssertionError, match="exit statuses") as failed:
        train_ranks(recipe, tmp_path)
    assert "checkpoint step-000000012: " + expect in str(failed.value)
    assert not (run / "complete.json").exists() and not (run / "final_model.pt").exists()


def test_edited_adaptive_decisions_are_refused(tmp_path):
    recipe = base_recipe(**{"checkpoint.keep": 100, "schedule.batch": {"kind": "adaptive", "initial": 16}})
    run = train_ranks(recipe, tmp_path)
    (run / "final_model.pt").unlink()
    (run / "complete.json").unlink()
    last = checkpoint_steps(run)[-1]
    tamper(run, last, lambda state: state["batch_growth"].update(batches=[16, 1_000_000]))
    with pytest.raises(AssertionError, match="batch_growth.batches \\[16, 1000000\\] is not valid"):
        train_ranks(recipe, tmp_path)


@pytest.mark.parametrize("override,expect", [
    ("data.shape=[true, 8, 8]", "data.shape: [True, 8, 8] is not valid; allowed: [channels, height, width]"),
    ("schedule.batch.max=64", "schedule.batch.max: 64 is not valid with kind exponential; allowed: null"),
    ("schedule.batch.factor=2", "schedule.batch.factor: 2.0 is not valid with kind exponential"),
])
def test_keys_that_were_silently_taken_are_one_line(tmp_path, capsys, override, expect):
    extra = {"data.dataset": "synthetic"} if "shape" in override else {}
    path = write_recipe(tmp_path, base_recipe(**extra))
    one_clean_line(*run_main(["plan", str(path), "--set", override], capsys), expect)


def test_adaptive_batches_that_could_never_grow_or_outgrow_an_int_are_refused_at_plan(tmp_path, capsys):
    adaptive = {"schedule.batch": {"kind": "adaptive", "initial": 1}, "distributed.nproc_per_node": 2}
    path = write_recipe(tmp_path, base_recipe(**adaptive))
    one_clean_line(*run_main(["plan", str(path)], capsys), "schedule.batch.kind: 'adaptive' is not valid here",
                   "a batch of 1 on 2 processes")
    path = write_recipe(tmp_path, base_recipe(**{"schedule.batch": {"kind": "adaptive", "initial": 16, "growth": 1e19}}))
    one_clean_line(*run_main(["plan", str(path)], capsys), "schedule.batch.growth: 1e+19 is not valid")
    path = write_recipe(tmp_path, base_recipe(**{"schedule.batch": {"kind": "adaptive", "initial": 16},
                                                 "distributed.nproc_per_node": 1, "distributed.max_micro_batch": 64}))
    one_clean_line(*run_main(["plan", str(path)], capsys), "one process and no gradient accumulation")
    path = write_recipe(tmp_path, base_recipe(epochs=80, **{"schedule.batch": {"kind": "adaptive", "initial": 2},
                                                            "data.size": 400}))
    assert main(["plan", str(path)]) == 0                               # 80 epochs, the plan prints


def test_a_sweep_set_that_is_a_list_is_one_line(tmp_path, capsys):
    write_recipe(tmp_path, base_recipe())
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"recipe": "recipe.yaml", "name": "s", "set": [1, 2],
                                                     "grid": {"seed": [1]}}))
    one_clean_line(*run_main(["sweep", str(tmp_path / "s.yaml"), "--dry-run"], capsys),
                   "sweep.set: [1, 2] is not valid; allowed: a mapping")


def test_a_local_sweep_leaves_a_folder_in_use_untouched_and_runs_the_other_points(tmp_path, monkeypatch):
    from launcher import config
    from launcher.cluster import sweep
    from launcher.run.folder import RunFolder
    monkeypatch.chdir(tmp_path)
    recipes = [config.from_dict(base_recipe(name=f"p{i}")) for i in range(2)]
    busy = RunFolder(recipes[0].run_dir)
    busy.create()
    busy.recipe.write_text("the running run's own recipe\n")
    lock = busy.acquire_lock()                 # another run holds it
    ran = []
    try:
        points = [{"index": i, "label": f"p{i}"} for i in range(2)]
        assert sweep.run_locally(points, recipes, lambda path: ran.append(path) or 0) == 1
    finally:
        lock.release()
    assert busy.recipe.read_text() == "the running run's own recipe\n" and not list(busy.path.glob("recipe.prev-*"))
    assert ran == [str(recipes[1].folder.recipe)]


def test_a_checkpoint_manifest_of_the_wrong_shape_is_not_trusted(stopped):
    """recipe.distributed edited into a string, or world_size edited 2 -> 1 with rank-00001.pt still
    listed: the checkpoint is not valid (the one before it is used), not an AttributeError or a silent
    elastic resume."""
    from launcher.run.checkpoint import CheckpointManager
    from launcher.run.folder import RunFolder
    _, run = stopped
    folder = run / "checkpoints" / "step-000000012"
    manifest = json.loads((folder / "manifest.json").read_text())
    for edit in ({"recipe": {**manifest["recipe"], "distributed": "nope"}}, {"world_size": 1}):
        (folder / "manifest.json").write_text(json.dumps({**manifest, **edit}))
        assert CheckpointManager(RunFolder(run), log=lambda *a: None).find_latest_valid().step == 9


@pytest.mark.parametrize("name", ["recipe.yaml", "metrics.jsonl", "failed.json", ".lock"])
def test_a_run_file_that_is_a_folder_is_one_line(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path, base_recipe())
    (tmp_path / "runs" / "t" / name).mkdir(parents=True)
    one_clean_line(*run_main(["run", str(path)], capsys), f"{name} is not a plain file")


def test_a_run_folder_that_is_a_link_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path, base_recipe())
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "runs" / "t")
    one_clean_line(*run_main(["run", str(path)], capsys), "is a symbolic link")
    assert list((tmp_path / "elsewhere").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files")
def test_files_the_run_cannot_write_are_refused_before_the_first_step(stopped, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe, run = stopped
    os.chmod(run / "metrics.jsonl", 0o400)
    one_clean_line(*run_main(["run", str(write_recipe(tmp_path, recipe))], capsys), "metrics.jsonl is not writable")


def test_comment_lines_in_metrics_survive_a_resume(stopped, tmp_path):
    recipe, run = stopped
    with open(run / "metrics.jsonl", "a") as f:
        f.write("# my note: this run was restarted after the power cut\n")
    train_ranks(recipe, tmp_path)
    assert "# my note: this run was restarted after the power cut" in (run / "metrics.jsonl").read_text()


def test_status_of_a_run_killed_before_its_first_checkpoint_is_interrupted(tmp_path, capsys):
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(base_recipe()))
    (run / "steps.jsonl").write_text(json.dumps({"epoch": 0, "step": 7, "batch": 16}) + "\n")
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "interrupted" in out and "not started" not in out


def test_an_epoch_at_learning_rate_0_is_warned_of(tmp_path, capsys):
    path = write_recipe(tmp_path, base_recipe())           # cosine with min 0 over 3 epochs: epoch 2 at 0
    assert main(["plan", str(path)]) == 0
    assert "warning: epoch 2 trains at learning rate 0" in capsys.readouterr().out


def test_a_failure_while_resuming_does_not_name_a_step_not_yet_trained(stopped, tmp_path):
    """A corrupt dataset met while resuming: the line says where the worker was, not global step 13."""
    recipe, run = stopped
    from launcher.train.signals import Activity
    pace = Activity()
    pace.activity = "resuming"
    assert pace.where(12) == "while resuming"
    pace.between_steps()
    assert pace.where(12) == "after global step 12"        # a failed final save: not step 13
    pace.step_started()
    assert pace.where(12) == "at global step 13"


def test_a_data_workers_failure_is_one_line_naming_the_worker_and_the_sample():
    from launcher.data.streamed import worker_failure
    wrapped = RuntimeError("Caught SampleError in DataLoader worker process 3.\nOriginal Traceback (most recent "
                           "call last):\n  File \"x.py\", line 1, in __getitem__\nlauncher.data.streamed.SampleError: "
                           "reading sample 77 (epoch 0) raised ValueError: cannot decode sample 77\n")
    assert worker_failure(wrapped) == ("data worker 3: reading sample 77 (epoch 0) raised ValueError: cannot decode "
                                       "sample 77")
    assert worker_failure(ValueError("plain")) is None
