"""Optimizer step time: torch SGD (loop, foreach, fused) vs our QHM (loop, foreach, fused) vs the paper's
per-parameter QHM, on ResNet-18's parameter set and on 200 tensors of 4,096 floats, 1 and 2 threads.

Interleaved in one process (every round times each method once), medians over rounds, ratios to
SGD-foreach, and effective GB/s at 20 bytes per element (read p, g, d; write p, d).

    .venv/bin/python benchmarks/optimizer_step.py [--rounds 30]
"""
import argparse
import statistics
import time

import torch
import torchvision

from qhm import QHM


class PaperQHM(torch.optim.Optimizer):
    """A transcription of the paper code's optimizer for this benchmark: a per-parameter Python loop
    with two buffers (d and m) and temporaries every step."""

    def __init__(self, params, lr, beta, gamma):
        super().__init__(params, dict(lr=lr, beta=beta, gamma=gamma))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "d" not in state:
                    state["d"] = torch.zeros_like(p)
                    state["m"] = torch.zeros_like(p)
                d = (1 - group["beta"]) * p.grad + group["beta"] * state["d"]
                m = (1 - group["gamma"]) * p.grad + group["gamma"] * d
                state["d"], state["m"] = d, m
                p.add_(-group["lr"] * m)


def param_sets():
    resnet = [p.detach().clone() for p in torchvision.models.resnet18(num_classes=100).parameters()]
    small = [torch.randn(4096) for _ in range(200)]
    return {"resnet18 (11.2M)": resnet, "200 x 4096": small}


def methods():
    mom = dict(lr=0.1, momentum=0.9)
    return {
        "sgd loop": lambda ps: torch.optim.SGD(ps, foreach=False, **mom),
        "sgd foreach": lambda ps: torch.optim.SGD(ps, foreach=True, **mom),
        "sgd fused": lambda ps: torch.optim.SGD(ps, fused=True, **mom),
        "qhm loop": lambda ps: QHM(ps, lr=0.1, beta=0.9, gamma=0.7, foreach=False),
        "qhm foreach": lambda ps: QHM(ps, lr=0.1, beta=0.9, gamma=0.7, foreach=True),
        "qhm fused": lambda ps: QHM(ps, lr=0.1, beta=0.9, gamma=0.7, fused=True),
        "paper qhm": lambda ps: PaperQHM(ps, lr=0.1, beta=0.9, gamma=0.7),
    }


def floor_time(numel: int) -> float:
    """Streaming floor: seconds to move 20 bytes per element at this machine's measured bandwidth."""
    a, b, c = torch.randn(numel), torch.randn(numel), torch.empty(numel)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        torch.add(a, b, out=c)                  # 12 bytes per element
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 20 / 12


def bench(params, threads: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    opts = {}
    for name, make in methods().items():
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        opt = make(ps)
        for _ in range(3):                      # warm-up (and the fused path's one-time compile)
            opt.step()
        opts[name] = opt
    times = {name: [] for name in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    numel = sum(p.numel() for p in params)
    out = {name: statistics.median(t) for name, t in times.items()}
    out["streaming floor"] = floor_time(numel)
    return out, numel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available")
    print("| parameter set | threads | method | median ms/step | vs SGD-foreach | GB/s (20 B/elem) |")
    print("|---|---|---|---|---|---|")
    for set_name, params in param_sets().items():
        for threads in (1, 2):
            med, numel = bench(params, threads, args.rounds)
            base = med["sgd foreach"]
            for name, t in med.items():
                print(f"| {set_name} | {threads} | {name} | {t * 1e3:.3f} | {t / base:.2f}x | "
                      f"{numel * 20 / t / 1e9:.1f} |")


if __name__ == "__main__":
    main()
