"""Launcher overhead: our trainer vs a bare hand-written DDP loop, same model, data and global batch.

2 processes on CPU (gloo), global batch 256 = micro 32 x accumulation 4 x 2 ranks. Rounds alternate
between the two; each reports training samples/s per epoch (evaluation excluded); medians and the
ratio. A DDP comm hook counts gradient all-reduces per optimizer step in our trainer.

    .venv/bin/python benchmarks/launcher_overhead.py      # starts torchrun itself
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROUNDS, EPOCHS, N, BATCH, MICRO = 3, 3, 4096, 256, 32


def bare_loop(comm, epochs):
    """The baseline: DDP, no_sync on all but the last micro-batch, plain SGD-style loop with QHM."""
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    import qhm
    from launcher import data as D, models
    ds = D.load(D.Data(dataset="synthetic", size=N, augment=False), comm.device, torch.float32)
    model = DDP(models.build("small_cnn", ds.shape, 10, 0, torch.float32))
    opt = qhm.QHM(model.parameters(), lr=0.05, beta=0.9, gamma=0.7)
    per_rank = BATCH // comm.world
    rates = []
    for epoch in range(epochs):
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(epoch))
        t0, seen = time.time(), 0
        for start in range(0, N, BATCH):
            idx = perm[start:start + BATCH]
            mine = idx[comm.rank * per_rank:(comm.rank + 1) * per_rank]
            chunks = mine.split(MICRO)
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


def ours(comm, epochs, folder, counter):
    import json
    from launcher import recipe as R, trainer
    r = R.from_dict({"name": "bench", "output": str(folder), "epochs": epochs, "seed": 0,
                     "data": {"dataset": "synthetic", "size": N, "augment": False},
                     "schedule": {"batch": {"kind": "constant", "size": BATCH}, "lr": {"max": 0.05}},
                     "distributed": {"nproc_per_node": comm.world, "max_micro_batch": MICRO},
                     "eval": {"every_epochs": 1000, "full_grad_norm": False},
                     "tracking": {"wandb": {"mode": "disabled"}}})
    trainer.train(r, comm, log=lambda *a, **k: None)
    rows = [json.loads(x) for x in (Path(folder) / "bench" / "metrics.jsonl").read_text().splitlines()]
    return [row["samples_per_s"] for row in rows][1:], rows[-1]["step"]


def worker():
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from launcher import comm as comm_mod, engines
    comm = comm_mod.init()
    calls = {"n": 0}

    def counting_hook(state, bucket):
        calls["n"] += 1
        return default_hooks.allreduce_hook(state, bucket)

    original = engines.DDPEngine.__init__

    def patched(self, *a, **k):
        original(self, *a, **k)
        self.model.register_comm_hook(None, counting_hook)
    engines.DDPEngine.__init__ = patched

    bare, mine, steps_total = [], [], 0
    for r in range(ROUNDS):
        bare += bare_loop(comm, EPOCHS)
        with tempfile.TemporaryDirectory() as tmp:
            folder = comm.broadcast(tmp if comm.is_main else None)
            rates, steps = ours(comm, EPOCHS, folder, calls)
            mine += rates
            steps_total += steps
            comm.barrier()
    if comm.is_main:
        b, m = statistics.median(bare), statistics.median(mine)
        print(f"| bare DDP loop | {b:,.0f} samples/s |")
        print(f"| qhm-launch trainer | {m:,.0f} samples/s |")
        print(f"| ratio (ours / bare) | {m / b:.3f} |")
        print(f"| gradient all-reduces per optimizer step (accum 4) | {calls['n'] / steps_total:.2f} |")
    comm.close()


if __name__ == "__main__":
    if "RANK" in os.environ:
        worker()
    else:
        sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  "--nproc_per_node=2", __file__], cwd=Path(__file__).resolve().parents[1]))
