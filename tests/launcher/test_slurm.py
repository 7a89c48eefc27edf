"""Against a real two-node Slurm (slurm/cluster.sh: two slurmd daemons on this machine, started by .ci/run):
submit (a hostile name, quoted), preempt + requeue + resume on one node and on two (the warning signal
and SIGTERM to every step), 4 ranks on 2 nodes from batch 2, an elastic chain from 1 node to 2, a sweep
over node counts as one job array per shape, and dry-run scripts."""
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import (assert_bitwise, base_recipe, checkpoint_steps, cli, final_params, metric_rows, processes_with,
                      train_ranks, wait_for, worst_gap_to_a_switched_run, write_recipe)
from launcher.cli.main import main

pytestmark = pytest.mark.e2e      # a real Slurm (two slurmd on this machine)

CONF = Path(os.environ.get("QHM_SLURM_CONF", "/tmp/qhm-slurm/slurm.conf"))


def _slurm_up() -> str | None:
    if not CONF.exists():
        return f"no Slurm config at {CONF} (start one with: bash slurm/cluster.sh start)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=dict(os.environ, SLURM_CONF=str(CONF)),
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    if out.returncode != 0 or not re.search(r"idle|mix|alloc", out.stdout):
        return f"Slurm not answering: {out.stderr.strip() or out.stdout.strip()}"
    return None


@pytest.fixture(scope="module")
def slurm_env():
    problem = _slurm_up()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Slurm must run under CI: {problem}")
        pytest.skip(problem)
    return {"SLURM_CONF": str(CONF)}


def job_state(job: str, env: dict) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=dict(os.environ, **env),
                         capture_output=True, text=True)
    return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)


def wait_done(job: str, env: dict, timeout=240) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        state = job_state(job, env)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"):
            return state
        time.sleep(1)
    raise AssertionError(f"job {job} not done after {timeout}s: {job_state(job, env)}")


def submit(args, cwd, env) -> str:
    out = cli(["submit", *args], cwd=cwd, env=env, check=0)
    return re.search(r"submitted job (\d+)", out.stdout).group(1)


