"""One prepared GPU check (run once on a CUDA machine; prints SKIP elsewhere). ``--smoke`` runs the same
code paths on CPU with tiny sizes, to check the script itself before spending device time.

1. QHM's CUDA kernels (foreach, compiled) against the CPU loop (float64).
2. Host syncs in qhm-launch's steady-state step: 300 steps under torch.cuda.set_sync_debug_mode("warn"),
   each synchronising call counted (target: 0).
3. Steps/s side by side, ResNet-18 (CIFAR stem) on CIFAR-shaped random data (3x32x32, 100 classes), bf16:
   the paper-style loop (per-parameter Python QHM with two buffers; DataLoader with 2 workers over uint8
   images, RandomCrop/Flip/Rotation(15) transforms, rebuilt every epoch), a bare torch loop (data on the
   GPU, channels_last, torch.compile, QHM foreach), and qhm-launch (channels_last, compile) at batch 8,
   128, 1024. Then every stage batch of the paper's schedule (8..4096) for the paper-style loop and
   qhm-launch (channels_last, no compile: one run through all stages), projected to one 300-epoch
   increasing-batch run (50,000 samples, 30 epochs per stage) on one GPU.

    python3 benchmarks/gpu_check.py [--smoke]
"""
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SMOKE = "--smoke" in sys.argv
DEVICE = torch.device("cpu" if SMOKE else "cuda")
N_CIFAR, EPOCHS_PER_STAGE = 50_000, 30
STAGES = [8 * 2 ** s for s in range(10)]                   # the paper's 8 -> 4096
MEASURED = [8, 128, 1024] if not SMOKE else [8, 16]
AMP = dict(device_type=DEVICE.type, dtype=torch.bfloat16)


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def resnet18():
    from launcher.train import models
    return models.build("resnet18", (3, 32, 32), 100, 0, torch.float32).to(DEVICE)


