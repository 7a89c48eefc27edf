"""What keeping DDP's bucket layout fixed costs on 3 processes: the DDP engine wraps the model and sets
``find_unused_parameters`` on more than two ranks (launcher/engines/ddp.py, _FixedBuckets), which
costs a walk of the autograd graph in every synchronised forward. Same model (the built-in GPT, 4
layers), same data and AdamW, 3 CPU processes (gloo) in one torchrun job: the two DDP set-ups take
turns, a block of steps each, several rounds; the median step time of each, and their ratio.

    .venv/bin/python benchmarks/ddp_fixed_buckets.py [--rounds 5]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEQ, LAYERS, HEADS, WIDTH, VOCAB, MICRO, STEPS = 64, 4, 4, 128, 256, 8, 20


def worker(rounds: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from launcher.engines.ddp import _FixedBuckets
    from launcher.models.gpt import GPT
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    setups = {}
    for name in ("default", "fixed"):
        module = GPT(VOCAB, SEQ, LAYERS, HEADS, WIDTH)
        model = DDP(_FixedBuckets(module), find_unused_parameters=True) if name == "fixed" else DDP(module)
        setups[name] = (model, torch.optim.AdamW(module.parameters(), lr=1e-3, foreach=True))
    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)
    times = {name: [] for name in setups}
    for r in range(rounds + 1):                  # round 0 warms up (and rebuilds the default's buckets)
        for name in (("default", "fixed") if r % 2 else ("fixed", "default")):
            model, opt = setups[name]
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(STEPS):
                logits = model(tokens[:, :-1])
                torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            dist.barrier()
            if r:
                times[name].append((time.perf_counter() - t0) / STEPS)
    if rank == 0:
        print("RESULT " + json.dumps({k: statistics.median(v) for k, v in times.items()}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args()
    if args.worker:
        return worker(args.rounds)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                          __file__, "--worker", "--rounds", str(args.rounds)], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        sys.exit(f"benchmark failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    t = json.loads(lines[0][7:])
    print(f"3 CPU processes (gloo), GPT {LAYERS}x{WIDTH}, micro-batch {MICRO}x{SEQ} tokens, {args.rounds} rounds "
          f"of {STEPS} steps each")
    print(f"  DDP default       {1000 * t['default']:8.2f} ms/step")
    print(f"  DDP fixed buckets {1000 * t['fixed']:8.2f} ms/step   ratio fixed/default {t['fixed'] / t['default']:.3f}")


if __name__ == "__main__":
    main()
