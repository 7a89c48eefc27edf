"""Test tiers and shared fixtures. Helpers live in helpers.py (imported by the tests, not from here).

Tiers: every test that starts the real process tree (``qhm-launch`` through torchrun, DeepSpeed's
launcher, Slurm) is marked ``e2e``, and the heaviest in-process ones ``slow``; ``make test-fast`` runs the
rest (``-m "not e2e and not slow"``), which trains on real gloo ranks in-process (helpers.train_ranks).
``make test`` runs everything."""
import pytest

import helpers


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: starts the real process tree (torchrun, DeepSpeed, Slurm); "
                                       "left out of make test-fast")
    config.addinivalue_line("markers", "slow: heavy (torch.compile, per-sample gradient references, 3-rank "
                                       "runs, ZeRO-3, a W&B service killed, a second variant of a path make "
                                       "test-fast already trains); left out of make test-fast")
    config.addinivalue_line("markers", "serial: asserts how soon something happens (a stop within seconds), or "
                                       "two launchers on this host that find their processes by marker); make "
                                       "test runs these after the rest, one at a time")


# The files that take longest, longest first (measured on 2 cores, 2026-12-08): make test runs files on
# parallel workers, each file whole on one, so the long ones start first and the short ones fill in (no
# worker left alone with a long file at the end). The rest follow in their usual order.
LONGEST_FIRST = ("test_deepspeed.py", "test_slurm.py", "test_processes.py", "test_resume.py", "test_user_data.py",
                 "test_fsdp.py", "test_tracking_runs.py", "test_lm.py", "test_llama.py", "test_branch.py",
                 "test_units.py", "test_adaptive.py", "test_analysis.py", "test_gpu_check.py", "test_noise.py",
                 "test_train.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))      # stable: each file keeps its order


def pytest_sessionfinish(session, exitstatus):
    helpers.POOL.close()


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory):
    """Uninterrupted runs shared by every module that compares against the same one, trained once per
    session on pool ranks: ``reference_runs(recipe_dict)`` returns its run folder. Two recipes share a
    run when their trajectory (launcher.config.trajectory_hash), process count and micro-batch cap agree:
    names, outputs and tracking do not change a single bit of it."""
    from launcher import config
    folder = tmp_path_factory.mktemp("references")
    made: dict = {}

    def get(recipe: dict):
        resolved = config.from_dict(recipe)
        key = (config.trajectory_hash(resolved.to_dict()), resolved.distributed.nproc_per_node,
               resolved.distributed.max_micro_batch)
        if key not in made:
            cwd = folder / f"r{len(made)}"
            cwd.mkdir()
            made[key] = helpers.train_ranks(recipe, cwd)
        return made[key]
    return get


@pytest.fixture(scope="session")
def token_files(tmp_path_factory) -> dict:
    """The language-model tests' token files (helpers.write_token_files), written once per session."""
    return helpers.write_token_files(tmp_path_factory.mktemp("tokens"))
