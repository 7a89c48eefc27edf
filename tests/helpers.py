"""Shared helpers: write recipes into tmp folders; run the real CLI (torchrun, gloo) on them, or train
the same recipe on real gloo ranks in-process (``train_ranks``) where the process tree is not what a
test is about; ``run_ranks`` runs any function on a real process group.

The ranks come from one pool of processes per session (spawned once, torch imported once): each call
makes a fresh gloo group (its own FileStore) on the first ``world`` of them, runs, and tears it down.
That is what makes the fast tier fast: a 2-process CLI run pays ~25 s of process start-up, a pool run
pays none."""
import atexit
import contextlib
import datetime
import importlib
import io
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import yaml

from launcher import keys
from launcher.env import UNTIL_STEP, alive
from launcher.run.files import read_jsonl
from launcher.run.tracking import WALL_FIELDS

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


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


VOCAB, T = 48, 16          # the language-model tests' token files: vocabulary, seq_len


def write_token_files(folder: Path) -> dict:
    """A training and a validation file of ids with structure to learn (each id mostly follows from the
    one before), nanoGPT's layout: flat uint16, and a meta.json with the vocabulary."""
    import json

    import numpy as np
    rng = np.random.default_rng(0)
    ids = [0]
    for _ in range(24_000):
        ids.append((ids[-1] * 7 + 3) % VOCAB if rng.random() < 0.8 else int(rng.integers(VOCAB)))
    ids = np.asarray(ids, dtype=np.uint16)
    ids[:20_000].tofile(folder / "train.bin")
    ids[20_000:].tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab": VOCAB, "dtype": "uint16"}))
    return {"train": str(folder / "train.bin"), "validation": str(folder / "val.bin"), "ids": ids}


def lm_recipe(token_files, name="lm", **over) -> dict:
    """A small language model on the token files: a 2-block GPT, AdamW with clipping, a batch that doubles at
    6K tokens, 12K tokens."""
    r = base_recipe(name=name, epochs=None, **{
        "data": {"dataset": "tokens", "train": token_files["train"], "validation": token_files["validation"],
                 "seq_len": T, "workers": 0},
        "model": {"name": "gpt", "layers": 2, "heads": 2, "width": 32},
        "optimizer": {"name": "adamw", "weight_decay": 0.1, "clip_grad_norm": 0.5},
        "train": {"tokens": "12K"}, "schedule.unit": "token",
        "schedule.batch": {"kind": "steps", "points": [[0, 16], ["6K", 32]]},
        "schedule.lr": {"kind": "wsd", "max": 3e-3, "min": 3e-4, "warmup": "1K", "decay": "4K"},
        "eval.every": "4K tokens", "eval.full_grad_norm": False, "eval.batch_size": 64,
        "checkpoint.every_steps": 0, "tracking.log_every_steps": 1})
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


def processes_with(*entries: str, unless: str | None = None) -> list[int]:
    """PIDs of live processes whose environment holds every ``NAME=value`` of ``entries`` (and not
    ``unless``): a run's processes all inherit what its launcher was started with, which is how a test
    finds the processes it started, and only those."""
    want = {e.encode() for e in entries}
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = set(Path(entry.path, "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if want <= environ and (unless is None or unless.encode() not in environ) and alive(int(entry.name)):
            out.append(int(entry.name))
    return out


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))


def rewound(run: Path, pristine: Path, recipe: dict, world: int) -> dict:
    """``run`` put back as ``pristine`` (a finished run's copy) with only its first checkpoint and no final
    model, and ``recipe`` on ``world`` processes: training it again resumes from that checkpoint."""
    shutil.rmtree(run)
    shutil.copytree(pristine, run)
    for path in (run / "final_model.pt", run / "complete.json"):
        path.unlink()
    for step in checkpoint_steps(run)[1:]:
        shutil.rmtree(run / "checkpoints" / f"step-{step:09d}")
    return {**recipe, "distributed": {**recipe["distributed"], "nproc_per_node": world}}


def close_params(a: dict, b: dict, rtol: float, atol: float) -> float:
    """Assert the two state dicts equal within the tolerances, key by key; the largest difference."""
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def final_params(run_dir: Path) -> dict:
    return torch.load(run_dir / "final_model.pt", weights_only=True)


def metric_rows(run_dir: Path, drop=WALL_FIELDS) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(Path(run_dir) / "metrics.jsonl")]


