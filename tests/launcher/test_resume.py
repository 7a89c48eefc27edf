"""Exact resume: kill -9 at any point, signals, corrupt checkpoints, another world size."""
import json
import os
import shutil
import signal
import socket
import threading
import time

import pytest
import torch

from helpers import (assert_bitwise, base_recipe, checkpoint_steps, cli, final_params, kill_group,
                      killed_at_checkpoint, metric_rows, start, train_ranks, wait_for, write_recipe)

# 400 samples, batches 16 -> 32 -> 64 -> 128: 25 + 13 + 7 + 4 = 49 steps, a checkpoint every 3
STAGE_ENDS = [25, 38, 45, 49]
SLOW = {"QHM_TEST_STEP_DELAY": "0.04"}
pytestmark = pytest.mark.e2e      # the real process tree, killed and signalled; the references train in-process


def recipe(name, **over):
    return base_recipe(name=name, epochs=4, **{"data.size": 400, **over})


@pytest.fixture(scope="module")
def reference(reference_runs):
    """Uninterrupted runs to compare against: fp32 (bitwise resume) and fp64 (elastic resume)."""
    out = {}
    for precision in ("fp32", "fp64"):
        run = reference_runs(recipe("ref", precision=precision))
        out[precision] = (final_params(run), metric_rows(run))
    return out


class Output:
    """Collects a started process's output lines in the background."""

    def __init__(self, proc):
        self.lines = []
        self.thread = threading.Thread(target=lambda: [self.lines.append(x) for x in proc.stdout], daemon=True)
        self.thread.start()

    def has(self, text):
        return any(text in line for line in self.lines)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """The recipe's run killed with kill -9 once checkpoint 18 exists (and 15 before it): a folder that the
    tests which damage its checkpoints or change its recipe each get a copy of (one launch, not three)."""
    folder = tmp_path_factory.mktemp("killed")
    killed_at_checkpoint(folder, recipe("ref"), 18, delay=SLOW["QHM_TEST_STEP_DELAY"])   # 15 and 18 kept
    return folder


def killed_run(tmp_path, killed):
    """A copy of the killed run in ``tmp_path``: (its recipe's path, its run folder)."""
    shutil.copytree(killed, tmp_path, dirs_exist_ok=True, symlinks=True)
    return tmp_path / "recipe.yaml", tmp_path / "runs" / "ref"


def assert_same_as_reference(run_dir, reference, precision="fp32"):
    params, rows = reference[precision]
    assert_bitwise(final_params(run_dir), params)
    assert metric_rows(run_dir) == rows


def _measured(rows):
    """steps.jsonl rows without their clocks (wall time, throughput): what must be a function of the run."""
    return [{k: v for k, v in r.items() if not any(w in k for w in ("time", "per_s", "elapsed", "wall"))} for r in rows]