def test_preemption_signal_requeues_resumes_and_matches_the_uninterrupted_run(tmp_path, slurm_env, reference_runs):
    recipe = base_recipe(name="pre", epochs=4, **{"data.size": 400})
    reference = reference_runs(recipe)            # the same trajectory as test_resume's fp32 reference

    path = write_recipe(tmp_path, recipe)
    run = tmp_path / "runs" / "pre"
    job = submit([str(path), "--signal", "USR2"], tmp_path, {**slurm_env, "QHM_TEST_STEP_DELAY": "0.15"})
    t0 = time.time()
    while not checkpoint_steps(run) and time.time() - t0 < 120:
        time.sleep(0.5)
    assert checkpoint_steps(run), "the job never checkpointed"
    subprocess.run(["scancel", "--signal=USR2", "--batch", job], env=dict(os.environ, **slurm_env), check=True)
    state = wait_done(job, slurm_env, timeout=300)
    log = (run / "slurm" / f"slurm-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert int(state["Restarts"]) >= 1 and "requeueing" in log and "resumed from" in log
    assert_bitwise(final_params(run), final_params(reference))
    assert metric_rows(run) == metric_rows(reference)


def test_sweep_over_node_counts_runs_one_job_array_per_shape(tmp_path, slurm_env, capsys):
    """slurm.nodes [1, 2] x two learning rates: two arrays of two runs (each with its own --nodes), all
    finish, and `scaling` reports both world sizes."""
    write_recipe(tmp_path, base_recipe(epochs=2, **{"distributed.nproc_per_node": 1, "tracking.log_every_steps": 2,
                                                    "checkpoint.every_steps": 0}), "base.yaml")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(
        {"recipe": "base.yaml", "name": "grid", "grid": {"schedule.lr.max": [0.01, 0.05], "slurm.nodes": [1, 2]}}))
    dry = cli(["sweep", str(tmp_path / "sweep.yaml"), "--dry-run"], cwd=tmp_path, env=slurm_env, check=0)
    assert "2 run(s) as one job array --array=0-1%4 on 1 node(s)" in dry.stdout
    assert "2 run(s) as one job array --array=0-1%4 on 2 node(s)" in dry.stdout
    out = cli(["sweep", str(tmp_path / "sweep.yaml"), "--max-parallel", "2"], cwd=tmp_path, env=slurm_env, check=0)
    jobs = re.findall(r"submitted array job (\d+) \(2 runs on (\d) node", out.stdout)
    assert [n for _, n in jobs] == ["1", "2"], out.stdout
    runs = [tmp_path / "runs" / f"grid_lr.max={lr}_slurm.nodes={n}" for lr in (0.01, 0.05) for n in (1, 2)]
    t0 = time.time()
    while not all((r / "complete.json").exists() for r in runs) and time.time() - t0 < 300:
        time.sleep(1)
    assert all((r / "complete.json").exists() for r in runs), list((tmp_path / "runs" / "grid" / "slurm").iterdir())
    assert [metric_rows(r)[-1]["world_size"] for r in runs] == [1, 2, 1, 2]
    groups = {yaml.safe_load((r / "recipe.yaml").read_text())["tracking"]["wandb"]["group"] for r in runs}
    assert len(groups) == 4
    points = json.loads((tmp_path / "runs" / "grid" / "points.json").read_text())
    assert [(p["name"], p["nodes"]) for p in points] == [(r.name, int(r.name[-1])) for r in runs]
    slurm_dir = tmp_path / "runs" / "grid" / "slurm"
    assert "#SBATCH --nodes=2" in (slurm_dir / "sweep-1_2n.sbatch").read_text()
    assert re.search(r"#SBATCH --array=0-1%2", (slurm_dir / "sweep-1_1n.sbatch").read_text())
    assert main(["scaling", str(tmp_path / "runs" / "grid"), "--json"]) == 0
    throughput = json.loads(capsys.readouterr().out)["throughput"]
    assert [(t["world_size"], len(t["runs"])) for t in throughput] == [(1, 2), (2, 2)]


def test_dry_run_scripts_pass_sbatch_test_only_and_multi_node_commands(tmp_path, slurm_env):
    path = write_recipe(tmp_path, base_recipe(name="dry"))
    script = cli(["submit", str(path), "--dry-run", "--time", "00:10:00"], cwd=tmp_path, env=slurm_env, check=0).stdout
    (tmp_path / "one.sbatch").write_text(script)
    test = subprocess.run(["sbatch", "--test-only", str(tmp_path / "one.sbatch")], cwd=tmp_path,
                          env=dict(os.environ, **slurm_env), capture_output=True, text=True)
    assert test.returncode == 0 and "to start at" in test.stderr, test.stderr
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing"

    multi = cli(["submit", str(path), "--dry-run", "--nodes", "2", "--gpus-per-node", "4"], cwd=tmp_path,
                env=slurm_env, check=0).stdout
    assert "#SBATCH --nodes=2" in multi and "#SBATCH --gpus-per-node=4" in multi
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in multi
    # One launcher per node (it runs torchrun's agent itself, so it sees the preemption signal and
    # reports it); rendezvous on the first node; the single-node script runs the launcher with no srun.
    assert 'srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1' in multi
    assert "-m launcher run" in multi
    assert '--rdzv-endpoint="$HEAD_NODE:$RDZV_PORT"' in multi and '--rdzv-id="qhm-$JOB_ID"' in multi
    assert '--nnodes="$SLURM_JOB_NUM_NODES"' in multi
    assert "\nsrun " not in script and "-m launcher run" in script
    test = subprocess.run(["bash", "-n"], input=multi, text=True, capture_output=True)
    assert test.returncode == 0, test.stderr