def killed_at_checkpoint(tmp_path: Path, recipe: dict, step: int, delay: str = "0.04") -> tuple[Path, Path]:
    """Start ``qhm-launch run`` on ``recipe`` (steps slowed by ``delay`` s), kill -9 its whole process tree
    once checkpoint ``step`` exists; (the recipe's path, the run folder), with no final model in it."""
    path = write_recipe(tmp_path, recipe)
    run = tmp_path / recipe.get("output", "runs") / recipe["name"]
    proc = start(["run", str(path)], cwd=tmp_path, env={"QHM_TEST_STEP_DELAY": delay})
    wait_for(lambda: step in checkpoint_steps(run), proc=proc, what=f"the checkpoint at global step {step}")
    kill_group(proc)
    assert not (run / "final_model.pt").exists()
    return path, run


def assert_kill_9_resumes_bitwise(tmp_path: Path, recipe: dict) -> None:
    """``recipe`` through torchrun, killed with SIGKILL (the whole tree) once its first checkpoint exists; the
    same command resumes it, and it ends bitwise (parameters, metrics rows) the run that never stopped,
    trained in-process on the pool as the reference."""
    reference = train_ranks({**recipe, "name": "reference"}, tmp_path)
    path, run = killed_at_checkpoint(tmp_path, recipe, checkpoint_steps(reference)[0], delay="0.1")
    done = cli(["run", str(path)], cwd=tmp_path, check=0)
    assert "resumed from" in done.stdout
    assert_bitwise(final_params(run), final_params(reference))
    assert metric_rows(run) == metric_rows(reference)


def worst_gap_to_a_switched_run(run_dir: Path, recipe: dict, step: int, before: int, after: int, cwd: Path) -> float:
    """How far ``run_dir``'s final parameters are from a reference that trained ``recipe`` on ``before``
    processes up to global ``step`` and on ``after`` from there, each leg uninterrupted (the largest
    absolute difference). The reference is run ``reference`` under ``cwd``, trained on pool ranks (what the
    run under test did through its process tree, the reference need not: two launches fewer)."""
    ref = {**recipe, "name": "reference", "distributed": {**recipe.get("distributed", {}), "nproc_per_node": before}}
    train_ranks(ref, cwd, {UNTIL_STEP: str(step)})
    train_ranks({**ref, "distributed": {**ref["distributed"], "nproc_per_node": after}}, cwd)
    got = final_params(run_dir)
    want = final_params(cwd / ref.get("output", "runs") / "reference")
    assert got.keys() == want.keys()
    return max(float((got[k].double() - want[k].double()).abs().max()) for k in got)


def assert_bitwise(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max {float((a[k] - b[k]).abs().max())})"



# ------------------------------------------------------------------------------------------------
# Real ranks in a pool of processes

def _serve(conn, paths: list) -> None:
    """A pool process: run one rank of each job it is sent, until it is sent None."""
    sys.path[:0] = paths
    import torch.distributed as dist
    from launcher.train.comm import Comm
    while True:
        job = conn.recv()
        if job is None:
            return
        fn, args, rank, world, store_dir = job
        cwd, environ, path = os.getcwd(), dict(os.environ), list(sys.path)
        output = io.StringIO()
        try:
            store = dist.FileStore(os.path.join(store_dir, "store"), world)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=120))
            control = dist.new_group(backend="gloo")
            comm = Comm(rank=rank, world=world, local_rank=rank, device=torch.device("cpu"), control=control)
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                try:
                    result = ("ok", fn(comm, *args))
                finally:
                    _forget_modules_under(os.getcwd())
            dist.barrier()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}\noutput:\n{output.getvalue()[-4000:]}")
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(environ)
            sys.path[:] = path
        try:
            conn.send((*result, output.getvalue()))
        except Exception as exc:  # noqa: BLE001 - a result that does not pickle
            conn.send(("error", f"the result of rank {rank} does not pickle: {exc}", output.getvalue()))


def _forget_modules_under(folder: str) -> None:
    """A job's own packages (a test's ``mypkg`` in its temp folder) must not be what the next job imports.
    Nothing of the project itself is ever forgotten, wherever its checkout is (a clone under /tmp too)."""
    root = str(ROOT)
    if folder == root or folder.startswith(root + os.sep) or root.startswith(folder + os.sep):
        return
    for name, module in list(sys.modules.items()):
        if (getattr(module, "__file__", None) or "").startswith(folder + os.sep):
            del sys.modules[name]


