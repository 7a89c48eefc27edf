"""The streamed path against a plain DataLoader: an ImageFolder of 2,000 generated JPEGs, at 32x32 and at
224x224, 2 processes (torchrun, gloo), one worker per rank for both.

* baseline: DataLoader(ImageFolder with Resize, CenterCrop, RandomCrop(padding), RandomHorizontalFlip,
  ToTensor, Normalize; DistributedSampler, shuffle=True) + a DDP loop;
* qhm-launch: data.dataset imagefolder (the same deterministic transforms in the worker, then the keyed
  crop and flip per sample), the same model through model.factory.

Training samples/s per epoch (the first epoch of each run is a warm-up); medians over alternating
rounds; the ratio. A tiny convolutional net keeps the model's share small: this measures the data path.

    .venv/bin/python benchmarks/streamed_data.py
"""
import statistics
import tempfile
import time
from pathlib import Path

ROUNDS, EPOCHS, IMAGES, CLASSES, BATCH, WORKERS = 2, 3, 2000, 10, 64, 1


def tiny(classes: int = CLASSES):
    import torch.nn as nn
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes))


def write_images(root: Path, size: int):
    import numpy as np
    from PIL import Image
    g = np.random.default_rng(0)
    for split, count in (("train", IMAGES), ("val", 200)):
        for i in range(count):
            folder = root / split / f"c{i % CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)


def baseline(comm, root: Path, size: int):
    import torch
    import torch.nn.functional as F
    import torchvision.transforms as T
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, DistributedSampler
    from torchvision.datasets import ImageFolder
    import qhm
    from launcher.data.imagefolder import MEAN, STD
    t = T.Compose([T.Resize(size), T.CenterCrop(size), T.RandomCrop(size, padding=max(1, size // 8)),
                   T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    data = ImageFolder(str(root / "train"), transform=t)
    sampler = DistributedSampler(data, shuffle=True)
    loader = DataLoader(data, batch_size=BATCH // comm.world, sampler=sampler, num_workers=WORKERS,
                        persistent_workers=True)
    torch.manual_seed(0)
    model = DDP(tiny())
    opt = qhm.QHM(model.parameters(), lr=0.05, beta=0.9, gamma=0.7)
    rates = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        t0, seen = time.time(), 0
        for x, y in loader:
            loss = F.cross_entropy(model(x), y, reduction="sum") * comm.world / BATCH
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen += len(y) * comm.world
        rates.append(seen / (time.time() - t0))
    return rates[1:]


def ours(comm, root: Path, size: int, folder: str):
    from launcher import config as R
    from launcher.run.files import read_jsonl
    from launcher.train.trainer import run
    r = R.from_dict({"name": "bench", "output": folder, "epochs": EPOCHS, "seed": 0,
                     "data": {"dataset": "imagefolder", "root": str(root), "image_size": size, "workers": WORKERS},
                     "model": {"factory": "streamed_data:tiny"},
                     "schedule": {"batch": {"kind": "constant", "size": BATCH}, "lr": {"max": 0.05}},
                     "distributed": {"nproc_per_node": comm.world, "max_micro_batch": BATCH},
                     "eval": {"every_epochs": 1000, "full_grad_norm": False},
                     "checkpoint": {"every_steps": 0, "keep": 1},
                     "tracking": {"wandb": {"mode": "disabled"}, "log_every_steps": 0}})
    run(r, comm, log=lambda *a, **k: None)
    return [row["samples_per_s"] for row in read_jsonl(Path(folder) / "bench" / "metrics.jsonl")][1:]


def worker():
    from launcher.train import comm as comm_mod
    comm = comm_mod.init()
    lines = []
    for size in (32, 224):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(comm.broadcast(tmp if comm.is_main else None)) / "images"
            if comm.is_main:
                write_images(root, size)
            comm.barrier()
            base, mine = [], []
            for r in range(ROUNDS):
                if r % 2 == 0:
                    base += baseline(comm, root, size)
                mine += ours(comm, root, size, str(root.parent / f"run{r}"))
                comm.barrier()
                if r % 2 == 1:
                    base += baseline(comm, root, size)
            b, m = statistics.median(base), statistics.median(mine)
            lines.append(f"| {size}x{size} | {b:,.0f} | {m:,.0f} | {m / b:.3f} |")
    if comm.is_main:
        print(f"| images ({IMAGES} JPEGs, batch {BATCH}, 2 ranks x {WORKERS} worker) | plain DataLoader + DDP "
              "(samples/s) | qhm-launch streamed (samples/s) | ratio |\n|---|---|---|---|")
        print("\n".join(lines))
    comm.close()


if __name__ == "__main__":
    from torchrun_self import main
    main(__file__, worker)
