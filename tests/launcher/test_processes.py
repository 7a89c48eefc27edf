"""Processes, tried as a careless or hostile user would: stale PID files are never signalled, Ctrl-C
saves and stops (twice: stops at once), a kill -9 at any moment of start-up leaves nothing running
(W&B's helpers included), and a second run of the same folder is refused."""
import os
import signal
import socket
import subprocess
import time
import uuid

import pytest

from helpers import alive, base_recipe, checkpoint_steps, cli, processes_with, start, wait_for, write_recipe
from launcher.cluster.supervise import children

pytestmark = pytest.mark.e2e      # the real process tree: signals, kills, start-up

SLOW = {"QHM_TEST_STEP_DELAY": "0.04"}


def recipe(**over):
    return base_recipe(**{"name": "p", "epochs": 4, "data.size": 400, **over})


def marked(mark):
    """PIDs of live processes whose environment carries ``mark`` (every process a run starts inherits it)."""
    return processes_with(f"QHM_TEST_MARK={mark}")


def kill_marked(mark):
    """Clean up after a failing test: only processes this test started (they carry its mark)."""
    for pid in marked(mark):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_stale_pid_files_are_never_signalled(tmp_path):
    """A kill -9 used to leave .pids files behind; a preemption signal during start-up went to the PIDs
    in them. Now workers are found as the agent's children, and an unrelated process is never hit."""
    bystander = subprocess.Popen(["sleep", "120"])
    try:
        pids = tmp_path / "runs" / "p" / ".pids"
        pids.mkdir(parents=True)
        for rank in (0, 1):
            (pids / f"{socket.gethostname()}-{rank}.pid").write_text(str(bystander.pid))
        path = write_recipe(tmp_path, recipe())
        proc = start(["run", str(path)], cwd=tmp_path, env=SLOW)
        time.sleep(0.5)                                   # start-up: no worker exists yet
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=180)[0]
        assert proc.returncode == 75, out[-3000:]
        assert bystander.poll() is None, "the process named in a stale PID file was signalled"
        assert checkpoint_steps(tmp_path / "runs" / "p") and not pids.exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_sigterm_while_the_console_script_imports_is_a_preemption(tmp_path):
    """`qhm-launch` (the installed script, not `python -m launcher`) catches the signals before it
    imports torch: a SIGTERM 0.3 s after start is a preemption (75, a checkpoint), not a death (143)."""
    import sys
    path = write_recipe(tmp_path, recipe())
    script = os.path.join(os.path.dirname(sys.executable), "qhm-launch")
    proc = subprocess.Popen([script, "run", str(path)], cwd=tmp_path, env=dict(os.environ, **SLOW),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=180)[0]
        assert proc.returncode == 75, out[-3000:]
        assert checkpoint_steps(tmp_path / "runs" / "p")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.serial
def test_a_preemption_is_saved_within_seconds_of_the_signal_when_steps_are_slow(tmp_path):
    """Half a second a step (the smallest stage would check only every 16 steps by batch size: 16 s):
    the check interval follows the measured pace, so the checkpoint comes within 3 s, at the step the
    log line announced."""
    import json
    path = write_recipe(tmp_path, recipe())
    run = tmp_path / "runs" / "p"
    proc = start(["run", str(path)], cwd=tmp_path, env={"QHM_TEST_STEP_DELAY": "0.5"})
    try:
        wait_for(lambda: checkpoint_steps(run), proc=proc, what="a first checkpoint")
        time.sleep(1.0)
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: (run / "preempted.json").exists(), timeout=60, proc=proc, what="the preempted marker")
        newest = run / "checkpoints" / f"step-{checkpoint_steps(run)[-1]:09d}"
        written = (newest / "manifest.json").stat().st_mtime
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode == 75, out[-3000:]
        announced = [line for line in out.splitlines() if "SIGTERM: stopping after global step" in line]
        stopped = json.loads((run / "preempted.json").read_text())["global_step"]
        assert len(announced) == 1 and f"global step {stopped} " in announced[0], out[-3000:]
        assert checkpoint_steps(run)[-1] == stopped and written - sent < 3.0, (written - sent, out[-3000:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _descendants(pid):
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_saves_and_stops_and_twice_stops_at_once(tmp_path, presses):
    mark = uuid.uuid4().hex
    path = write_recipe(tmp_path, recipe())
    run = tmp_path / "runs" / "p"
    proc = start(["run", str(path)], cwd=tmp_path, env={**SLOW, "QHM_TEST_MARK": mark})
    try:
        wait_for(lambda: checkpoint_steps(run), proc=proc, what="a first checkpoint")
        before = checkpoint_steps(run)
        tree = _descendants(proc.pid)
        for _ in range(presses):                          # what a terminal does: the whole foreground group
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.05)
        out = proc.communicate(timeout=180)[0]
        assert "Traceback" not in out and "FAILED" not in out, out[-3000:]
        if presses == 1:
            assert proc.returncode == 75, out[-3000:]
            assert sum("SIGINT: checkpointing at the next agreed check" in line for line in out.splitlines()) == 1
            assert len(checkpoint_steps(run)) > len(before) or checkpoint_steps(run)[-1] > before[-1]
        else:
            assert proc.returncode == 130, out[-3000:]
            assert "second interrupt: stopped at once" in out
        wait_for(lambda: not marked(mark), timeout=15, what="every process of the run to end")
        assert not any(alive(pid) for pid in tree)
    finally:
        kill_marked(mark)


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0, 3.5])
def test_kill_9_during_start_up_leaves_nothing_running(tmp_path, delay):
    mark = uuid.uuid4().hex
    path = write_recipe(tmp_path, recipe(**{"tracking.wandb.mode": "offline"}))
    proc = start(["run", str(path)], cwd=tmp_path, env={**SLOW, "QHM_TEST_MARK": mark, "WANDB_DIR": str(tmp_path)})
    try:
        time.sleep(delay)
        seen = marked(mark)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        wait_for(lambda: not marked(mark), timeout=20, what=f"the run's processes to end (seen {len(seen)})")
    finally:
        kill_marked(mark)


