"""The run folder: one place names every file; one run per folder (a lock the kernel releases on death)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import base_recipe
from launcher.errors import UserError
from launcher.run.folder import RunFolder


def test_every_file_is_named_by_the_run_folder(tmp_path):
    f = RunFolder(tmp_path / "r")
    names = {f.recipe: "recipe.yaml", f.metrics: "metrics.jsonl", f.steps: "steps.jsonl", f.checkpoints: "checkpoints",
             f.final_model: "final_model.pt", f.complete: "complete.json", f.preempted: "preempted.json",
             f.failed: "failed.json", f.preempt_request: "preempt.request", f.lock: ".lock",
             f.wandb_id: "wandb_id", f.wandb: "wandb", f.slurm: "slurm"}
    for path, name in names.items():
        assert path == tmp_path / "r" / name
    (tmp_path / "r").mkdir()
    assert f.next_previous_recipe().name == "recipe.prev-1.yaml"
    (tmp_path / "r" / "recipe.prev-1.yaml").write_text("x")
    assert f.next_previous_recipe().name == "recipe.prev-2.yaml"


def test_clear_stale_removes_markers_and_old_pid_files(tmp_path):
    f = RunFolder(tmp_path)
    for p in (f.preempted, f.preempt_request, f.failed):
        p.write_text("{}")
    (tmp_path / ".pids").mkdir()
    (tmp_path / ".pids" / "host-0.pid").write_text("1")
    f.write_marker(f.complete, {"a": 1})
    f.clear_stale()
    assert not any(p.exists() for p in (f.preempted, f.preempt_request, f.failed, tmp_path / ".pids"))
    assert f.read_json(f.complete) == {"a": 1}


def test_a_failure_written_since_this_process_started_is_not_stale(tmp_path):
    """Another rank of the same run may fail before rank 0 clears stale markers: its line stays."""
    import time
    f = RunFolder(tmp_path)
    f.failed.write_text("{}")
    os.utime(f.failed, (time.time() - 60, time.time() - 60))
    f.clear_stale(started=time.time() - 30)
    assert not f.failed.exists()
    f.failed.write_text("{}")
    f.clear_stale(started=time.time() - 30)
    assert f.failed.exists()


def test_one_run_per_folder_and_the_lock_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from launcher.run.folder import RunFolder; "
        f"RunFolder({str(tmp_path)!r}).acquire_lock(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as info:
            RunFolder(tmp_path).acquire_lock()
        assert f"in use by another run (pid {holder.pid} on " in str(info.value) and "\n" not in str(info.value)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    time.sleep(0.1)
    lock = RunFolder(tmp_path).acquire_lock()          # the kernel released it with the dead holder
    lock.release()


@pytest.mark.parametrize("planted", [".lock", "metrics.jsonl", "steps.jsonl", "checkpoints"])
def test_a_symbolic_link_in_a_run_folder_is_refused_and_its_target_untouched(tmp_path, planted):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    folder = RunFolder(tmp_path / "runs" / "x")
    folder.path.mkdir(parents=True)
    (folder.path / planted).symlink_to(victim)
    with pytest.raises(UserError, match=rf"^run folder .* holds a symbolic link '{planted}' \(to '{victim}'\); "
                                        "allowed: a run folder of plain files"):
        folder.acquire_lock()
    assert victim.read_text() == "precious\n"


def test_no_file_is_written_through_a_link_planted_after_the_check(tmp_path):
    from launcher.run.files import append_line, atomic_write
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(OSError):
        append_line(tmp_path / "metrics.jsonl", "{}")
    (tmp_path / f".recipe.yaml.tmp-{os.getpid()}").symlink_to(victim)      # a guessed temporary name
    with pytest.raises(OSError):
        atomic_write(tmp_path / "recipe.yaml", "x")
    assert victim.read_text() == "precious\n"


def test_the_run_folder_and_its_files_are_the_owner_s_alone(tmp_path):
    from launcher.run.files import append_line
    folder = RunFolder(tmp_path / "runs" / "x")
    folder.write_recipe("seed: 1\n")
    folder.write_marker(folder.complete, {"ok": True})
    append_line(folder.metrics, "{}")
    lock = folder.acquire_lock()
    lock.release()
    assert oct(folder.path.stat().st_mode & 0o777) == oct(0o700)
    for path in (folder.recipe, folder.complete, folder.metrics, folder.lock):
        assert oct(path.stat().st_mode & 0o777) == oct(0o600), path


def test_a_finished_runs_results_are_never_trained_over_by_another_recipe(tmp_path, monkeypatch):
    """A run completed, its checkpoints deleted to free disk, then run again with another seed: refused in
    one line naming what is there; the same recipe may start again (it writes the same results)."""
    from launcher import config
    from launcher.train.preflight import check_resume
    from launcher.errors import UserError
    monkeypatch.chdir(tmp_path)
    finished = config.from_dict(base_recipe(name="done"))
    folder = finished.folder
    folder.create()
    folder.write_recipe(config.dump(finished))
    (folder.path / "final_model.pt").write_bytes(b"weights")
    folder.metrics.write_text('{"epoch": 0, "step": 10}\n')
    folder.complete.write_text(json.dumps({"recipe_hash": config.trajectory_hash(finished.to_dict())}))
    before = {p.name: p.read_bytes() for p in folder.path.iterdir() if p.is_file()}
    other = config.from_dict(base_recipe(name="done", seed=7))
    with pytest.raises(UserError, match="holds another recipe's results .*complete.json, final_model.pt, metrics.jsonl"):
        check_resume(other, False, 1)
    assert {p.name: p.read_bytes() for p in folder.path.iterdir() if p.is_file()} == before
    check_resume(finished, False, 1)                     # the same recipe: nothing to refuse
    folder.complete.unlink()                             # no complete.json: recipe.yaml says whose results they are
    with pytest.raises(UserError, match="metrics.jsonl"):
        check_resume(other, False, 1)
