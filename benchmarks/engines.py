"""DDP vs DeepSpeed ZeRO 0/1/2 on the same model (ResNet-18, CIFAR stem, synthetic 1x8x8 data),
2 processes on CPU: training samples/s (median over epochs after the first) and peak RSS per rank.
Each engine runs in its own torchrun (peak memory is per process), one after another.

    .venv/bin/python benchmarks/engines.py
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = [("ddp", 0), ("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2)]


def worker(engine, stage, folder):
    from launcher.train import comm as comm_mod
    from launcher import config as R
    from launcher.train import trainer
    comm = comm_mod.init()
    r = R.from_dict({"name": "b", "output": folder, "epochs": 4, "model": "resnet18",
                     "data": {"dataset": "synthetic", "size": 1024, "augment": False},
                     "schedule": {"batch": {"kind": "constant", "size": 64}, "lr": {"max": 0.05}},
                     "distributed": {"engine": engine, "zero_stage": stage, "nproc_per_node": comm.world,
                                     "max_micro_batch": 32},
                     "eval": {"every_epochs": 100, "full_grad_norm": False},
                     "tracking": {"wandb": {"mode": "disabled"}}})
    trainer.run(r, comm, log=lambda *a, **k: None)
    peaks = comm.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if comm.is_main:
        rows = [json.loads(x) for x in (Path(folder) / "b" / "metrics.jsonl").read_text().splitlines()]
        print("RESULT " + json.dumps({"samples_per_s": statistics.median(x["samples_per_s"] for x in rows[1:]),
                                      "peak_rss_mb": max(peaks)}))
    comm.close()


def main():
    root = Path(__file__).resolve().parents[1]
    results = {}
    for engine, stage in CONFIGS:
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                  __file__, engine, str(stage), tmp], cwd=root, capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                print(out.stdout[-2000:], out.stderr[-4000:])
                raise SystemExit(f"{engine} {stage} failed")
            results[(engine, stage)] = json.loads(line[0][7:])
    base = results[("ddp", 0)]["samples_per_s"]
    print("| engine | samples/s | vs DDP | peak RSS per rank (MB) |")
    print("|---|---|---|---|")
    for (engine, stage), r in results.items():
        name = "DDP" if engine == "ddp" else f"DeepSpeed ZeRO {stage}"
        print(f"| {name} | {r['samples_per_s']:,.0f} | {r['samples_per_s'] / base:.2f}x | {r['peak_rss_mb']:,.0f} |")


if __name__ == "__main__":
    if "RANK" in os.environ:
        worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    else:
        main()
