"""Elastic membership (``run --nnodes MIN:MAX``): two torchrun agents on this host as two nodes of one c10d
rendezvous; a node lost mid-run (kill -9 of its launcher: its keeper ends its agent and worker) and the
other goes on alone, in place, from the newest checkpoint."""
import argparse
import json
import os
import re
import signal
import socket
import time

import subprocess

import pytest

from helpers import (base_recipe, checkpoint_steps, processes_with, start, wait_for, worst_gap_to_a_switched_run,
                     write_recipe)
from launcher.cli.main import main
from launcher.errors import UserError



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe(name):
    # 400 samples, batches 16 -> 32 -> 64 -> 128 (49 steps), a checkpoint every 3; fp64 so that the world
    # size's other sum order stays far below the tolerance; lr.min > 0: no warning line
    return base_recipe(name=name, epochs=4, precision="fp64", **{
        "data.size": 400, "distributed.nproc_per_node": 1, "tracking.log_every_steps": 1, "schedule.lr.min": 0.001})


@pytest.mark.e2e
def test_a_lost_node_leaves_the_run_going_on_the_node_left_as_a_run_that_switched_world_size(tmp_path):
    path = write_recipe(tmp_path, recipe("elastic"))
    run = tmp_path / "runs" / "elastic"
    nodes = ["run", str(path), "--nnodes", "1:2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
             "--rdzv-id", "elastic-test", "--rdzv-conf", "last_call_timeout=3"]
    slow = {"QHM_TEST_STEP_DELAY": "0.3"}
    first = start(nodes, cwd=tmp_path, env={**slow, "QHM_TEST_NODE": "a"})   # hosts the rendezvous' store
    time.sleep(2)
    second = start(nodes, cwd=tmp_path, env={**slow, "QHM_TEST_NODE": "b"})
    try:
        wait_for(lambda: any(s >= 9 for s in checkpoint_steps(run)), proc=first, what="a checkpoint of the 2-node run")
        assert len(processes_with("QHM_TEST_NODE=b")) >= 3       # the launcher, its agent and its worker (and keeper)
        os.kill(second.pid, signal.SIGKILL)                        # the node is lost
        second.wait(timeout=30)
        out, _ = first.communicate(timeout=300)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert first.returncode == 0, out[-4000:]
    wait_for(lambda: not processes_with("QHM_TEST_NODE=b"), timeout=30, what="the lost node's processes to end")
    # one line for the loss, one for the restart: old and new world size, the step resumed from
    lost = [line for line in out.splitlines() if "a process of the run is gone" in line]
    assert len(lost) == 1 and "torchrun restarts the workers on the nodes left" in lost[0], out[-4000:]
    said = re.findall(r"membership changed \(torchrun's restart 1\): world size 2 -> 1, resumed from global step (\d+)", out)
    assert len(said) == 1, out[-4000:]
    resumed = int(said[0])
    assert resumed >= 9 and resumed % 3 == 0 or resumed == 25

    # the reference: 2 processes up to that step, then 1 to the end, each uninterrupted
    worst = worst_gap_to_a_switched_run(run, recipe("elastic"), resumed, 2, 1, tmp_path)
    assert worst <= 1e-6, f"parameters {worst:.3g} apart"

    # every step once, none missing, none twice; the epoch rows once each, on the world size that trained them
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines() if line.strip()]
    counted = [r["step"] for r in steps]              # the global step
    assert sorted(counted) == counted == list(range(1, 50))
    assert [r["world_size"] for r in steps if r["step"] in (1, resumed + 1)] == [2, 1]
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3]