def test_on_three_ranks_every_kind_of_stop_resumes_bitwise_and_the_step_rows_do_not_depend_on_timing(tmp_path):
    """Every kind of stop, one after another in one run on 3 ranks: kill -9 mid-epoch, at the stage switch
    and during a checkpoint write, rank 2 alone killed with SIGKILL, then SIGTERM; each time the same command
    resumes, and the end is bitwise the uninterrupted 3-rank run (on 2 ranks: the tests below, a rank's
    SIGKILL and SIGTERM each resumed bitwise). On 3 ranks the order
    in which an all-reduce adds the ranks' values depends on an element's place in the reduced tensor: DDP's
    bucket layout must not change at a resume, and the queued step rows (however many a stop check sends at
    once) must be summed in one order."""
    three = {"distributed.nproc_per_node": 3, "tracking.log_every_steps": 1}
    (tmp_path / "reference").mkdir()
    ref = train_ranks(recipe("ref", **three), tmp_path / "reference")
    path = write_recipe(tmp_path, recipe("ref", **three))
    run = tmp_path / "runs" / "ref"

    def until(enough, what, env=None):
        proc = start(["run", str(path)], cwd=tmp_path, env={**SLOW, **(env or {})})
        out = Output(proc)
        wait_for(lambda: enough(out), proc=proc, what=what)
        return proc, out

    def newer_than(step):
        return lambda out: any(s > step for s in checkpoint_steps(run))

    proc, _ = until(lambda out: any(7 <= s < 25 for s in checkpoint_steps(run)), "a mid-epoch checkpoint")
    kill_group(proc)
    assert not (run / "final_model.pt").exists()
    proc, out = until(lambda out: STAGE_ENDS[0] in checkpoint_steps(run), "the stage-switch checkpoint")
    kill_group(proc)
    assert out.has("resumed from")
    proc, out = until(lambda out: out.has("pausing"), "a paused checkpoint write",
                      {"QHM_TEST_PAUSE_BEFORE_SEAL": "60", "QHM_TEST_PAUSE_FROM_STEP": str(STAGE_ENDS[0] + 1)})
    assert list((run / "checkpoints").glob(".tmp-step-*")), "the write is in progress"
    kill_group(proc)
    newest = checkpoint_steps(run)[-1]
    proc, out = until(newer_than(newest), "a checkpoint after the interrupted write")
    try:
        os.kill(_agent_and_rank(proc.pid, 2)[1], signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
    finally:
        kill_group(proc)
    out.thread.join(timeout=10)
    assert out.has("rank 2 (pid") and out.has("was killed by SIGKILL"), out.lines[-20:]
    proc, out = until(newer_than(checkpoint_steps(run)[-1]), "a checkpoint after the rank's death")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    assert checkpoint_steps(run)[-1] < STAGE_ENDS[-1], "stopped before the end: the last leg trains"
    assert "resumed from" in cli(["run", str(path)], cwd=tmp_path, check=0).stdout
    assert_bitwise(final_params(run), final_params(ref))
    assert metric_rows(run) == metric_rows(ref)
    steps = [json.loads(x) for x in (run / "steps.jsonl").read_text().splitlines()]
    expect = [json.loads(x) for x in (ref / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == len(expect) > 10 and _measured(steps) == _measured(expect)


def _agent_and_rank(launcher_pid, rank):
    """torchrun's agent (the launcher's child running launcher.cluster.agent) and its worker of ``rank``."""
    from pathlib import Path
    from launcher.cluster.supervise import children
    agent = [p for p in children(launcher_pid) if b"launcher.cluster.agent" in Path(f"/proc/{p}/cmdline").read_bytes()]
    workers = [p for p in children(agent[0])
               if f"RANK={rank}".encode() in Path(f"/proc/{p}/environ").read_bytes().split(b"\0")]
    return agent[0], workers[0]


@pytest.mark.parametrize("victim", ["rank", "agent"])
def test_a_rank_or_the_agent_killed_with_sigkill_is_one_line_naming_it_and_the_run_resumes(tmp_path, reference, victim):
    """What the out-of-memory killer does: kill -9 of rank 1 alone (rank 0 then meets closed sockets in a
    collective: its "Connection reset by peer" must not be the line), or of torchrun's agent."""
    path = write_recipe(tmp_path, recipe("ref"))
    run = tmp_path / "runs" / "ref"
    proc = start(["run", str(path)], cwd=tmp_path, env=SLOW)
    try:
        wait_for(lambda: any(7 <= s < 25 for s in checkpoint_steps(run)), proc=proc, what="a mid-epoch checkpoint")
        agent, rank1 = _agent_and_rank(proc.pid, 1)
        os.kill(rank1 if victim == "rank" else agent, signal.SIGKILL)
        text = proc.communicate(timeout=60)[0]
    finally:
        kill_group(proc)
    newest = checkpoint_steps(run)[-1]
    errors = [x for x in text.splitlines() if "error" in x.lower() or "Traceback" in x or "Connection reset" in x]
    assert proc.returncode == 1 and len(errors) == 1, text[-3000:]
    again = f"run the same command again to resume from the newest checkpoint (global step {newest})"
    if victim == "rank":
        assert errors[0] == (f"qhm-launch: error: rank 1 (pid {rank1} on {socket.gethostname()}) was killed by SIGKILL "
                             "(signal 9; what the kernel's out-of-memory killer sends: see the node's memory, e.g. "
                             f"`dmesg`); {again}"), errors
    else:
        assert errors[0] == (f"qhm-launch: error: torchrun's agent was killed by SIGKILL (signal 9) and its workers "
                             f"ended with it; {again}"), errors
    marker = json.loads((run / "failed.json").read_text())
    assert marker["signal"] == "SIGKILL" and marker.get("rank") == (1 if victim == "rank" else None)
    assert "failed" in cli(["status", str(run)], cwd=tmp_path, check=0).stdout
    if victim == "rank":
        assert "resumed from" in cli(["run", str(path)], cwd=tmp_path, check=0).stdout
        assert_same_as_reference(run, reference)


# SIGTERM here; USR2 and TERM again on Slurm (test_slurm), USR1 through the same flag (test_signals)
@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_signal_to_launcher_saves_the_same_step_on_all_ranks_and_exits_preempted(tmp_path, reference, sig):
    path = write_recipe(tmp_path, recipe("ref", **{"tracking.wandb.mode": "offline"}))
    run = tmp_path / "runs" / "ref"
    proc = start(["run", str(path)], cwd=tmp_path, env={**SLOW, "WANDB_DIR": str(tmp_path)})
    wait_for(lambda: len(checkpoint_steps(run)) >= 2, proc=proc, what="two checkpoints")
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 75
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    manifest = json.loads((latest / "manifest.json").read_text())
    assert manifest["tag"] == "preempted" and manifest["world_size"] == 2
    assert {"rank-00000.pt", "rank-00001.pt", "state.pt"} <= set(manifest["files"])
    assert manifest["position"]["global_step"] < 49
    wandb_id = (run / "wandb_id").read_text().strip()
    assert manifest["wandb_id"] == wandb_id
    cli(["run", str(path)], cwd=tmp_path, check=0, env={"WANDB_DIR": str(tmp_path)})
    assert (run / "wandb_id").read_text().strip() == wandb_id
    assert len(list(run.glob(f"wandb/offline-run-*-{wandb_id}"))) == 2      # the same run id both times
    assert_same_as_reference(run, reference)


def _row_of(run, step):
    """Whether steps.jsonl has the row of global step ``step``: written when the step's epoch ends or an
    evaluation starts (the rows wait about a second otherwise, never past either)."""
    path = run / "steps.jsonl"
    return path.exists() and any(json.loads(line).get("step") == step
                                 for line in path.read_text().splitlines() if line.endswith("}"))


@pytest.mark.serial
@pytest.mark.parametrize("phase", ["epoch-end evaluation", "mid-epoch evaluation", "checkpoint write"])
def test_sigterm_during_an_evaluation_or_a_checkpoint_write_stops_in_seconds_and_resumes_bitwise(
        tmp_path, reference_runs, phase):
    """An evaluation (here 1.5 s a batch, about 9 s a pass) is left part-way at the next agreed check: a
    checkpoint where training stood, the evaluation owed, exit 75 within 6 s of the signal (it waited for the
    whole pass before). A checkpoint write (each paused 4 s here) ends first and the stop follows two steps
    on (it waited for an interval measured at the steps' pace before: 14 steps and four more paused writes).
    The rerun evaluates again, and the run is bitwise the uninterrupted one, metrics.jsonl row for row."""
    # the shared reference logs every 25 steps (the step rows' grouping reaches grad_sq's last bits); the
    # mid-epoch phase watches for step 10's row, so it logs every step and trains its own
    over = {"tracking.log_every_steps": 1, "eval.every_steps": 10} if phase.startswith("mid") else {}
    r = recipe("ref", **over)
    if phase.startswith("mid"):                    # eval cadence is not in the trajectory: its own reference
        (tmp_path / "reference").mkdir()
        ref = train_ranks(r, tmp_path / "reference")
    else:
        ref = reference_runs(r)
    path = write_recipe(tmp_path, r)
    run = tmp_path / "runs" / "ref"
    if phase == "checkpoint write":
        env, limit = {"QHM_TEST_PAUSE_BEFORE_SEAL": "4", "QHM_TEST_PAUSE_FROM_STEP": str(STAGE_ENDS[0] + 1)}, 4 + 4 + 3
    else:
        env, limit = {"QHM_TEST_EVAL_DELAY": "1.5"}, 6
    at = 10 if phase.startswith("mid") else STAGE_ENDS[0]
    proc = start(["run", str(path)], cwd=tmp_path, env={**SLOW, **env})
    out = Output(proc)
    try:
        wait_for((lambda: out.has("pausing")) if phase == "checkpoint write" else (lambda: _row_of(run, at)),
                 proc=proc, what=f"the {phase}")
        writing = [int(p.name.rsplit("-", 1)[1]) for p in (run / "checkpoints").glob(".tmp-step-*")]
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 75
        took = time.monotonic() - sent
    finally:
        kill_group(proc)
    out.thread.join(timeout=10)
    assert took < limit, (took, out.lines[-10:])
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    manifest = json.loads((latest / "manifest.json").read_text())
    if phase == "checkpoint write":
        assert manifest["tag"] == "preempted" and len(writing) == 1 and manifest["step"] == writing[0] + 2
    else:
        assert manifest["step"] == at and manifest["evaluation_owed"] and out.has("stopped part-way")
        assert not [row for row in metric_rows(run) if row["step"] == at], "an interrupted evaluation writes no row"
    assert "resumed from" in cli(["run", str(path)], cwd=tmp_path, check=0).stdout
    assert_bitwise(final_params(run), final_params(ref))
    assert metric_rows(run) == metric_rows(ref)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, killed):
    path, run = killed_run(tmp_path, killed)
    steps = checkpoint_steps(run)
    newest = run / "checkpoints" / f"step-{steps[-1]:09d}"
    data = (newest / "state.pt").read_bytes()
    (newest / "state.pt").write_bytes(data[: len(data) // 2])               # truncated
    second = run / "checkpoints" / f"step-{steps[-2]:09d}"
    proc = cli(["run", str(path)], cwd=tmp_path, check=0)
    assert f"checkpoint {newest.name} is not valid" in proc.stdout
    assert f"resumed from runs/ref/checkpoints/{second.name}" in proc.stdout
    assert_same_as_reference(run, reference)
    assert list((run / "checkpoints").glob(f"replaced-{newest.name}-*")), "the corrupt one was kept aside"


def test_flipped_byte_is_caught_and_no_valid_checkpoint_deletes_nothing(tmp_path, killed):
    path, run = killed_run(tmp_path, killed)
    for folder in (run / "checkpoints").glob("step-*"):
        f = folder / "state.pt"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF                                          # same size, wrong checksum
        f.write_bytes(bytes(data))
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    proc = cli(["run", str(path)], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "no valid checkpoint" in proc.stderr and "checksum" in proc.stderr and "nothing was deleted" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


# 2 -> 1 and 2 -> 3 here; 1 -> 2 as an elastic chain on two Slurm nodes (test_slurm)
@pytest.mark.parametrize("first,second", [(2, 1), (2, 3)])
def test_resume_on_another_world_size(tmp_path, reference, first, second):
    path = write_recipe(tmp_path, recipe("ref", precision="fp64", **{"distributed.nproc_per_node": first}))
    run = tmp_path / "runs" / "ref"
    proc = start(["run", str(path)], cwd=tmp_path, env=SLOW)
    wait_for(lambda: any(s > 25 for s in checkpoint_steps(run)), proc=proc, what="a second-stage checkpoint")
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75
    out = cli(["run", str(path), "--set", f"distributed.nproc_per_node={second}"], cwd=tmp_path, check=0)
    assert f"written by {first} processes" in out.stdout
    params, rows = reference["fp64"]
    got = final_params(run)
    for k in params:
        torch.testing.assert_close(got[k], params[k], rtol=1e-10, atol=1e-12)
    got_rows = metric_rows(run)
    assert [r["samples"] for r in got_rows] == [r["samples"] for r in rows]
    for a, b in zip(got_rows, rows):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-9)


def test_changed_recipe_is_refused_and_force_resume_proceeds(tmp_path, killed):
    path, run = killed_run(tmp_path, killed)
    refused = cli(["run", str(path), "--set", "schedule.lr.max=0.2", "--set", "tracking.wandb.project=x"],
                  cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "schedule.lr.max: 0.05 -> 0.2" in refused.stderr and "wandb" not in refused.stderr
    # W&B fields and the process count may change freely
    forced = start(["run", str(path), "--set", "schedule.lr.max=0.2", "--force-resume"], cwd=tmp_path, env=SLOW)
    out = Output(forced)
    wait_for(lambda: out.has("resumed from"), proc=forced, what="the forced resume")
    kill_group(forced)                       # it resumed: training on to the end would show nothing more
    assert out.has("WARNING: --force-resume")
    assert (run / "recipe.prev-1.yaml").exists(), "the earlier resolved recipe is kept"