def test_hostile_run_name_is_quoted_and_executes_nothing(tmp_path, slurm_env):
    name = "we ird'\"$(touch PWNED)`touch PWNED2`;touch PWNED3"
    path = write_recipe(tmp_path, base_recipe(name=name, epochs=1, **{"distributed.nproc_per_node": 1}))
    job = submit([str(path), "--sbatch-arg=--comment=x y $(touch PWNED4)"], tmp_path, slurm_env)
    state = wait_done(job, slurm_env)
    run = tmp_path / "runs" / name
    assert state["JobState"] == "COMPLETED", list(tmp_path.rglob("slurm-*.out"))
    assert (run / "complete.json").exists() and len(metric_rows(run)) == 1     # the job ran the recipe
    assert (run / "slurm" / "submit-1.sbatch").exists() and (run / "slurm" / f"slurm-{job}.out").exists()
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))


def scancel(job: str, env: dict, *args):
    subprocess.run(["scancel", *args, job], env=dict(os.environ, **env), check=True)


def assert_clean_log(log: str):
    """What a user reads in the job's log: no Python traceback, no torchrun failure report."""
    assert "Traceback" not in log and "FAILED" not in log and "ChildFailedError" not in log, log[-4000:]


# The launcher gives each local worker its share of the cores (OMP_NUM_THREADS): one each for 2 local
# workers here, both for 1 worker per node. The thread count orders a convolution's float sums, so a
# bitwise comparison holds it equal.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def test_two_nodes_preempted_by_warning_signal_then_sigterm_resume_bitwise(tmp_path, slurm_env):
    """2 nodes x 1 process. First the warning signal to the batch shell, then SIGTERM to every step (what
    preemption and `scancel --signal=TERM` do): each ends in a checkpoint at one step on every rank, one
    line per node, a requeue, and the finished run equals an uninterrupted run on 2 ranks bit for bit."""
    # 40 + 20 + 10 steps of 0.2 s: a stop is agreed within two checks, about a second (the check interval
    # follows the measured step time), so each signal still lands before the end
    over = {"epochs": 3, "data.size": 640, "checkpoint.every_steps": 3}
    recipe = base_recipe(name="two", **over, **{"distributed.nproc_per_node": 1})
    ref = tmp_path / "ref"
    ref.mkdir()
    train_ranks(base_recipe(name="two", **over), ref)                 # the same 2 ranks

    run = tmp_path / "runs" / "two"
    job = submit([str(write_recipe(tmp_path, recipe)), "--nodes", "2"], tmp_path,
                 {**slurm_env, "QHM_TEST_STEP_DELAY": "0.2", **ONE_THREAD})
    def steps():
        return max(checkpoint_steps(run), default=0) if (run / "checkpoints").exists() else 0

    def log():
        return (run / "slurm" / f"slurm-{job}.out").read_text()
    wait_for(lambda: steps() >= 3, timeout=180, interval=0.5, what="the 2-node job to train")
    scancel(job, slurm_env, "--signal=USR2", "--batch")
    def restarts():
        return int(job_state(job, slurm_env).get("Restarts", 0))
    wait_for(lambda: restarts() >= 1, timeout=180, interval=0.5, what="a requeue after USR2")
    wait_for(lambda: "resumed from" in log(), timeout=180, interval=0.5, what="the requeued job to resume")
    resumed_at = steps()
    wait_for(lambda: steps() > resumed_at, timeout=180, interval=0.5, what="the resumed job to train")
    scancel(job, slurm_env, "--signal=TERM")              # every step of the job, on both nodes
    wait_for(lambda: restarts() >= 2, timeout=180, interval=0.5, what="a requeue after SIGTERM")
    state = wait_done(job, slurm_env, timeout=300)
    log = log()
    assert state["JobState"] == "COMPLETED", log[-4000:]
    assert_clean_log(log)
    saved = re.findall(r"\[qhm-launch\] \S+: preempted, checkpoint at global step (\d+); the job requeues", log)
    assert len(saved) == 4 and saved[0] == saved[1] and saved[2] == saved[3], log[-4000:]   # one line per node
    assert log.count("requeueing") == 2 and log.count("resumed from") == 2
    assert_bitwise(final_params(run), final_params(ref / "runs" / "two"))
    assert metric_rows(run) == metric_rows(ref / "runs" / "two")


