"""Where a steady-state training step spends host time: cProfile over rank 0 of a 2-process run of a tiny
model (two 3x3 convolutions of width 16 on synthetic 1x8x8 inputs) at global batch 8 = micro 4 x 1 x 2,
no evaluation, no checkpoints, W&B off. Prints the top entries by own time, per step.

    .venv/bin/python benchmarks/step_profile.py [STEPS]      # starts torchrun itself; NOISE=0: noise scale off
"""
import cProfile
import io
import os
import pstats
import sys
import tempfile

import torch


def tiny_model():
    """The issue's tiny user model: most of a step is the launcher's and torch's host work."""
    return torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))


def tiny_recipe(folder: str, world: int, steps: int, batch: int = 8, micro: int = 4) -> dict:
    return {"name": "profile", "output": folder, "epochs": 2, "seed": 0,
            "data": {"dataset": "synthetic", "size": steps * batch, "augment": False},
            "model": {"factory": "step_profile:tiny_model"},
            "schedule": {"batch": {"kind": "constant", "size": batch}, "lr": {"max": 0.05}},
            "distributed": {"nproc_per_node": world, "max_micro_batch": micro},
            "eval": {"every_epochs": 1000, "full_grad_norm": False},
            "checkpoint": {"every_steps": 0, "keep": 1},
            "tracking": {"wandb": {"mode": "disabled"}, "noise_scale": os.environ.get("NOISE", "1") == "1"}}


def loop_steps(trainer, epoch: int, steps) -> None:
    """What Trainer.train does at each of ``steps`` of ``epoch`` in a run without evaluation, checkpoints
    or a stop: the step, its log point, the stop poll, the rows' sums sent at an agreed step."""
    for step in steps:
        trainer.train_step(epoch, step)
        if trainer.log_every and trainer.state.global_step % trainer.log_every == 0:
            trainer.log_steps(epoch)
        trainer.stop.poll(trainer.state.global_step)
        if trainer.stop.checked:
            trainer.step_rows.send()


def worker():
    from launcher import config as R
    from launcher.train import comm as comm_mod
    from launcher.train.build import build
    from launcher.train.signals import PreemptionFlag
    from launcher.train.trainer import Trainer
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    comm = comm_mod.init()
    with tempfile.TemporaryDirectory() as tmp:
        folder = comm.broadcast(tmp if comm.is_main else None)
        trainer = Trainer(build(R.from_dict(tiny_recipe(folder, comm.world, steps)), comm, lambda *a, **k: None),
                          PreemptionFlag([]))
        trainer.resume()
        trainer.start_epoch(0)                       # warm-up epoch: not profiled
        loop_steps(trainer, 0, range(steps))
        trainer.end_epoch(0)
        split = trainer.start_epoch(1)
        profile = cProfile.Profile()
        profile.enable()
        loop_steps(trainer, 1, range(split.steps))
        profile.disable()
        trainer.close(None)
        comm.barrier()
    if comm.is_main:
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out).sort_stats("tottime")
        total = sum(v[2] for v in stats.stats.values())
        print(f"{split.steps} steps profiled on rank 0: {total / split.steps * 1e6:.0f} us of own time per step")
        stats.print_stats(25)
        print("\n".join(out.getvalue().splitlines()[6:40]))
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats("launcher|qhm", 25)
        print("\n".join(out.getvalue().splitlines()[6:40]))
    comm.close()


if __name__ == "__main__":
    from torchrun_self import main
    main(__file__, worker)
