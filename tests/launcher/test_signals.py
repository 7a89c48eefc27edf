"""Preemption agreement: a signal on any rank stops every rank after the same step, without a
blocking collective per step; the Slurm request file works through rank 0."""
import os
import signal
from pathlib import Path

from helpers import run_ranks
from launcher.train.signals import Agreement, PreemptionFlag


def _steps_until_stop(comm, signal_rank, signal_step, request_file):
    flag = PreemptionFlag(["SIGUSR1"])
    stop = Agreement(comm, flag, Path(request_file) if request_file else None)
    for step in range(100):
        if comm.rank == signal_rank and step == signal_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        if request_file and comm.rank == 0 and step == signal_step:
            Path(request_file).touch()
        if stop.poll():
            stop.close()
            return step, flag.received
    stop.close()
    return None, flag.received


def test_a_signal_on_one_rank_stops_all_ranks_after_the_same_step():
    out = run_ranks(_steps_until_stop, 3, 2, 17, None)
    assert [step for step, _ in out] == [18, 18, 18]              # one step later, on every rank
    assert [received for _, received in out] == [None, None, signal.SIGUSR1]


def test_the_request_file_is_seen_by_rank_0_and_agreed_by_all(tmp_path):
    out = run_ranks(_steps_until_stop, 2, -1, 5, str(tmp_path / "preempt.request"))
    assert [step for step, _ in out] == [6, 6] and out[0][1] == 0


def test_one_process_needs_no_agreement(tmp_path):
    from launcher.train.comm import Comm
    import torch
    comm = Comm(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    assert _steps_until_stop(comm, 0, 4, None) == (4, signal.SIGUSR1)
