"""Run a benchmark script as its own two workers: ``python benchmarks/X.py`` starts torchrun on itself,
and inside torchrun (RANK set) the script's worker runs. The benchmarks folder and the repository root
are on the workers' import path (for the models the streamed benchmark imports by path)."""
import os
import subprocess
import sys
from pathlib import Path


def main(script: str, worker, nproc: int = 2) -> None:
    if "RANK" in os.environ:
        worker()
        return
    sys.exit(start(script, nproc))


def start(script: str, nproc: int = 2) -> int:
    """torchrun on ``script`` with ``nproc`` workers; its exit status."""
    here = Path(script).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={nproc}", script], cwd=here.parent, env=env)
