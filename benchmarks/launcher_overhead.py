"""Launcher overhead: our trainer vs a bare hand-written DDP loop, same model, data and global batch.

2 processes on CPU (gloo), three configurations: a tiny model (two 3x3 convolutions of width 16: a step
that is mostly host work) and the built-in small CNN at global batch 8 = micro 4 x accumulation 1 x 2
ranks (the paper's first stage, where per-step overhead is what one waits for), and the small CNN at
global batch 256 = micro 32 x accumulation 4 x 2. Three loops live side by side in each process: the bare
loop, our trainer with the gradient noise scale measured (the default: each rank's gradient is read at
the end of backward, before DDP's reduced one lands) and our trainer without it
(``tracking.noise_scale: false``). They take turns in short blocks of steps (which goes first rotates),
each block after a barrier, so a drift of the machine reaches all three alike; epoch ends (our trainer's
epoch row and the bare loop's new permutation) fall between blocks, outside the clocks.

Two measures per block, both reported as medians over the blocks of every rank:

- samples/s (wall clock), and the ratio to the bare loop's block of the same round;
- host time per step: the CPU time of the thread that issues the work (``time.thread_time``, log points
  and stop checks included), and what the launcher adds to the bare loop's: the median of the paired
  differences (same round, same rank), with the mean and its standard error. On this 2-core machine two
  ranks and their gloo threads share the cores, so a single block moves by +-100 us a step; the pairing
  and a few hundred blocks bring the median's error to a few us (docs/benchmarks.md).

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

CONFIGS = [  # (model, global batch, micro-batch, steps per epoch, steps per block, rounds)
    ("tiny", 8, 4, 256, 32, 300),
    ("small_cnn", 8, 4, 256, 32, 150),
    ("small_cnn", 256, 32, 16, 8, 40),
]
WARM_UP_BLOCKS = 4
LOOPS = ("bare", "off", "default")       # the bare loop; ours with the noise scale off; ours as it comes


def build_model(name, shape):
    import torch
    from launcher.train import models
    from step_profile import tiny_model
    if name == "tiny":
        torch.manual_seed(0)
        return tiny_model()
    return models.build(name, shape, 10, 0, torch.float32)


class BareLoop:
    """The baseline: DDP, no_sync on all but the last micro-batch, a plain loop with QHM."""

    def __init__(self, comm, model_name, batch, micro, n):
        import torch
        from torch.nn.parallel import DistributedDataParallel as DDP
        import qhm
        from launcher import data as D
        self.comm, self.batch, self.micro, self.n = comm, batch, micro, n
        self.ds = D.load(D.Data(dataset="synthetic", size=n, augment=False), comm.device, torch.float32)
        self.model = DDP(build_model(model_name, self.ds.shape))
        self.opt = qhm.QHM(self.model.parameters(), lr=0.05, beta=0.9, gamma=0.7)
        self.steps, self.epoch, self.step = n // batch, -1, n // batch

    def next_epoch_if_done(self) -> None:
        import torch
        if self.step == self.steps:
            self.epoch, self.step = self.epoch + 1, 0
            self.perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch))

    def run(self, count: int) -> None:
        import torch
        import torch.nn.functional as F
        comm, model, per_rank = self.comm, self.model, self.batch // self.comm.world
        for _ in range(count):
            idx = self.perm[self.step * self.batch:(self.step + 1) * self.batch]
            mine = idx[comm.rank * per_rank:(comm.rank + 1) * per_rank]
            chunks = mine.split(self.micro)
            for i, c in enumerate(chunks):
                ctx = model.no_sync() if i < len(chunks) - 1 else torch.enable_grad()
                with ctx:
                    loss = F.cross_entropy(model(self.ds.train.images[c]), self.ds.train.labels[c], reduction="sum")
                    (loss * comm.world / len(idx)).backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1

    def close(self) -> None:
        pass


def bare_loop(comm, epochs, model_name, batch, micro, n) -> list:
    """The bare loop for ``epochs`` epochs: samples/s of each epoch after the first."""
    loop, rates = BareLoop(comm, model_name, batch, micro, n), []
    for _ in range(epochs):
        loop.next_epoch_if_done()
        t0 = time.time()
        loop.run(loop.steps)
        rates.append(n / (time.time() - t0))
    return rates[1:]


def recipe(folder, world, epochs, model_name, batch, micro, n, noise) -> dict:
    return {"name": "bench", "output": str(folder), "epochs": epochs, "seed": 0,
            "data": {"dataset": "synthetic", "size": n, "augment": False},
            "model": model_name if model_name != "tiny" else {"factory": "step_profile:tiny_model"},
            "schedule": {"batch": {"kind": "constant", "size": batch}, "lr": {"max": 0.05}},
            "distributed": {"nproc_per_node": world, "max_micro_batch": micro},
            "eval": {"every_epochs": 1000, "full_grad_norm": False},
            "checkpoint": {"every_steps": 0, "keep": 1},
            "tracking": {"wandb": {"mode": "disabled"}, "noise_scale": noise}}


class OurLoop:
    """Our trainer in this process, stepped as Trainer.train steps it (no evaluation, no checkpoints:
    its last epoch, which evaluates, is never reached)."""

    def __init__(self, comm, folder, model_name, batch, micro, n, noise):
        from launcher import config as R
        from launcher.train.build import build
        from launcher.train.signals import PreemptionFlag
        from launcher.train.trainer import Trainer
        self.trainer = Trainer(build(R.from_dict(recipe(folder, comm.world, 1000, model_name, batch, micro, n,
                                                        noise)), comm, lambda *a, **k: None), PreemptionFlag([]))
        self.trainer.resume()
        self.epoch, self.step, self.steps = -1, 0, 0

    def next_epoch_if_done(self) -> None:
        if self.step == self.steps:
            if self.epoch >= 0:
                self.trainer.end_epoch(self.epoch)
            self.epoch, self.step = self.epoch + 1, 0
            self.steps = self.trainer.start_epoch(self.epoch).steps

    def run(self, count: int) -> None:
        from step_profile import loop_steps
        loop_steps(self.trainer, self.epoch, range(self.step, self.step + count))
        self.step += count

    def close(self) -> None:
        self.trainer.close(None)


def every_rank(values: list) -> list:
    """``values`` of every rank, concatenated."""
    import torch.distributed as dist
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    return [v for rank_values in gathered for v in rank_values]


def compare(comm, folder, model_name, batch, micro, steps, block, rounds) -> str:
    """One configuration's three loops in turns; its table row."""
    n = steps * batch
    loops = {"bare": BareLoop(comm, model_name, batch, micro, n),
             "off": OurLoop(comm, Path(folder) / "off", model_name, batch, micro, n, False),
             "default": OurLoop(comm, Path(folder) / "default", model_name, batch, micro, n, True)}
    rate, host = {k: [] for k in LOOPS}, {k: [] for k in LOOPS}
    for r in range(-WARM_UP_BLOCKS, rounds):
        for k in LOOPS[r % 3:] + LOOPS[:r % 3]:                # rotate which loop goes first
            loop = loops[k]
            loop.next_epoch_if_done()
            comm.barrier()
            wall, cpu = time.perf_counter(), time.thread_time()
            loop.run(block)
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            if r >= 0:
                rate[k].append(block * batch / wall)
                host[k].append(cpu / block * 1e6)
    for loop in loops.values():
        loop.close()
    rate, host = ({k: every_rank(v[k]) for k in LOOPS} for v in (rate, host))
    ratio = lambda k: statistics.median(o / b for o, b in zip(rate[k], rate["bare"]))  # noqa: E731
    extra = {k: [o - b for o, b in zip(host[k], host["bare"])] for k in ("off", "default")}
    shown = lambda d: (f"{statistics.median(d):+.0f} ({statistics.mean(d):+.0f} ± "  # noqa: E731
                       f"{statistics.stdev(d) / len(d) ** 0.5:.0f})")
    split = f"{micro} x {batch // micro // comm.world} x {comm.world}"
    return (f"| {model_name} | {batch} = {split} | {statistics.median(rate['bare']):,.0f} | {ratio('off'):.3f} "
            f"| {ratio('default'):.3f} | {statistics.median(host['bare']):,.0f} | {shown(extra['off'])} "
            f"| {shown(extra['default'])} |")


def worker():
    from launcher.train import comm as comm_mod
    comm = comm_mod.init()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = comm.broadcast(tmp if comm.is_main else None)
        for i, config in enumerate(CONFIGS):
            lines.append(compare(comm, Path(folder) / str(i), *config))
            comm.barrier()
    if comm.is_main:
        print("| model | global batch (micro x accum x ranks) | bare DDP loop (samples/s) | ratio noise scale off "
              "/ bare | ratio default / bare | bare loop host us/step | extra host us/step, off: median (mean ± "
              "s.e.) | extra host us/step, default |")
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
    rates = bare_loop(comm, E2E_EPOCHS, "tiny", 8, 4, E2E_SAMPLES)
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
