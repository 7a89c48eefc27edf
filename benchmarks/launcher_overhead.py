"""Launcher overhead: our trainer vs a bare hand-written DDP loop, same model, data and global batch.

2 processes on CPU (gloo), three configurations: a tiny model (two 3x3 convolutions of width 16: a step
that is mostly host work) and the built-in small CNN at global batch 8 = micro 4 x accumulation 1 x 2
ranks (the paper's first stage, where per-step overhead is what one waits for), and the small CNN at
global batch 256 = micro 32 x accumulation 4 x 2. Rounds alternate between the loops; each reports
training samples/s per epoch (evaluation excluded, the first epoch of each round dropped as warm-up);
medians, the ratios, and the host time per step the launcher adds over the bare loop (us). Our
trainer runs twice per round: with the gradient noise scale measured (the default: a DDP comm hook reads
each bucket before and after its all-reduce) and without (``tracking.noise_scale: false``); the last
column is what measuring costs. The hook also counts gradient all-reduces per optimizer step.

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
    rates = []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        t0, seen = time.time(), 0
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
            seen += len(idx)
        rates.append(seen / (time.time() - t0))
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


def ours(comm, epochs, folder, model_name, batch, micro, n, noise):
    from launcher import config as R
    from launcher.run.files import read_jsonl
    from launcher.train.trainer import run
    run(R.from_dict(recipe(folder, comm.world, epochs, model_name, batch, micro, n, noise)), comm,
        log=lambda *a, **k: None)
    rows = read_jsonl(Path(folder) / "bench" / "metrics.jsonl")
    return [row["samples_per_s"] for row in rows][1:], rows[-1]["step"]


def worker():
    from launcher.train import comm as comm_mod
    from launcher.train import noise
    comm = comm_mod.init()
    calls = {"n": 0}
    original = noise.NoiseProbe.comm_hook

    def counting_hook(self, state, bucket):
        calls["n"] += 1
        return original(self, state, bucket)
    noise.NoiseProbe.comm_hook = counting_hook

    def ours_in_tmp(model_name, batch, micro, n, measure):
        with tempfile.TemporaryDirectory() as tmp:
            folder = comm.broadcast(tmp if comm.is_main else None)
            rates, steps = ours(comm, EPOCHS, folder, model_name, batch, micro, n, measure)
            comm.barrier()
        return rates, steps

    lines = []
    for model_name, batch, micro, n in CONFIGS:
        bare, plain, measured, steps_total, calls["n"] = [], [], [], 0, 0
        for r in range(ROUNDS):           # rotate which loop goes first: no order bias
            loops = ["bare", "plain", "measured"]
            for which in loops[r % 3:] + loops[:r % 3]:
                if which == "bare":
                    bare += bare_loop(comm, EPOCHS, model_name, batch, micro, n)
                else:
                    rates, steps = ours_in_tmp(model_name, batch, micro, n, which == "measured")
                    (measured if which == "measured" else plain).extend(rates)
                    steps_total += steps if which == "measured" else 0
        b, p, m = (statistics.median(x) for x in (bare, plain, measured))
        split = f"{micro} x {batch // micro // comm.world} x {comm.world}"
        extra = lambda rate: 1e6 * batch / rate - 1e6 * batch / b      # noqa: E731 - us per step over the bare loop
        lines.append(f"| {model_name} | {batch} = {split} | {b:,.0f} | {p:,.0f} | {m:,.0f} | {p / b:.3f} | {m / b:.3f} "
                     f"| {extra(p):+.0f} | {extra(m):+.0f} | {calls['n'] / steps_total:.2f} |")
    if comm.is_main:
        print("| model | global batch (micro x accum x ranks) | bare DDP loop (samples/s) | qhm-launch, noise scale off "
              "(samples/s) | qhm-launch, default (samples/s) | ratio off / bare | ratio default / bare "
              "| extra us/step, off | extra us/step, default | gradient all-reduces per step |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(lines))
    comm.close()


E2E_ROUNDS, E2E_EPOCHS, E2E_SAMPLES = 5, 3, 8192     # tiny model, global batch 8 = 4 x 1 x 2


def bare_script() -> None:
    """Under torchrun (E2E_BARE set): the bare loop as a job of its own; prints its rates as JSON."""
    from launcher.train import comm as comm_mod
    comm = comm_mod.init()
    rates = bare_loop(comm, E2E_EPOCHS, "tiny", 8, 4, E2E_SAMPLES)
    if comm.is_main:
        print("RATES " + json.dumps(rates), flush=True)
    comm.close()


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
                    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc_per_node=2", str(Path(__file__).resolve())], cwd=here.parent,
                                         env=dict(env, E2E_BARE="1"), capture_output=True, text=True, check=True)
                    bare += json.loads(out.stdout.split("RATES ", 1)[1].splitlines()[0])
                else:
                    folder = Path(tmp) / f"round{r}"
                    path = Path(tmp) / f"round{r}.yaml"
                    path.write_text(yaml.safe_dump(recipe(folder, 2, E2E_EPOCHS, "tiny", 8, 4, E2E_SAMPLES, True)))
                    subprocess.run([sys.executable, "-m", "launcher", "run", str(path)], cwd=here.parent, env=env,
                                   capture_output=True, text=True, check=True)
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
