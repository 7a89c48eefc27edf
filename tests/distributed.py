"""Real multi-process groups for unit tests: ``run_ranks(fn, world, *args)`` runs ``fn(comm, *args)``
in ``world`` fresh processes joined by gloo (a FileStore in a temp folder), and returns their results
by rank. ``fn`` must be importable (a module-level function of a test module)."""
from __future__ import annotations

import os
import pickle
import sys
import tempfile
import traceback
from pathlib import Path

import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent


def _entry(rank, world, store_dir, fn, args, out_dir):
    sys.path[:0] = [str(HERE), str(HERE / "launcher")]
    import datetime
    import torch
    import torch.distributed as dist
    from launcher.train.comm import Comm
    try:
        store = dist.FileStore(os.path.join(store_dir, "store"), world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        control = dist.new_group(backend="gloo")
        comm = Comm(rank=rank, world=world, local_rank=rank, device=torch.device("cpu"), control=control)
        result = ("ok", fn(comm, *args))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_ranks(fn, world: int, *args) -> list:
    with tempfile.TemporaryDirectory() as store_dir, tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(world, store_dir, fn, args, out_dir), nprocs=world, join=True,
                           start_method="spawn")
        results = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"{rank}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed: {value}")
            results.append(value)
        return results
