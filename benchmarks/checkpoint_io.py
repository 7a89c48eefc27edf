"""Checkpoint cost: our atomic, checksummed save/load of ResNet-18 + QHM state vs plain torch.save /
torch.load of the same state dicts (same run, interleaved, medians), and training throughput with a
checkpoint every 100 steps vs none (small CNN, one process).

    .venv/bin/python benchmarks/checkpoint_io.py
"""
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import qhm
from launcher import config as R
from launcher.train import trainer
from launcher.run.checkpoint import CheckpointManager
from launcher.run.folder import RunFolder
from launcher.train.state import RankRNG
from launcher.train.comm import Comm

SOLO = Comm(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


def resnet_state():
    model = torchvision.models.resnet18(num_classes=100)
    opt = qhm.QHM(model.parameters(), lr=0.1, beta=0.9, gamma=0.7)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return {"engine": {"model": model.state_dict(), "optimizer": opt.state_dict()}}


class Held:
    """A replicated checkpoint part holding a fixed state (the engine's, here)."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def save_load(rounds=15):
    state = resnet_state()
    ours_save, ours_load, plain_save, plain_load = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manager = CheckpointManager(RunFolder(tmp / "run"), SOLO, keep=2, log=lambda *a: None)
        manager.register("engine", Held(state["engine"]), "replicated")
        manager.register("rng", RankRNG(0, 0), "per_rank")
        for i in range(rounds):
            t0 = time.perf_counter()
            manager.save(i + 1, {"position": {}, "recipe": {}})
            ours_save.append(time.perf_counter() - t0)
            manager.wait()            # the old checkpoint's removal runs in the background; not timed
            t0 = time.perf_counter()
            manager.resume()          # find the newest, verify every file, load every part
            ours_load.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch.save(state, tmp / "plain.pt")
            plain_save.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch.load(tmp / "plain.pt", weights_only=True)
            plain_load.append(time.perf_counter() - t0)
        size = (tmp / "plain.pt").stat().st_size
    m = statistics.median
    print(f"ResNet-18 + QHM state, {size / 1e6:.0f} MB")
    print("| operation | qhm-launch (atomic, fsync, xxh3) | plain torch | ratio |")
    print("|---|---|---|---|")
    print(f"| save | {m(ours_save) * 1e3:.0f} ms | {m(plain_save) * 1e3:.0f} ms | {m(ours_save) / m(plain_save):.2f}x |")
    print(f"| load (verify + load) | {m(ours_load) * 1e3:.0f} ms | {m(plain_load) * 1e3:.0f} ms | "
          f"{m(ours_load) / m(plain_load):.2f}x |")


def throughput(every_steps):
    with tempfile.TemporaryDirectory() as tmp:
        r = R.from_dict({"name": "b", "output": tmp, "epochs": 3, "data": {"dataset": "synthetic", "size": 8192},
                         "schedule": {"batch": {"kind": "constant", "size": 32}},
                         "eval": {"every_epochs": 100, "full_grad_norm": False},
                         "checkpoint": {"every_steps": every_steps, "keep": 3},
                         "tracking": {"wandb": {"mode": "disabled"}}})
        trainer.run(r, SOLO, log=lambda *a, **k: None)
        rows = [json.loads(x) for x in (Path(tmp) / "b" / "metrics.jsonl").read_text().splitlines()]
        return statistics.median(row["samples_per_s"] for row in rows)


if __name__ == "__main__":
    torch.set_num_threads(1)
    save_load()
    none, every = [], []
    for _ in range(2):
        none.append(throughput(0))
        every.append(throughput(100))
    a, b = statistics.median(none), statistics.median(every)
    print(f"| training, small CNN, batch 32, 1 process | no checkpoints {a:,.0f} samples/s | "
          f"every 100 steps {b:,.0f} samples/s | {b / a:.3f}x |")
