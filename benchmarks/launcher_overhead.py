"""Launcher overhead: our trainer vs a bare hand-written DDP loop, same model, data and global batch.

2 processes on CPU (gloo), three configurations: a tiny model (two 3x3 convolutions of width 16: a step
that is mostly host work) and the built-in small CNN at global batch 8 = micro 4 x accumulation 1 x 2
ranks (the paper's first stage, where per-step overhead is what one waits for), and the small CNN at
global batch 256 = micro 32 x accumulation 4 x 2. Rounds alternate between the loops (which goes first
rotates); our trainer runs twice per round: with the gradient noise scale measured (the default: each
rank's gradient is read at the end of backward, before DDP's reduced one lands) and without
(``tracking.noise_scale: false``).

Two measures per epoch (the first epoch of each run dropped as warm-up), both reported as medians:

- training samples/s (wall clock; evaluation excluded), and the ratio to the bare loop;
- host time per step: the CPU time of the thread that issues the work (``time.thread_time`` over the
  epoch's steps, log points and stop checks included, divided by its steps), and what the launcher adds
  to the bare loop's: the median of paired differences (same round, rank and epoch), so a drift of the
  machine between rounds cancels. On this 2-core machine two ranks and their gloo threads share the
  cores, so wall time moves by +-150 us a step between runs; the issuing thread's CPU time moved by about
  15 us on a quiet day and by about 60 us on a noisy one (docs/benchmarks.md): compare runs of one day.

Then the same comparison end to end, for the tiny model at global batch 8: ``qhm-launch run`` (its
own torchrun, the model from a factory, metrics from its metrics.jsonl) against the bare loop started by
torchrun as a script, alternating, each with its own process start; samples/s of epochs after the first.

    .venv/bin/python benchmarks/launcher_overhead.py      # starts torchrun itself
    .venv/bin/python benchmarks/launcher_overhead.py --end-to-end     # only the end-to-end comparison
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROUNDS, EPOCHS = 6, 3
CONFIGS = [  # (model, global batch, micro-batch, training samples): the tiny model's step is mostly host work
    ("tiny", 8, 4, 2048),
    ("small_cnn", 8, 4, 2048),
    ("small_cnn", 256, 32, 4096),
]


def build_model(name, shape):
    import torch
    from launcher.train import models
    from step_profile import tiny_model
    if name == "tiny":
        torch.manual_seed(0)
        return tiny_model()
    return models.build(name, shape, 10, 0, torch.float32)


def bare_loop(comm, epochs, model_name, batch, micro, n):
    """The baseline: DDP, no_sync on all but the last micro-batch, a plain loop with QHM."""
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    import qhm
    from launcher import data as D
    ds = D.load(D.Data(dataset="synthetic", size=n, augment=False), comm.device, torch.float32)
    model = DDP(build_model(model_name, ds.shape))
    opt = qhm.QHM(model.parameters(), lr=0.05, beta=0.9, gamma=0.7)
    per_rank = batch // comm.world
    rates, host = [], []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        t0, cpu0, seen, steps = time.time(), time.thread_time(), 0, 0
        for start in range(0, n, batch):
            idx = perm[start:start + batch]
            mine = idx[comm.rank * per_rank:(comm.rank + 1) * per_rank]
            chunks = mine.split(micro)
            for i, c in enumerate(chunks):
                ctx = model.no_sync() if i < len(chunks) - 1 else torch.enable_grad()
                with ctx:
                    loss = F.cross_entropy(model(ds.train.images[c]), ds.train.labels[c], reduction="sum")
                    (loss * comm.world / len(idx)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen, steps = seen + len(idx), steps + 1
        rates.append(seen / (time.time() - t0))
        host.append((time.thread_time() - cpu0) / steps * 1e6)
    return rates[1:], host[1:]


def recipe(folder, world, epochs, model_name, batch, micro, n, noise) -> dict:
    return {"name": "bench", "output": str(folder), "epochs": epochs, "seed": 0,
            "data": {"dataset": "synthetic", "size": n, "augment": False},
            "model": model_name if model_name != "tiny" else {"factory": "step_profile:tiny_model"},
            "schedule": {"batch": {"kind": "constant", "size": batch}, "lr": {"max": 0.05}},
            "distributed": {"nproc_per_node": world, "max_micro_batch": micro},
            "eval": {"every_epochs": 1000, "full_grad_norm": False},
            "checkpoint": {"every_steps": 0, "keep": 1},
            "tracking": {"wandb": {"mode": "disabled"}, "noise_scale": noise}}


def ours(comm, epochs, folder, model_name, batch, micro, n, noise):
    """Our trainer in this process: (samples/s, host us/step) of each epoch after the first."""
    from launcher import config as R
    from launcher.run.files import read_jsonl
    from launcher.train.trainer import run
    HOST.clear()
    run(R.from_dict(recipe(folder, comm.world, epochs, model_name, batch, micro, n, noise)), comm,
        log=lambda *a, **k: None)
    rows = read_jsonl(Path(folder) / "bench" / "metrics.jsonl")
    return [row["samples_per_s"] for row in rows][1:], HOST[1:]


HOST: list = []        # our trainer's host us/step of each epoch of the run in progress


def time_epochs() -> None:
    """Wrap the trainer's epoch start and end to read the issuing thread's CPU time over each epoch's steps."""
    from launcher.train.trainer import Trainer
    start, end = Trainer.start_epoch, Trainer.end_epoch

    def timed_start(self, epoch):
        split = start(self, epoch)
        self.bench_clock = (time.thread_time(), split.steps - self.state.step)
        return split

    def timed_end(self, epoch):
        began, steps = self.bench_clock
        HOST.append((time.thread_time() - began) / steps * 1e6)
        return end(self, epoch)
    Trainer.start_epoch, Trainer.end_epoch = timed_start, timed_end