class RankPool:
    """Processes started once (spawn: torch imported once each), serving jobs one after another."""

    def __init__(self):
        self.ctx = multiprocessing.get_context("spawn")
        self.workers: list = []

    def _grow(self, n: int) -> None:
        paths = [str(HERE), str(HERE / "launcher"), str(HERE / "qhm"), str(ROOT)]
        while len(self.workers) < n:
            parent, child = self.ctx.Pipe()
            # not a daemon: a rank's DataLoader workers are its children
            proc = self.ctx.Process(target=_serve, args=(child, paths), daemon=False)
            proc.start()
            self.workers.append((proc, parent))

    def run(self, fn, world: int, *args, timeout: float = 600) -> list[tuple]:
        """[(result, output)] by rank."""
        self._grow(world)
        with tempfile.TemporaryDirectory() as store_dir:
            for rank in range(world):
                self.workers[rank][1].send((fn, args, rank, world, store_dir))
            results, deadline = [], time.time() + timeout
            for rank in range(world):
                proc, conn = self.workers[rank]
                if not conn.poll(max(0.0, deadline - time.time())):
                    self.close()                     # a rank hangs: the whole pool goes, the next call starts anew
                    raise AssertionError(f"rank {rank} of {world} did not finish within {timeout} s")
                results.append(conn.recv())
        failed = [(r, v) for r, (status, v, _) in enumerate(results) if status != "ok"]
        if failed:
            raise AssertionError(f"rank {failed[0][0]} failed: {failed[0][1]}")
        return [(v, out) for _, v, out in results]

    def close(self) -> None:
        for _, conn in self.workers:
            try:
                conn.send(None)
            except OSError:
                pass
        deadline = time.time() + 10                  # one wait for all: they were told at once
        for proc, _ in self.workers:
            proc.join(timeout=max(0.0, deadline - time.time()))
            if proc.is_alive():
                proc.kill()                          # only our own pool processes, by their handle
                proc.join()
        self.workers = []


POOL = RankPool()
atexit.register(POOL.close)


def run_ranks(fn, world: int, *args) -> list:
    """``fn(comm, *args)`` on ``world`` real gloo ranks; their results by rank. ``fn`` must be importable
    (a module-level function of a test module or of this one)."""
    return [value for value, _ in POOL.run(fn, world, *args)]


def _train_rank(comm, recipe: dict, cwd: str, env: dict):
    from launcher import config
    from launcher.train.worker import run_worker
    from launcher.config import factories
    os.chdir(cwd)
    before = dict(os.environ)
    os.environ.update(env)
    os.environ.setdefault("LOCAL_RANK", str(comm.rank))   # as torchrun sets it (DeepSpeed asks for it)
    try:
        factories.importable_from_cwd()              # as `qhm-launch run` does for its workers
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.world))  # as `run` sets OMP_NUM_THREADS
        resolved = config.from_dict(recipe)
        if comm.is_main:                             # what the launcher writes before its workers start
            resolved.folder.write_recipe(config.dump(resolved))
        comm.barrier()
        return run_worker(resolved, force=False, comm=comm)
    finally:                                         # a test's hooks never reach the pool's next job
        os.environ.clear()
        os.environ.update(before)
        if "deepspeed.utils.groups" in sys.modules:  # DeepSpeed caches this job's process groups in its globals
            importlib.reload(sys.modules["deepspeed.utils.groups"])


class Trained(type(Path())):
    """A run folder trained by :func:`train_ranks`; ``.output`` is what rank 0 printed."""
    output: str = ""


def train_ranks(recipe: dict, cwd, env: dict | None = None) -> Trained:
    """Train ``recipe`` on ``distributed.nproc_per_node`` real gloo ranks of the pool, through the worker's
    own lifecycle (lock, resume, markers, final model), in folder ``cwd``; returns the run folder."""
    world = recipe["distributed"]["nproc_per_node"]
    try:
        results = POOL.run(_train_rank, world, recipe, str(cwd), dict(env or {}))
    finally:
        d = recipe["distributed"]
        if d.get("engine") == "deepspeed" and d.get("zero_stage") == 3:
            # ZeRO-3 patches torch process-wide (F.linear, tensor constructors) and numbers modules from a
            # process-wide counter that every rank must agree on: a later job mixing these processes with
            # fresh ones (a larger world) would not be what torchrun's fresh workers run. They go.
            POOL.close()
    codes = [code for code, _ in results]
    assert codes == [0] * world, f"exit statuses {codes}\n{results[0][1][-4000:]}"
    run = Trained(Path(cwd) / recipe.get("output", "runs") / recipe["name"])
    run.output = results[0][1]
    return run


def bn_cnn(in_channels: int = 1, classes: int = 10) -> torch.nn.Module:
    """A model factory with batch norm (running statistics that each rank updates from its own samples)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(in_channels, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(4, classes))