def test_wandb_helpers_end_with_a_killed_run(tmp_path):
    mark = uuid.uuid4().hex
    path = write_recipe(tmp_path, recipe(**{"tracking.wandb.mode": "offline"}))
    run = tmp_path / "runs" / "p"
    proc = start(["run", str(path)], cwd=tmp_path, env={**SLOW, "QHM_TEST_MARK": mark, "WANDB_DIR": str(tmp_path)})
    try:
        wait_for(lambda: checkpoint_steps(run), proc=proc, what="a first checkpoint")
        names = {open(f"/proc/{p}/comm").read().strip() for p in marked(mark) if os.path.exists(f"/proc/{p}")}
        assert "wandb-core" in names and "wandb-symon" not in names, names
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        wait_for(lambda: not marked(mark), timeout=10, what="W&B's service to end with the run")
    finally:
        kill_marked(mark)


def test_a_second_run_of_the_same_folder_is_refused(tmp_path):
    path = write_recipe(tmp_path, recipe(epochs=2))
    first = start(["run", str(path)], cwd=tmp_path, env=SLOW)
    try:
        wait_for(lambda: (tmp_path / "runs" / "p" / ".lock").exists(), proc=first, what="the first run's lock")
        second = cli(["run", str(path)], cwd=tmp_path)
        lines = [x for x in second.stderr.splitlines() if x.strip()]
        assert second.returncode == 2 and len(lines) == 1 and "is in use by another run (pid" in lines[0]
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)


def test_a_non_finite_loss_stops_the_run_in_one_line_and_saves_nothing_after_it(tmp_path):
    path = write_recipe(tmp_path, recipe(**{"schedule.lr.max": 1e12, "schedule.lr.kind": "constant",
                                            "checkpoint.every_steps": 1}))
    proc = cli(["run", str(path)], cwd=tmp_path)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert len(lines) == 1 and "the training loss is not finite at global step" in lines[0], proc.stderr
    bad = int(lines[0].split("global step ")[1].split(";")[0])
    run = tmp_path / "runs" / "p"
    saved = checkpoint_steps(run)
    assert saved and max(saved) < bad and f"nothing was saved after global step {max(saved)}" in lines[0]
    import torch
    from launcher.run.checkpoint import read_file
    newest = run / "checkpoints" / f"step-{max(saved):09d}"
    assert all(torch.isfinite(t).all() for t in read_file(newest / "state.pt")["engine"]["model"].values())
    assert not (run / "final_model.pt").exists() and (run / "failed.json").exists()


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero3"])
def test_a_full_disk_is_one_line_and_the_same_command_resumes_bitwise_once_there_is_room(tmp_path, engine):
    """A run folder on a 16 MiB tmpfs with 24 KiB left (FSDP: 300): the first checkpoint cannot be written. One line
    naming the folder and the bytes, exit 1, every rank ended; again while still full: the same; with
    room again: the run resumes and ends bitwise where a run that never met a full disk ends. Under FSDP
    the shards are DCP's to write (its CheckpointException went past every handler: 183 lines of tracebacks
    and no failed.json)."""
    import shutil
    from helpers import assert_bitwise, final_params
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        over = {"name": "full", "epochs": 2, "checkpoint.every_steps": 3, "schedule.lr.min": 0.001,  # no LR-0 warning
                "distributed.engine": engine, **({"eval.full_grad_norm": False} if engine != "ddp" else {})}
        if engine == "zero3":
            over.update({"distributed.engine": "deepspeed", "distributed.zero_stage": 3, "optimizer.name": "adamw"})
        path = write_recipe(tmp_path, recipe(output=str(disk), **over))
        filler = disk / "filler"
        room = {"ddp": 24, "fsdp": 300, "zero3": 300}[engine] * 1024   # sharded: small files fit, the shards do not
        filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - room))
        for _ in range(2):
            proc = cli(["run", str(path)], cwd=tmp_path, timeout=120)
            lines = [x for x in proc.stderr.splitlines() if x.strip()]
            assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
            assert len(lines) == 1 and lines[0].startswith(f"qhm-launch: error: no space left on the device of {disk}"), lines
            assert (disk / "full" / "failed.json").exists() or engine == "ddp"
            assert " needed " in lines[0] and " bytes free; " in lines[0] and "run the same command again" in lines[0]
        filler.unlink()
        cli(["run", str(path)], cwd=tmp_path, check=0, timeout=120)
        reference = write_recipe(tmp_path, recipe(output=str(tmp_path / "ref"), **over), "ref.yaml")
        cli(["run", str(reference)], cwd=tmp_path, check=0, timeout=120)
        assert_bitwise(final_params(disk / "full"), final_params(tmp_path / "ref" / "full"))
    finally:
        subprocess.run(["umount", "-l", str(disk)])
