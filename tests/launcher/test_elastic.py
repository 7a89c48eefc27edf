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
@pytest.mark.serial
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


class Node:
    """One node of a two-node run on this host: its launcher, its output collected in the background."""

    def __init__(self, args, cwd, name):
        import threading
        self.name, self.lines = name, []
        self.proc = start(args, cwd=cwd, env={"QHM_TEST_STEP_DELAY": "0.3", "QHM_TEST_NODE": name})
        self.thread = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.thread.start()

    def worker(self):
        """The PID of this node's worker (the agent's child that is a rank)."""
        from pathlib import Path
        from launcher.cluster.supervise import children
        agent = [p for p in children(self.proc.pid) if b"launcher.cluster.agent" in Path(f"/proc/{p}/cmdline").read_bytes()]
        return [p for p in children(agent[0]) if b"RANK=" in Path(f"/proc/{p}/environ").read_bytes()][0]

    def ended(self, timeout):
        """Exit status within ``timeout`` s (all of the output read)."""
        rc = self.proc.wait(timeout=timeout)
        self.thread.join(timeout=10)
        return rc

    @property
    def output(self):
        return "".join(self.lines)


@pytest.mark.e2e
@pytest.mark.serial
def test_two_nodes_survive_a_lost_rank_stop_together_and_end_in_one_line_when_the_store_goes(tmp_path):
    """`run --nnodes 1:2` as two launchers on this host, one run through four events. (1) A rank killed on the
    second node: both agents restart their workers at once (not after torchrun's 30 s SIGTERM wait, which
    each worker took for a preemption) in a round of their own (torchrun's shared store gave the restarted
    workers the last round's addresses: they never met, 600 s), and the run goes on on 2 processes. (2)
    SIGTERM to the second node's launcher: both nodes stop at one checkpoint, exit 75. (3) A plain rerun, then
    the first node (the rendezvous' store) killed with SIGKILL: the other ends in one line within 30 s, exit
    1. (4) A plain rerun completes. Never a traceback."""
    path = write_recipe(tmp_path, recipe("elastic"))
    run = tmp_path / "runs" / "elastic"

    def both():
        args = ["run", str(path), "--nnodes", "1:2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                "--rdzv-id", "elastic-events", "--rdzv-conf", "last_call_timeout=3"]
        a = Node(args, tmp_path, "a")
        time.sleep(2)                                     # the first node hosts the rendezvous' store
        return a, Node(args, tmp_path, "b")

    def after(step, nodes):
        wait_for(lambda: any(s >= step for s in checkpoint_steps(run)), proc=nodes[0].proc, what=f"a checkpoint >= {step}")

    nodes = both()
    try:
        after(9, nodes)
        newest = max(checkpoint_steps(run))
        os.kill(nodes[1].worker(), signal.SIGKILL)
        after(max(checkpoint_steps(run)) + 6, nodes)      # trained on after the restart
        nodes[1].proc.send_signal(signal.SIGTERM)
        assert [n.ended(60) for n in nodes] == [75, 75], [n.output[-2000:] for n in nodes]
        stopped = max(checkpoint_steps(run))
        said = nodes[0].output + nodes[1].output         # rank 0's lines: on whichever node holds it
        assert f"resumed from runs/elastic/checkpoints/step-{newest:09d}" in said and "written by 2 processes" in said
        assert "stop request" not in said and said.count("SIGTERM: stopping") <= 1, "a restart is no preemption"
        told = [n.output for n in nodes]

        nodes = both()
        after(stopped + 3, nodes)
        os.kill(nodes[0].proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        assert nodes[1].ended(60) == 1 and time.monotonic() - killed < 30, nodes[1].output[-2000:]
        nodes[0].ended(30)
        errors = [line for line in nodes[1].lines if line.startswith("qhm-launch: error:")]
        assert len(errors) == 1 and "the rendezvous is gone" in errors[0] and "on every node" in errors[0], errors
        told += [n.output for n in nodes]

        wait_for(lambda: not processes_with("QHM_TEST_NODE=a"), timeout=30, what="the killed node's processes to end")
        nodes = both()
        assert [n.ended(300) for n in nodes] == [0, 0], [n.output[-2000:] for n in nodes]
        told += [n.output for n in nodes]
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                os.killpg(n.proc.pid, signal.SIGKILL)
    assert (run / "final_model.pt").exists() and (run / "complete.json").exists()
    assert not [t for t in told if "Traceback" in t or "frame #" in t], [t[-2000:] for t in told if "Traceback" in t]


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
    from launcher.cluster.launch import topology
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


def test_the_agent_names_the_rank_killed_by_a_signal_not_the_peer_it_took_down(tmp_path, monkeypatch):
    """torchrun's "first failure" is the earliest timestamp, in whole seconds: a rank killed by SIGKILL and rank
    0 exiting on its closed sockets, seen in one poll, tie, and the peer was named (1 run in 16 under load)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    from launcher import env
    from launcher.cluster import agent
    failures = {0: ProcessFailure(local_rank=0, pid=100, exitcode=1, error_file=str(tmp_path / "none")),
                1: ProcessFailure(local_rank=1, pid=101, exitcode=-9, error_file=str(tmp_path / "none"))}
    failures[1].timestamp = failures[0].timestamp + 1       # seen later all the same

    def fail(_config):
        raise ChildFailedError("launcher", failures)
    monkeypatch.setattr(torchrun, "run", fail)
    monkeypatch.setattr(agent, "_end_workers_at_once_on_a_restart", lambda: None)
    note = tmp_path / "note.json"
    monkeypatch.setenv(env.AGENT_NOTE, str(note))
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "WARNING")    # what main() would set stays in this test
    assert agent.main(["--nproc_per_node=2", "-m", "launcher"]) == 1
    told = json.loads(note.read_text())
    assert (told["rank"], told["pid"], told["signal"]) == (1, 101, "SIGKILL")
