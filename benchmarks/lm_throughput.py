"""Tokens/s of ``qhm-launch run`` on the built-in GPT against a bare DDP loop with the same model, data,
optimizer and global batch: 2 CPU processes (gloo), each a fresh torchrun job, alternating (which goes
first alternates too), several rounds; the median tokens/s of each side over its steady steps, and
their ratio.

The bare loop is what a person writes by hand: ``init_process_group``, DDP, ``no_sync`` on all but the
last micro-batch, this rank's slice of a global batch read from the memory-mapped token file, torch's
AdamW (foreach), ``clip_grad_norm_``, cross-entropy mean over the micro-batch's tokens scaled to the
global batch. It skips what qhm-launch does besides (the keyed order's bookkeeping, the noise scale,
per-step rows, the stop agreement, checkpoints at the run's end only): the ratio is their cost.

    .venv/bin/python benchmarks/lm_throughput.py [--rounds 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SEQ, LAYERS, HEADS, WIDTH = 64, 2, 4, 128
BATCH, MICRO, STEPS, WARM = 32, 16, 160, 40          # global batch in sequences; steps timed after WARM


def token_file(folder: Path) -> Path:
    """A token file (byte-level ids of the Python standard library's sources), written once."""
    from launcher.data import tokens
    if not (folder / "train.bin").exists():
        tokens.tokenize(tokens.text_files("stdlib", "stdlib"), folder, limit=1_500_000)
    return folder / "train.bin"


def bare(path: str) -> None:
    """Under torchrun: the bare loop; prints its steady tokens/s as JSON (rank 0)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    from launcher.data import order, tokens
    from launcher.models.gpt import GPT
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = GPT(256, SEQ, LAYERS, HEADS, WIDTH)
    ddp = DDP(model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith(("tokens", "positions"))]
    rest = [p for p in model.parameters() if all(p is not d for d in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-3,
                            betas=(0.9, 0.95), foreach=True)
    windows = tokens.TokenWindows(path, SEQ, np.uint16)
    perm = order.GlobalBatchSampler(len(windows), 0).permutation(0)
    share = BATCH // world
    times = []
    for step in range(STEPS):
        start = time.perf_counter()                  # the step's reading of its windows included, as ours
        idx = perm[step * BATCH + rank * share: step * BATCH + (rank + 1) * share].tolist()
        x = torch.stack([windows[i][0] for i in idx])
        y = torch.stack([windows[i][1] for i in idx])
        for m in range(0, share, MICRO):
            last = m + MICRO >= share
            context = ddp.no_sync() if not last else torch.enable_grad()
            with context:
                out = ddp(x[m:m + MICRO])
                loss = F.cross_entropy(out.flatten(0, 1), y[m:m + MICRO].flatten(), reduction="sum")
                (loss * world / (BATCH * SEQ)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    if rank == 0:
        print("RATE " + json.dumps(BATCH * SEQ / statistics.median(times[WARM:])), flush=True)
    dist.destroy_process_group()


def bench_recipe(folder: Path, data: Path, engine: str = "ddp", noise: bool = True, layers: int = LAYERS,
                 width: int = WIDTH, steps: int = STEPS) -> dict:
    """The measured run as a recipe (its run folder: ``folder``/bench)."""
    return {"name": "bench", "output": str(folder), "seed": 0, "train": {"steps": steps},
            "data": {"dataset": "tokens", "train": str(data), "validation": str(data.with_name("val.bin")),
                     "seq_len": SEQ, "workers": 0},
            "model": {"name": "gpt", "layers": layers, "heads": HEADS, "width": width},
            "optimizer": {"name": "adamw", "weight_decay": 0.1, "betas": [0.9, 0.95], "clip_grad_norm": 1.0},
            "schedule": {"unit": "step", "batch": {"kind": "constant", "size": BATCH},
                         "lr": {"kind": "constant", "max": 1e-3}},
            "distributed": {"engine": engine, "nproc_per_node": 2, "max_micro_batch": MICRO},
            "eval": {"full_grad_norm": False, "batch_size": 64},
            "tracking": {"wandb": {"mode": "disabled"}, "log_every_steps": 10, "noise_scale": noise}}


def ours(folder: Path, data: Path, env: dict, noise: bool = True) -> float:
    """``qhm-launch run`` on the same problem; the median tokens/s of its steady step rows."""
    import yaml
    recipe = bench_recipe(folder, data, noise=noise)
    path = folder.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe))
    run([sys.executable, "-m", "launcher", "run", str(path)], env)
    rows = [json.loads(line) for line in (folder / "bench" / "steps.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows if r["step"] > WARM)


def run(command: list, env: dict) -> str:
    out = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        print((out.stdout + out.stderr)[-4000:], flush=True)
        out.check_returncode()
    return out.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--noise-scale", choices=("on", "off"), default="on",
                        help="qhm-launch's gradient noise scale (default on, as a recipe has it)")
    args = parser.parse_args()
    here = Path(__file__).resolve()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parents[1]), os.environ.get("PYTHONPATH", "")]),
               WANDB_MODE="disabled")
    rates = {"bare": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = token_file(Path(tmp) / "data")
        for r in range(args.rounds):
            for which in (("bare", "ours") if r % 2 == 0 else ("ours", "bare")):
                if which == "bare":
                    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(here), "--bare", str(data)], env)
                    rates["bare"].append(json.loads(out.split("RATE ", 1)[1].splitlines()[0]))
                else:
                    rates["ours"].append(ours(Path(tmp) / f"round{r}", data, env, args.noise_scale == "on"))
    print(side_by_side(f"GPT {LAYERS}x{WIDTH} (heads {HEADS}), seq {SEQ}, global batch {BATCH} = {MICRO} x "
                       f"{BATCH // 2 // MICRO} x 2, AdamW + clipping, 2 CPU processes, noise scale {args.noise_scale}",
                       {"bare DDP loop": rates["bare"], "`qhm-launch run`": rates["ours"]}))


def side_by_side(label: str, rates: dict) -> str:
    """A markdown row: the baseline's median tokens/s, the other's, their ratio, every round's."""
    (a, ra), (b, rb) = rates.items()
    ma, mb = statistics.median(ra), statistics.median(rb)
    rounds = "; ".join(f"{name} {', '.join(f'{v:,.0f}' for v in vs)}" for name, vs in rates.items())
    return f"| {label} | {a} {ma:,.0f} tokens/s | {b} {mb:,.0f} tokens/s | ratio {mb / ma:.3f} | rounds: {rounds} |"

if __name__ == "__main__":
    if "--bare" in sys.argv:
        bare(sys.argv[sys.argv.index("--bare") + 1])
    else:
        main()
