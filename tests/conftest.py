"""Shared helpers: write recipes into tmp folders and run the real CLI (torchrun, gloo) on them."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from launcher.config import keys
from launcher.run.files import read_jsonl
from launcher.run.tracking import WALL_FIELDS

ROOT = Path(__file__).resolve().parents[1]


def base_recipe(**over) -> dict:
    """A small, fast recipe: synthetic data, small CNN, three batch stages, W&B disabled."""
    r = {
        "name": "t", "output": "runs", "seed": 3, "epochs": 3,
        "data": {"dataset": "synthetic", "size": 200, "augment": True},
        "model": "small_cnn", "precision": "fp32",
        "optimizer": {"name": "qhm", "weight_decay": 1e-4},
        "schedule": {"interval": 1, "batch": {"kind": "exponential", "initial": 16, "growth": 2},
                     "lr": {"kind": "cosine", "max": 0.05, "min": 0.0},
                     "beta": {"kind": "step_decay", "max": 0.9, "factor": 0.5},
                     "gamma": {"kind": "step_decay", "max": 0.7, "factor": 0.5}},
        "distributed": {"engine": "ddp", "nproc_per_node": 2, "max_micro_batch": 8},
        "eval": {"every_epochs": 1, "full_grad_norm": True, "batch_size": 64},
        "checkpoint": {"every_steps": 3, "keep": 3},
        "tracking": {"wandb": {"mode": "disabled"}},
    }
    for key, value in over.items():
        keys.set_(r, key, value)
    return r


def write_recipe(folder: Path, recipe: dict, name="recipe.yaml") -> Path:
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def cli(args, cwd, env=None, timeout=600, check=None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full_env.pop("RANK", None)
    full_env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check is not None and proc.returncode != check:
        raise AssertionError(f"exit {proc.returncode} != {check}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def start(args, cwd, env=None) -> subprocess.Popen:
    """The CLI in its own process group, so a test can kill -9 the whole tree at once."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=cwd, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def wait_for(predicate, timeout=300, proc=None, what="condition", interval=0.05):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (exit {proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))


def final_params(run_dir: Path) -> dict:
    return torch.load(run_dir / "final_model.pt", weights_only=True)


def metric_rows(run_dir: Path, drop=WALL_FIELDS) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(Path(run_dir) / "metrics.jsonl")]


def assert_bitwise(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max {float((a[k] - b[k]).abs().max())})"

