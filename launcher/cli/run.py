"""``qhm-launch run``: in a process torchrun started, the worker (:mod:`launcher.train.worker`); anywhere else,
the launcher (:mod:`launcher.cluster.launch`), under a keeper so that nothing the run starts outlives it.

Exit status: 0 done; 2 bad input (one line on stderr, ``--debug`` for the traceback); 75 preempted
after saving a checkpoint (run the same command again to resume); anything else: a failure.
"""
from __future__ import annotations

from launcher import config as recipe_mod
from launcher import env


def cmd_run(args) -> int:
    recipe = recipe_mod.load(args.recipe, args.set)
    from launcher.train.comm import in_worker_env
    if in_worker_env():
        from launcher.train.worker import run_worker
        return run_worker(recipe, force=args.force_resume or env.flag(env.FORCE_RESUME), until_epoch=args.until_epoch,
                          until_step=args.until_step)
    from launcher.cluster.keeper import Keeper
    with Keeper():           # from here on, nothing the run starts outlives it (a kill -9 of this process included)
        from launcher.cluster.launch import launch
        return launch(args, recipe)
