"""Against a real one-node Slurm (slurm/cluster.sh, started by .ci/run): submit, preempt + requeue +
resume, a sweep as a job array, dry-run scripts, and quoting of hostile names."""
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import assert_bitwise, base_recipe, checkpoint_steps, cli, final_params, metric_rows, write_recipe

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


def test_submit_runs_the_recipe_to_completion(tmp_path, slurm_env):
    path = write_recipe(tmp_path, base_recipe(name="sub", epochs=2))
    job = submit([str(path)], tmp_path, slurm_env)
    state = wait_done(job, slurm_env)
    run = tmp_path / "runs" / "sub"
    assert state["JobState"] == "COMPLETED", (run / "slurm" / f"slurm-{job}.out").read_text()[-3000:]
    assert (run / "complete.json").exists() and len(metric_rows(run)) == 2
    assert (run / "slurm" / "submit-1.sbatch").exists() and (run / "slurm" / f"slurm-{job}.out").exists()


def test_preemption_signal_requeues_resumes_and_matches_the_uninterrupted_run(tmp_path, slurm_env):
    recipe = base_recipe(name="pre", epochs=4, **{"data.size": 400})
    ref = tmp_path / "ref"
    ref.mkdir()
    cli(["run", str(write_recipe(ref, recipe))], cwd=ref, check=0)

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
    assert_bitwise(final_params(run), final_params(ref / "runs" / "pre"))
    assert metric_rows(run) == metric_rows(ref / "runs" / "pre")


def test_sweep_runs_as_one_job_array(tmp_path, slurm_env):
    write_recipe(tmp_path, base_recipe(epochs=1, **{"distributed.nproc_per_node": 1}), "base.yaml")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(
        {"recipe": "base.yaml", "name": "grid", "grid": {"schedule.lr.max": [0.01, 0.05, 0.1]}}))
    dry = cli(["sweep", str(tmp_path / "sweep.yaml"), "--dry-run"], cwd=tmp_path, env=slurm_env, check=0)
    assert "3 runs as one job array --array=0-2%4" in dry.stdout and "schedule.lr.max=0.05" in dry.stdout
    out = cli(["sweep", str(tmp_path / "sweep.yaml"), "--max-parallel", "2"], cwd=tmp_path, env=slurm_env, check=0)
    job = re.search(r"submitted array job (\d+)", out.stdout).group(1)
    t0 = time.time()
    runs = [tmp_path / "runs" / f"grid_lr.max={lr}" for lr in (0.01, 0.05, 0.1)]
    while not all((r / "complete.json").exists() for r in runs) and time.time() - t0 < 300:
        time.sleep(1)
    assert all((r / "complete.json").exists() for r in runs), list((tmp_path / "runs" / "grid" / "slurm").iterdir())
    lrs = [yaml.safe_load((r / "recipe.yaml").read_text())["schedule"]["lr"]["max"] for r in runs]
    groups = {yaml.safe_load((r / "recipe.yaml").read_text())["tracking"]["wandb"]["group"] for r in runs}
    assert lrs == [0.01, 0.05, 0.1] and len(groups) == 3
    points = json.loads((tmp_path / "runs" / "grid" / "points.json").read_text())
    assert [p["name"] for p in points] == ["grid_lr.max=0.01", "grid_lr.max=0.05", "grid_lr.max=0.1"]
    assert re.search(r"#SBATCH --array=0-2%2", (tmp_path / "runs" / "grid" / "slurm" / "sweep-1.sbatch").read_text())
    assert job


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
    assert "srun --ntasks-per-node=1 --kill-on-bad-exit=1" in multi and "-m launcher run" in multi
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
    assert (run / "complete.json").exists()
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))
