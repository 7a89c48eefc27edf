"""Start-up: where a tiny run's time goes besides training, and what a local sweep saves per point.

1. The pieces, each timed in a fresh process: ``import torch``; the launcher's own start (``qhm-launch
   plan``: Python, torch, the recipe); torchrun's agent starting 2 trivial workers.
2. A tiny 2-process run end to end (``qhm-launch run``, synthetic data, small CNN, 1 epoch, W&B off):
   total time against the training wall time the run itself reports (metrics.jsonl); the rest is
   start-up and tear-down.
3. A 4-point ``sweep --local`` against the same 4 points as 4 separate ``qhm-launch run`` commands (what a
   local sweep did before: a Python start and a torch import per point), side by side, alternating.

    .venv/bin/python benchmarks/start_time.py [--rounds 3]
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
import qhm  # noqa: E402,F401 - imported first: tests/qhm (a test folder) must not shadow the package
sys.path.append(str(ROOT / "tests"))
from helpers import base_recipe  # noqa: E402

PY = sys.executable
CLI = [PY, "-m", "launcher"]
LRS = [0.01, 0.02, 0.03, 0.04]


def timed(cmd, cwd) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=dict(os.environ, WANDB_MODE="disabled"))
    return time.perf_counter() - t0


def tiny(folder: Path, name: str, **over) -> Path:
    recipe = base_recipe(name=name, epochs=1, **{"data.size": 200, "checkpoint.every_steps": 0, **over})
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def training_wall(run: Path) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return rows[-1]["wall_time"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qhm-start-"))
    (work / "hi.py").write_text("pass\n")
    plan_recipe = tiny(work, "plan")

    pieces = {"import torch": [], "qhm-launch plan (Python, torch, recipe)": [], "torchrun, 2 trivial workers": []}
    runs = {"total": [], "training (wall_time)": []}
    sweep = {"4 x qhm-launch run": [], "sweep --local, 4 points": []}
    for k in range(args.rounds):
        pieces["import torch"].append(timed([PY, "-c", "import torch"], work))
        pieces["qhm-launch plan (Python, torch, recipe)"].append(timed([*CLI, "plan", str(plan_recipe)], work))
        pieces["torchrun, 2 trivial workers"].append(timed(
            [PY, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2", "hi.py"], work))
        path = tiny(work, f"tiny{k}")
        runs["total"].append(timed([*CLI, "run", str(path)], work))
        runs["training (wall_time)"].append(training_wall(work / "runs" / f"tiny{k}"))

        base = tiny(work, "base")
        spec = work / f"sweep{k}.yaml"
        spec.write_text(yaml.safe_dump({"recipe": base.name, "name": f"sw{k}", "grid": {"schedule.lr.max": LRS}}))
        separate = [tiny(work, f"sep{k}_{i}", **{"schedule.lr.max": lr}) for i, lr in enumerate(LRS)]
        order = ["sweep", "separate"] if k % 2 else ["separate", "sweep"]
        for which in order:
            if which == "sweep":
                sweep["sweep --local, 4 points"].append(timed([*CLI, "sweep", str(spec), "--local"], work))
            else:
                t0 = time.perf_counter()
                for p in separate:
                    timed([*CLI, "run", str(p)], work)
                sweep["4 x qhm-launch run"].append(time.perf_counter() - t0)

    med = {name: statistics.median(v) for table in (pieces, runs, sweep) for name, v in table.items()}
    print(f"start-up on {os.cpu_count()} cores, medians of {args.rounds} rounds (s)")
    for name in pieces:
        print(f"  {name:<42} {med[name]:6.2f}")
    overhead = med["total"] - med["training (wall_time)"]
    print(f"  {'tiny 2-process run, total':<42} {med['total']:6.2f}")
    print(f"  {'  of which training (its wall_time)':<42} {med['training (wall_time)']:6.2f}")
    print(f"  {'  start-up and tear-down':<42} {overhead:6.2f}")
    a, b = med["4 x qhm-launch run"], med["sweep --local, 4 points"]
    print(f"  {'4 x qhm-launch run':<42} {a:6.2f}")
    print(f"  {'sweep --local, 4 points':<42} {b:6.2f}   ({a / b:.2f}x faster, {(a - b) / 4:.2f} s saved per point)")


if __name__ == "__main__":
    main()
