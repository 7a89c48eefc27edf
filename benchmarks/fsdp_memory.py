"""What sharding saves and costs against DDP, side by side in the same run, on the built-in GPT with AdamW:
FSDP2, and DeepSpeed ZeRO-2 and ZeRO-3.

* **memory**: after one real step of the launcher's own parts (``launcher.train.build.build``: the engine,
  the optimizer on the shards), each rank's bytes of parameters, gradients and optimizer state counted
  tensor by tensor (a DTensor by its local shard; DDP and FSDP, whose parameters are plain tensors), and,
  for every engine, the bytes of every tensor alive in the process (``gc``, each storage once: what
  DeepSpeed keeps in its own flat buffers included): exact, not a noisy RSS;
* **speed**: the median tokens/s of ``qhm-launch run`` with each engine, each a fresh torchrun job of 2
  CPU processes (gloo), alternating, several rounds.

On CPU/gloo the speed ratio measures the extra collectives (an all-gather per block per forward and
backward, a reduce-scatter per step), not what NCCL on a GPU would show.

    .venv/bin/python benchmarks/fsdp_memory.py [--rounds 3] [--width 256] [--layers 4] [--engines ddp,fsdp,zero2,zero3]
"""
import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from lm_throughput import BATCH, MICRO, SEQ, bench_recipe, run, side_by_side, token_file  # the same problem

STEPS, WARM = 60, 15


ENGINES = {"ddp": ("ddp", None), "fsdp": ("fsdp", None), "zero2": ("deepspeed", 2), "zero3": ("deepspeed", 3)}
NAMES = {"ddp": "DDP", "fsdp": "FSDP", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}


def recipe(folder: Path, data: Path, engine: str, layers: int, width: int) -> dict:
    name, stage = ENGINES[engine]
    r = {**bench_recipe(folder, data, name, layers=layers, width=width, steps=STEPS), "checkpoint": {"every_steps": 0}}
    if stage is not None:
        r["distributed"] = {**r["distributed"], "zero_stage": stage}
    if stage == 3:   # every parameter partitioned, as in a model large enough for ZeRO-3 (the default keeps
        # parameters under 1e5 elements whole on every rank: most of this small GPT's)
        r["distributed"]["deepspeed_config"] = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    return r


def alive_bytes() -> int:
    """Bytes of every tensor storage alive in this process, each once (views and wrappers share one)."""
    import torch
    seen = {}
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and obj.device.type != "meta":
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        except Exception:  # noqa: BLE001 - a wrapper without storage (DTensor): its local tensor is counted
            continue
    return sum(seen.values())


def measure(path: str) -> None:
    """Under torchrun: one step of the launcher's parts; each rank prints its bytes as JSON."""
    import torch
    from launcher import config
    from launcher.train import build, comm as comm_mod
    comm = comm_mod.init()
    parts = build.build(config.load(path), comm, log=lambda *a, **k: None)
    engine, local = parts.engine, (lambda t: t.to_local() if hasattr(t, "to_local") else t)
    vocab = parts.recipe.model.vocab or 256
    x, y = torch.randint(vocab, (2, MICRO, SEQ), generator=torch.Generator().manual_seed(comm.rank))
    with engine.micro_step(True):
        out = engine.model(x)
        engine.backward(torch.nn.functional.cross_entropy(out.flatten(0, 1), y.flatten()))
    size = lambda ts: sum(local(t).numel() * local(t).element_size() for t in ts)     # noqa: E731
    params = list(parts.module.parameters())
    grads = size(p.grad for p in params if p.grad is not None)
    engine.step()
    state = size(v for s in engine.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    del out, x, y
    gc.collect()
    print("BYTES " + json.dumps({"rank": comm.rank, "params": size(params), "grads": grads, "optimizer": state,
                                 "alive": alive_bytes()}), flush=True)
    parts.close()
    comm.close()


def rate(folder: Path) -> float:
    rows = [json.loads(line) for line in next(folder.glob("*/steps.jsonl")).read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows if r["step"] > WARM)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--engines", default="ddp,fsdp,zero2,zero3")
    args = parser.parse_args()
    engines = args.engines.split(",")
    here = Path(__file__).resolve()
    import yaml
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parents[1]), os.environ.get("PYTHONPATH", "")]),
               WANDB_MODE="disabled")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = token_file(tmp / "data")
        paths = {}
        for engine in engines:
            paths[engine] = tmp / f"{engine}.yaml"
            paths[engine].write_text(yaml.safe_dump(recipe(tmp / f"m-{engine}", data, engine, args.layers, args.width)))
        memory = {}
        for engine, path in paths.items():
            out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       str(here), "--measure", str(path)], env)
            memory[engine] = [json.loads(line[6:]) for line in out.splitlines() if line.startswith("BYTES ")]
        rates = {engine: [] for engine in engines}
        for r in range(args.rounds):
            for engine in (engines if r % 2 == 0 else engines[::-1]):
                folder = tmp / f"round{r}-{engine}"
                path = tmp / f"round{r}-{engine}.yaml"
                path.write_text(yaml.safe_dump(recipe(folder, data, engine, args.layers, args.width)))
                run([sys.executable, "-m", "launcher", "run", str(path)], env)
                rates[engine].append(rate(folder))
    mib = lambda b: b / 2 ** 20     # noqa: E731
    plain = [e for e in ("ddp", "fsdp") if e in engines]     # parameters that are tensors of their own
    print("| per rank | " + " | ".join(NAMES[e] for e in engines) + " |")
    print("|---|" + "---|" * len(engines))
    for part in ("params", "grads", "optimizer"):
        print(f"| {part} | " + " | ".join(f"{mib(max(m[part] for m in memory[e])):.2f} MiB" if e in plain else "-"
                                         for e in engines) + " |")
    alive = {e: max(m["alive"] for m in memory[e]) for e in engines}
    print("| every tensor alive | " + " | ".join(f"{mib(alive[e]):.2f} MiB" for e in engines) + " |")
    base = engines[0]
    print(f"| ... against {NAMES[base]} | " + " | ".join(f"{alive[e] / alive[base]:.3f}" for e in engines) + " |")
    for other in engines[1:]:
        print(side_by_side(f"GPT {args.layers}x{args.width}, seq {SEQ}, batch {BATCH} = {MICRO} x 1 x 2, AdamW + "
                           "clipping, 2 CPU processes", {NAMES[base]: rates[base], NAMES[other]: rates[other]}))


if __name__ == "__main__":
    if "--measure" in sys.argv:
        measure(sys.argv[sys.argv.index("--measure") + 1])
    else:
        main()
