"""Launcher overhead: our trainer vs a bare hand-written DDP loop, same model, data and global batch.

2 processes on CPU (gloo), two configurations: global batch 8 = micro 4 x accumulation 1 x 2 ranks (the
paper's first stage, where per-step overhead is what one waits for) and global batch 256 = micro 32 x
accumulation 4 x 2. Rounds alternate between the two loops; each reports training samples/s per epoch
(evaluation excluded, the first epoch of each round dropped as warm-up); medians and the ratio. Our
trainer runs twice per round: with the gradient noise scale measured (the default: a DDP comm hook reads
each bucket before and after its all-reduce) and without (``tracking.noise_scale: false``); the last
column is what measuring costs. The hook also counts gradient all-reduces per optimizer step.

    .venv/bin/python benchmarks/launcher_overhead.py      # starts torchrun itself
"""
import statistics
import tempfile
import time
from pathlib import Path

ROUNDS, EPOCHS = 6, 3
CONFIGS = [  # (global batch, micro-batch, training samples)
    (8, 4, 2048),
    (256, 32, 4096),
]


def bare_loop(comm, epochs, batch, micro, n):
    """The baseline: DDP, no_sync on all but the last micro-batch, a plain loop with QHM."""
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    import qhm
    from launcher import data as D
    from launcher.train import models
    ds = D.load(D.Data(dataset="synthetic", size=n, augment=False), comm.device, torch.float32)
    model = DDP(models.build("small_cnn", ds.shape, 10, 0, torch.float32))
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


def ours(comm, epochs, folder, batch, micro, n, noise):
    from launcher import config as R
    from launcher.run.files import read_jsonl
    from launcher.train.trainer import run
    r = R.from_dict({"name": "bench", "output": str(folder), "epochs": epochs, "seed": 0,
                     "data": {"dataset": "synthetic", "size": n, "augment": False},
                     "schedule": {"batch": {"kind": "constant", "size": batch}, "lr": {"max": 0.05}},
                     "distributed": {"nproc_per_node": comm.world, "max_micro_batch": micro},
                     "eval": {"every_epochs": 1000, "full_grad_norm": False},
                     "checkpoint": {"every_steps": 0, "keep": 1},
                     "tracking": {"wandb": {"mode": "disabled"}, "noise_scale": noise}})
    run(r, comm, log=lambda *a, **k: None)
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

    def ours_in_tmp(batch, micro, n, measure):
        with tempfile.TemporaryDirectory() as tmp:
            folder = comm.broadcast(tmp if comm.is_main else None)
            rates, steps = ours(comm, EPOCHS, folder, batch, micro, n, measure)
            comm.barrier()
        return rates, steps

    lines = []
    for batch, micro, n in CONFIGS:
        bare, plain, measured, steps_total, calls["n"] = [], [], [], 0, 0
        for r in range(ROUNDS):           # rotate which loop goes first: no order bias
            loops = ["bare", "plain", "measured"]
            for which in loops[r % 3:] + loops[:r % 3]:
                if which == "bare":
                    bare += bare_loop(comm, EPOCHS, batch, micro, n)
                else:
                    rates, steps = ours_in_tmp(batch, micro, n, which == "measured")
                    (measured if which == "measured" else plain).extend(rates)
                    steps_total += steps if which == "measured" else 0
        b, p, m = (statistics.median(x) for x in (bare, plain, measured))
        split = f"{micro} x {batch // micro // comm.world} x {comm.world}"
        lines.append(f"| {batch} = {split} | {b:,.0f} | {p:,.0f} | {m:,.0f} | {m / b:.3f} | {calls['n'] / steps_total:.2f} "
                     f"| {m / p:.3f} |")
    if comm.is_main:
        print("| global batch (micro x accum x ranks) | bare DDP loop (samples/s) | qhm-launch, noise scale off "
              "(samples/s) | qhm-launch, default (samples/s) | ratio default / bare | gradient all-reduces per step "
              "| ratio noise scale on / off |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(lines))
    comm.close()


if __name__ == "__main__":
    from torchrun_self import main
    main(__file__, worker)