def every_rank(values: list) -> list:
    """``values`` of every rank, concatenated."""
    import torch.distributed as dist
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    return [v for rank_values in gathered for v in rank_values]


def worker():
    from launcher.train import comm as comm_mod
    comm = comm_mod.init()
    time_epochs()

    def ours_in_tmp(model_name, batch, micro, n, measure):
        with tempfile.TemporaryDirectory() as tmp:
            folder = comm.broadcast(tmp if comm.is_main else None)
            result = ours(comm, EPOCHS, folder, model_name, batch, micro, n, measure)
            comm.barrier()
        return result

    lines = []
    for model_name, batch, micro, n in CONFIGS:
        rates = {"bare": [], "plain": [], "measured": []}
        host = {"bare": [], "plain": [], "measured": []}
        for r in range(ROUNDS):           # rotate which loop goes first: no order bias
            loops = ["bare", "plain", "measured"]
            for which in loops[r % 3:] + loops[:r % 3]:
                if which == "bare":
                    got, cpu = bare_loop(comm, EPOCHS, model_name, batch, micro, n)
                else:
                    got, cpu = ours_in_tmp(model_name, batch, micro, n, which == "measured")
                rates[which] += got
                host[which] += cpu
        b, p, m = (statistics.median(rates[k]) for k in ("bare", "plain", "measured"))
        hb, hp, hm = (every_rank(host[k]) for k in ("bare", "plain", "measured"))
        extra = lambda ours: statistics.median(o - base for o, base in zip(ours, hb))  # noqa: E731  same round, rank, epoch
        split = f"{micro} x {batch // micro // comm.world} x {comm.world}"
        lines.append(f"| {model_name} | {batch} = {split} | {b:,.0f} | {p / b:.3f} | {m / b:.3f} "
                     f"| {statistics.median(hb):,.0f} | {extra(hp):+.0f} | {extra(hm):+.0f} |")
    if comm.is_main:
        print("| model | global batch (micro x accum x ranks) | bare DDP loop (samples/s) | ratio noise scale off "
              "/ bare | ratio default / bare | bare loop host us/step | extra host us/step, off "
              "| extra host us/step, default |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(lines), flush=True)
    comm.close()
    # the results are out: leave without the interpreter's teardown, which aborts now and then where a DDP
    # outlived its gloo group (docs/benchmarks.md; before e949e2d every trainer's DDP here did)
    os._exit(0)


E2E_ROUNDS, E2E_EPOCHS, E2E_SAMPLES = 5, 3, 8192     # tiny model, global batch 8 = 4 x 1 x 2


def bare_script() -> None:
    """Under torchrun (E2E_BARE set): the bare loop as a job of its own; prints its rates as JSON."""
    from launcher.train import comm as comm_mod
    comm = comm_mod.init()
    rates, _ = bare_loop(comm, E2E_EPOCHS, "tiny", 8, 4, E2E_SAMPLES)
    if comm.is_main:
        print("RATES " + json.dumps(rates), flush=True)
    comm.close()


def finished(command: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """``command`` run to its end; if it failed, its output's tail is printed before the error."""
    out = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"{' '.join(command[1:])} exited {out.returncode}:\n" + (out.stdout + out.stderr)[-6000:], flush=True)
        out.check_returncode()
    return out


def end_to_end() -> str:
    """``qhm-launch run`` against the bare loop as a torchrun script, each a fresh job, alternating."""
    import yaml
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]),
               WANDB_MODE="disabled")
    bare, ours_rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(E2E_ROUNDS):
            for which in (["bare", "ours"] if r % 2 == 0 else ["ours", "bare"]):
                if which == "bare":
                    out = finished([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2", str(Path(__file__).resolve())], here.parent,
                                   dict(env, E2E_BARE="1"))
                    bare += json.loads(out.stdout.split("RATES ", 1)[1].splitlines()[0])
                else:
                    folder = Path(tmp) / f"round{r}"
                    path = Path(tmp) / f"round{r}.yaml"
                    path.write_text(yaml.safe_dump(recipe(folder, 2, E2E_EPOCHS, "tiny", 8, 4, E2E_SAMPLES, True)))
                    finished([sys.executable, "-m", "launcher", "run", str(path)], here.parent, env)
                    rows = [json.loads(line) for line in (folder / "bench" / "metrics.jsonl").read_text().splitlines()]
                    ours_rates += [row["samples_per_s"] for row in rows][1:]
    b, o = statistics.median(bare), statistics.median(ours_rates)
    return ("| end to end: tiny, 8 = 4 x 1 x 2, noise scale on (the default) | bare loop as a torchrun job "
            f"{b:,.0f} samples/s | `qhm-launch run` {o:,.0f} samples/s | ratio {o / b:.3f} "
            f"| extra {1e6 * 8 / o - 1e6 * 8 / b:+.0f} us/step |")


if __name__ == "__main__":
    from torchrun_self import start
    if os.environ.get("E2E_BARE"):
        bare_script()
    elif "RANK" in os.environ:
        worker()
    else:
        if "--end-to-end" not in sys.argv and start(__file__) != 0:
            sys.exit(1)
        print("\n" + end_to_end())
