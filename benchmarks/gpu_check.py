"""One short GPU check (run on a CUDA machine; prints SKIP elsewhere):
1. QHM foreach / fused on CUDA against the CPU loop (float64), and the ResNet-18 step time of torch SGD
   (foreach, fused) vs QHM (foreach, fused), CUDA events, median of 50;
2. a short real run of the launcher on one GPU (nccl, bf16 autocast, ResNet-18), and the same in fp32.

    python3 benchmarks/gpu_check.py
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def step_times():
    import torchvision
    from qhm import QHM
    params = [p.detach().cuda() for p in torchvision.models.resnet18(num_classes=100).parameters()]
    make = {
        "sgd foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
        "sgd fused": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
        "qhm foreach": lambda ps: QHM(ps, lr=0.1, beta=0.9, gamma=0.7, foreach=True),
        "qhm fused": lambda ps: QHM(ps, lr=0.1, beta=0.9, gamma=0.7, fused=True),
    }
    opts = {}
    for name, f in make.items():
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        for p in ps:
            p.grad = torch.randn_like(p)
        opts[name] = f(ps)
        for _ in range(5):
            opts[name].step()
    times = {n: [] for n in opts}
    for _ in range(50):
        for name, opt in opts.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            opt.step()
            b.record()
            torch.cuda.synchronize()
            times[name].append(a.elapsed_time(b))
    numel = sum(p.numel() for p in params)
    base = statistics.median(times["sgd foreach"])
    for name, t in times.items():
        m = statistics.median(t)
        print(f"| {name} | {m:.3f} ms | {m / base:.2f}x | {numel * 20 / (m / 1e3) / 1e9:.0f} GB/s |")


def correctness():
    sys.path.insert(0, str(ROOT / "tests" / "qhm"))
    import test_optimizer as t
    for kw in ({"foreach": True}, {"fused": True}):
        t.test_cuda_kernels_match_the_cpu_loop(kw)
        print(f"QHM {kw} on CUDA matches the CPU loop (float64, 50 steps, 1e-12): ok")


def launcher_runs():
    for precision in ("bf16", "fp32"):
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run(
                [sys.executable, "-m", "launcher", "run", str(ROOT / "recipes" / "smoke.yaml"),
                 "--set", f"output={tmp}", "--set", "model=resnet18", "--set", f"precision={precision}",
                 "--set", "epochs=3", "--set", "schedule.interval=1", "--set", "distributed.nproc_per_node=1",
                 "--set", "tracking.wandb.mode=disabled", "--set", "checkpoint.every_steps=50"],
                cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            rows = [json.loads(x) for x in (Path(tmp) / "smoke" / "metrics.jsonl").read_text().splitlines()] \
                if out.returncode == 0 else []
            print(f"launcher on 1 GPU, resnet18, {precision}: exit {out.returncode}")
            for r in rows:
                print(f"  epoch {r['epoch']} batch {r['batch']} loss {r['train_loss']:.4f} test_acc {r['test_acc']:.4f} "
                      f"grad_norm {r['grad_norm']:.4f} samples/s {r['samples_per_s']:.0f}")
            if out.returncode:
                print(out.stdout[-2000:], out.stderr[-3000:])


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("SKIP: no CUDA device")
        sys.exit(0)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    correctness()
    print("| ResNet-18 step on CUDA | median | vs SGD-foreach | GB/s (20 B/elem) |\n|---|---|---|---|")
    step_times()
    launcher_runs()