def job_processes(job: str, node_id: int) -> list[int]:
    """The live processes of ``job``'s steps on node ``node_id`` (the launcher srun started there and
    everything under it): they carry the job's id and the node's index in their environment."""
    return processes_with(f"SLURM_JOB_ID={job}", f"SLURM_NODEID={node_id}", unless="SLURM_STEP_ID=batch")


def kill_the_second_node_after_checkpoint_6(job: str, run: Path) -> int:
    """kill -9 every process of ``job``'s steps on its second node (what a node's death does to the job) once
    the run has a checkpoint at global step 6 or later; that newest checkpoint's step."""
    import signal
    def steps():
        return max(checkpoint_steps(run), default=0) if (run / "checkpoints").exists() else 0
    wait_for(lambda: steps() >= 6, timeout=180, interval=0.5, what="the 2-node job to train")
    saved = steps()
    victims = job_processes(job, 1)
    assert victims, "no process of the job found on the second node"
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return saved


def test_a_node_killed_mid_run_ends_the_job_and_the_same_command_resumes(tmp_path, slurm_env):
    """kill -9 every process of the second node mid-run (what a node's death does to the job): the first
    node's processes end within a minute, the job ends (failed or requeued), and submitting the same
    command again resumes from the newest checkpoint and ends where an uninterrupted 2-rank run ends."""
    over = {"epochs": 3, "data.size": 640, "checkpoint.every_steps": 3}
    recipe = base_recipe(name="dead", **over, **{"distributed.nproc_per_node": 1})
    ref = tmp_path / "ref"
    ref.mkdir()
    train_ranks(base_recipe(name="dead", **over), ref)
    path = write_recipe(tmp_path, recipe)
    run = tmp_path / "runs" / "dead"
    env = {**slurm_env, **ONE_THREAD}
    job = submit([str(path), "--nodes", "2"], tmp_path, {**env, "QHM_TEST_STEP_DELAY": "0.2"})
    saved = kill_the_second_node_after_checkpoint_6(job, run)
    killed = time.time()
    wait_for(lambda: not job_processes(job, 0) and not job_processes(job, 1), timeout=60, interval=0.5,
             what="the first node's processes to end")
    assert time.time() - killed < 60
    state = wait_done(job, slurm_env, timeout=120)
    assert state["JobState"] in ("FAILED", "CANCELLED", "COMPLETED") and not (run / "complete.json").exists(), state
    again = submit([str(path), "--nodes", "2"], tmp_path, env)
    state = wait_done(again, slurm_env, timeout=300)
    log = (run / "slurm" / f"slurm-{again}.out").read_text()
    assert state["JobState"] == "COMPLETED" and "resumed from" in log, log[-4000:]
    resumed = int(re.search(r"resumed from \S+step-(\d+)", log).group(1))
    assert resumed >= saved
    assert_bitwise(final_params(run), final_params(ref / "runs" / "dead"))