def test_submit_min_nodes_keeps_the_job_going_on_the_nodes_left(tmp_path, capsys):
    """The job's script: the allocation survives a failed node (--no-kill), one node's task ending does not end
    the others' (srun --no-kill --kill-on-bad-exit=0), torchrun's membership is MIN:the job's nodes, and a
    run that completed on the nodes left ends the job well although srun reports the lost task."""
    path = write_recipe(tmp_path, recipe("elastic"))
    assert main(["submit", str(path), "--nodes", "3", "--min-nodes", "2", "--rdzv-conf", "last_call_timeout=5",
                 "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --nodes=3" in script and "#SBATCH --no-kill" in script
    assert '--no-kill --kill-on-bad-exit=0' in script and "--kill-on-bad-exit=1" not in script
    assert '--nnodes="2:$SLURM_JOB_NUM_NODES"' in script and "--rdzv-conf last_call_timeout=5" in script
    assert "the run completed on the nodes left" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert main(["submit", str(path), "--nodes", "3", "--dry-run"]) == 0
    fixed = capsys.readouterr().out
    assert "--no-kill" not in fixed and "--kill-on-bad-exit=1" in fixed and '--nnodes="$SLURM_JOB_NUM_NODES"' in fixed
    assert "the run completed on the nodes left" not in fixed


def test_under_slurm_the_rendezvous_store_lives_on_the_first_node(monkeypatch):
    """torchrun guesses which agent hosts the c10d store from host names; where two nodes share a host the
    first to bind wins. In a generated job it is the first node's (the one --rdzv-endpoint names)."""
    from launcher.cli.run import topology
    from launcher import env
    args = argparse.Namespace(nnodes=(1, 2), rdzv_endpoint="n1:12345", rdzv_id="qhm-7", rdzv_conf=None, max_restarts=None)
    monkeypatch.setenv(env.BATCH_JOB, "1")
    for node, host in (("0", "true"), ("1", "false")):
        monkeypatch.setenv("SLURM_NODEID", node)
        assert f"--rdzv_conf=is_host={host}" in topology(args)
    args.rdzv_conf = "last_call_timeout=3,is_host=false"                  # the user's own choice stays
    monkeypatch.setenv("SLURM_NODEID", "0")
    assert "--rdzv_conf=last_call_timeout=3,is_host=false" in topology(args)
    monkeypatch.delenv(env.BATCH_JOB)                                       # not a generated job: torchrun guesses
    args.rdzv_conf = None
    assert not any(a.startswith("--rdzv_conf") for a in topology(args))
    assert topology(args)[:2] == ["--nnodes=1:2", "--max_restarts=3"]


def test_a_membership_range_checks_the_data_once_and_every_world_size(monkeypatch, tmp_path):
    """run --nnodes 1:4 (and submit --min-nodes): the data and factories are checked once, the split and
    what depends on the world size for each of the 4 world sizes; one that cannot train is refused."""
    from launcher import config, data
    from launcher.train import preflight
    recipe = config.from_dict(base_recipe(output=str(tmp_path / "runs")))
    checked, split = [], []
    real_check, real_split = data.check_available, preflight.split_epochs
    monkeypatch.setattr(data, "check_available", lambda d: checked.append(d) or real_check(d))
    monkeypatch.setattr(preflight, "split_epochs", lambda r, n, w: split.append(w) or real_split(r, n, w))
    planned = preflight.check_membership(recipe, 2, (1, 4), "--nnodes 1:4")
    assert len(checked) == 1 and split == [2, 4, 6, 8]
    assert planned == real_split(recipe, 200, 8), "the plan of the most nodes, the one the run starts on"
    adaptive_fsdp = config.from_dict(base_recipe(output=str(tmp_path / "runs"), **{
        "distributed.engine": "fsdp", "eval.full_grad_norm": False,
        "schedule.batch": {"kind": "adaptive", "initial": 16, "growth": 2}}))
    preflight.check_membership(adaptive_fsdp, 2, (1, 2), "--nnodes 1:2")       # 2 and 4 processes measure
    with pytest.raises(UserError, match="FSDP on one process"):
        preflight.check_membership(adaptive_fsdp, 1, (1, 2), "--nnodes 1:2")