def steps_for(batch):
    return max(10, min(300, 20_000 // batch)) if not SMOKE else 3


# --------------------------------------------------------------------------------------- 1
def correctness():
    sys.path.insert(0, str(ROOT / "tests" / "qhm"))
    import test_optimizer as t
    for kw in ({"foreach": True}, {"compiled": True}):
        t.test_cuda_kernels_match_the_cpu_loop(kw)
        print(f"QHM {kw} on CUDA matches the CPU loop (float64, 50 steps, 1e-12): ok")


# --------------------------------------------------------------------------------------- 2
def qhm_launch_recipe(folder, batch, n, epochs=2, compile_mode="default", schedule=None):
    from launcher import config as R
    return R.from_dict({
        "name": f"b{batch}", "output": str(folder), "epochs": epochs, "seed": 0, "precision": "bf16",
        "model": "resnet18",
        "data": {"dataset": "synthetic", "size": n, "shape": [3, 32, 32], "classes": 100, "augment": True},
        "schedule": schedule or {"batch": {"kind": "constant", "size": batch}, "lr": {"max": 0.05}},
        "distributed": {"nproc_per_node": 1, "max_micro_batch": 4096},
        "performance": {"channels_last": True, "compile": compile_mode},
        "eval": {"every_epochs": 1000, "full_grad_norm": False, "batch_size": 1000},
        "checkpoint": {"every_steps": 0, "keep": 1},
        "tracking": {"wandb": {"mode": "disabled"}, "log_every_steps": 0}})


def host_syncs():
    """qhm-launch's steady state under set_sync_debug_mode("warn"): count the synchronising calls."""
    from launcher.train import comm as comm_mod
    from launcher.train import trainer as T
    from launcher.train.signals import PreemptionFlag
    steps, warm = (320, 20) if not SMOKE else (6, 2)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = qhm_launch_recipe(tmp, 128, 128 * steps, epochs=1, compile_mode="off")
        from launcher.train.build import build
        trainer = T.Trainer(build(recipe, comm_mod.init(), log=lambda *a, **k: None), PreemptionFlag([]))
        original, counted = trainer.train_step, {"steps": 0, "syncs": 0}

        def watched(epoch, step):
            if step < warm or DEVICE.type != "cuda":
                return original(epoch, step)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    original(epoch, step)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counted["steps"] += 1
            counted["syncs"] += sum("synchroniz" in str(w.message).lower() for w in caught)
        trainer.train_step = watched
        trainer.train()
    print(f"host syncs in {counted['steps']} steady-state steps of qhm-launch (batch 128, bf16): {counted['syncs']}")


# --------------------------------------------------------------------------------------- 3
def paper_style(batch, steps):
    """The paper's code, as REFERENCE.md describes it: per-parameter QHM with two buffers, DataLoader
    with 2 workers over uint8 images, torchvision transforms, rebuilt every epoch. Returns (steps/s,
    seconds to rebuild the loader and get its first batch)."""
    import numpy as np
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, Dataset

    class Images(Dataset):
        def __init__(self, n):
            g = np.random.default_rng(0)
            self.x, self.y = g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), g.integers(0, 100, n)
            self.t = T.Compose([T.ToPILImage(), T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                                T.RandomRotation(15), T.ToTensor(),
                                T.Normalize((0.507, 0.487, 0.441), (0.267, 0.256, 0.276))])

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.t(self.x[i]), int(self.y[i])

    model = resnet18()
    params = [p for p in model.parameters()]
    state = {p: {"d": torch.zeros_like(p), "m": torch.zeros_like(p)} for p in params}
    lr, beta, gamma = 0.05, 0.9, 0.7
    data = Images(batch * (steps + 5))
    t0 = time.time()
    loader = DataLoader(data, batch_size=batch, shuffle=True, num_workers=2)   # rebuilt every epoch
    it = iter(loader)
    x, y = next(it)
    rebuild = time.time() - t0
    done, start = 0, None
    for x, y in it:
        x, y = x.to(DEVICE), y.to(DEVICE)
        with torch.autocast(**AMP):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in params:                       # the paper's per-parameter Python QHM, two buffers
                d, m = state[p]["d"], state[p]["m"]
                d.mul_(beta).add_(p.grad, alpha=1 - beta)
                m.copy_((1 - gamma) * p.grad + gamma * d)
                p.add_(m, alpha=-lr)
        done += 1
        if done == 3:
            sync()
            start = time.time()
        if done == steps + 3:
            break
    sync()
    return (done - 3) / (time.time() - start), rebuild


def bare_loop(batch, steps):
    """A bare hand-written loop with the same precision and speed options: data on the device, random
    crop and flip there, channels_last, torch.compile, QHM foreach."""
    import qhm
    model = resnet18().to(memory_format=torch.channels_last)
    model.compile(dynamic=False)
    opt = qhm.QHM(model.parameters(), lr=0.05, beta=0.9, gamma=0.7, foreach=True)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x_all = torch.randn(batch * 4, 3, 32, 32, device=DEVICE, generator=g)
    y_all = torch.randint(0, 100, (batch * 4,), device=DEVICE, generator=g)
    rates = []
    for k in range(steps + 3):
        if k == 3:
            sync()
            t0 = time.time()
        idx = torch.randint(0, len(y_all), (batch,), device=DEVICE, generator=g)
        x = torch.nn.functional.pad(x_all[idx], (4, 4, 4, 4))
        dx, dy = (int(v) for v in torch.randint(0, 9, (2,), generator=torch.Generator().manual_seed(k)))
        x = x[:, :, dy:dy + 32, dx:dx + 32]
        x = torch.where(torch.rand(batch, 1, 1, 1, device=DEVICE, generator=g) < 0.5, x.flip(-1), x)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(**AMP):
            loss = torch.nn.functional.cross_entropy(model(x), y_all[idx], reduction="sum") / batch
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    rates.append(steps / (time.time() - t0))
    return rates[0]


def ours(batch, steps, compile_mode="default"):
    from launcher.train import comm as comm_mod
    from launcher.train import trainer as T
    from launcher.run.files import read_jsonl
    with tempfile.TemporaryDirectory() as tmp:
        recipe = qhm_launch_recipe(tmp, batch, batch * steps, compile_mode=compile_mode)
        T.run(recipe, comm_mod.init(), log=lambda *a, **k: None)
        rows = read_jsonl(Path(tmp) / f"b{batch}" / "metrics.jsonl")
    return rows[-1]["samples_per_s"] / batch                 # the second epoch: compiled, warm


def stage_rates_ours():
    """One qhm-launch run through every stage of the paper's schedule (channels_last, no compile)."""
    from launcher.train import comm as comm_mod
    from launcher.train import trainer as T
    from launcher.run.files import read_jsonl
    n = 40_960 if not SMOKE else 64
    stages = STAGES if not SMOKE else [8, 16, 32]
    with tempfile.TemporaryDirectory() as tmp:
        recipe = qhm_launch_recipe(tmp, 0, n, epochs=len(stages), compile_mode="off", schedule={
            "interval": 1, "batch": {"kind": "exponential", "initial": 8, "growth": 2}, "lr": {"max": 0.05}})
        T.run(recipe, comm_mod.init(), log=lambda *a, **k: None)
        rows = read_jsonl(Path(tmp) / "b0" / "metrics.jsonl")
    return {r["batch"]: r["samples_per_s"] / r["batch"] for r in rows}


def projection(rates: dict, rebuild: float = 0.0) -> float:
    """Hours for the paper's 300-epoch increasing-batch run: steps of each stage at that stage's rate."""
    seconds = sum(EPOCHS_PER_STAGE * math.ceil(N_CIFAR / b) / rates[b] for b in STAGES if b in rates)
    return (seconds + rebuild * EPOCHS_PER_STAGE * len(STAGES)) / 3600


def speed():
    print("| batch | paper-style loop (steps/s) | bare torch loop (steps/s) | qhm-launch (steps/s) | "
          "vs paper-style | vs bare |\n|---|---|---|---|---|---|")
    for b in MEASURED:
        p, _ = paper_style(b, steps_for(b))
        bare = bare_loop(b, steps_for(b))
        mine = ours(b, steps_for(b))
        print(f"| {b} | {p:.1f} | {bare:.1f} | {mine:.1f} | {mine / p:.2f}x | {mine / bare:.2f}x |", flush=True)
    ours_rates = stage_rates_ours()
    paper_rates, rebuilds = {}, []
    for b in (STAGES if not SMOKE else [8, 16, 32]):
        paper_rates[b], rebuild = paper_style(b, steps_for(b))
        rebuilds.append(rebuild)
    print("| stage batch | paper-style (steps/s) | qhm-launch, no compile (steps/s) |\n|---|---|---|")
    for b in sorted(ours_rates):
        print(f"| {b} | {paper_rates.get(b, float('nan')):.1f} | {ours_rates[b]:.1f} |")
    print(f"projected 300-epoch increasing-batch run on one {torch.cuda.get_device_name() if DEVICE.type == 'cuda' else 'CPU'}: "
          f"paper-style {projection(paper_rates, statistics.median(rebuilds)):.1f} h (with the loader rebuilt every "
          f"epoch, {statistics.median(rebuilds):.1f} s each), qhm-launch {projection(ours_rates):.1f} h "
          "(training only, evaluation excluded for both)")


if __name__ == "__main__":
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("SKIP: no CUDA device")
        sys.exit(0)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if DEVICE.type == 'cuda' else 'CPU (smoke)'}")
    if DEVICE.type == "cuda":
        correctness()
    host_syncs()
    speed()