def test_with_min_nodes_a_node_killed_mid_run_leaves_the_job_going_on_the_node_left(tmp_path, slurm_env):
    """submit --nodes 2 --min-nodes 1, then kill -9 every process of the second node mid-run: the job goes on
    on the first, in place (torchrun restarts its worker, which resumes from the newest checkpoint on world
    size 1), completes, and ends within 1e-6 of a run that switched from 2 processes to 1 at that step."""
    recipe = base_recipe(name="lost", epochs=3, precision="fp64", **{
        "data.size": 640, "checkpoint.every_steps": 3, "distributed.nproc_per_node": 1, "schedule.lr.min": 0.001})
    path = write_recipe(tmp_path, recipe)
    run = tmp_path / "runs" / "lost"
    env = {**slurm_env, **ONE_THREAD}
    job = submit([str(path), "--nodes", "2", "--min-nodes", "1", "--rdzv-conf", "last_call_timeout=3"], tmp_path,
                 {**env, "QHM_TEST_STEP_DELAY": "0.2"})
    kill_the_second_node_after_checkpoint_6(job, run)
    state = wait_done(job, slurm_env, timeout=300)
    log = (run / "slurm" / f"slurm-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED" and (run / "complete.json").exists(), (state, log[-4000:])
    said = re.findall(r"membership changed \(torchrun's restart 1\): world size 2 -> 1, resumed from global step (\d+)", log)
    assert len(said) == 1 and "the run completed on the nodes left" in log, log[-4000:]
    worst = worst_gap_to_a_switched_run(run, recipe, int(said[0]), 2, 1, tmp_path)
    assert worst <= 1e-6, f"parameters {worst:.3g} apart"


def test_four_ranks_on_two_nodes_from_batch_2_equal_one_process(tmp_path, slurm_env):
    """2 nodes x 2 processes on a schedule starting at batch 2 (half the ranks idle in the first stage, a
    partial last batch): the same parameters as one process, float64, to 1e-10."""
    over = {"precision": "fp64", "epochs": 3, "data.size": 70, "schedule.batch.initial": 2,
            "schedule.batch.growth": 3, "checkpoint.every_steps": 0, "eval.every_epochs": 3}
    one = tmp_path / "one"
    one.mkdir()
    train_ranks(base_recipe(name="b2", **over, **{"distributed.nproc_per_node": 1}), one)
    job = submit([str(write_recipe(tmp_path, base_recipe(name="b2", **over))), "--nodes", "2"], tmp_path, slurm_env)
    state = wait_done(job, slurm_env, timeout=300)
    run = tmp_path / "runs" / "b2"
    log = (run / "slurm" / f"slurm-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED" and (run / "complete.json").exists(), log[-4000:]
    assert_clean_log(log)
    pa, pb = final_params(run), final_params(one / "runs" / "b2")
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-10, atol=1e-12)
    assert [(r["batch"], r["world_size"]) for r in metric_rows(run)] == [(2, 4), (6, 4), (18, 4)]


def test_elastic_chain_one_node_then_two_matches_a_fixed_run(tmp_path, slurm_env):
    """--elastic: epoch 0 (batch 16) on 1 node, epochs 1-2 (batch 32, 64) on 2, the second job resuming
    the first's checkpoint on twice the ranks. A world-size change reorders float sums, so the chain
    equals a fixed 2-rank run to float64 rounding (1e-10), not bit for bit."""
    over = {"precision": "fp64", "epochs": 3, "data.size": 192, "distributed.nproc_per_node": 1,
            "distributed.min_rank_batch": 16, "checkpoint.every_steps": 0}
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    train_ranks(base_recipe(name="el", **{**over, "distributed.nproc_per_node": 2}), fixed)
    path = write_recipe(tmp_path, base_recipe(name="el", **over))
    plan = cli(["plan", str(path), "--elastic", "--nnodes", "2", "--rate", "1"], cwd=tmp_path, check=0).stdout
    assert "GPU-hours" in plan, plan
    out = cli(["submit", str(path), "--nodes", "2", "--elastic"], cwd=tmp_path, env=slurm_env, check=0).stdout
    jobs = re.findall(r"submitted job (\d+) \(epochs (\d+)-(\d+) on (\d) node", out)
    assert [j[1:] for j in jobs] == [("0", "0", "1"), ("1", "2", "2")], out
    for job, *_ in jobs:
        assert wait_done(job, slurm_env, timeout=300)["JobState"] == "COMPLETED"
    run = tmp_path / "runs" / "el"
    logs = [(run / "slurm" / f"slurm-{job}.out").read_text() for job, *_ in jobs]
    for log in logs:
        assert_clean_log(log)
    assert "segment done" in logs[0] and "resumed from" in logs[1]
    pa, pb = final_params(run), final_params(fixed / "runs" / "el")
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-10, atol=1e-12)
    assert [(r["batch"], r["world_size"]) for r in metric_rows(run)] == [(16, 1), (32, 2), (64, 2)]

