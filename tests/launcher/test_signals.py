"""Preemption agreement: a signal on any rank stops every rank after the same step, without a
blocking collective per step; the Slurm request file works through rank 0."""
import os
import signal
from pathlib import Path

from helpers import run_ranks
from launcher.train.signals import Agreement, PreemptionFlag


def _steps_until_stop(comm, signal_rank, signal_step, request_file):
    flag = PreemptionFlag(["SIGUSR1"])
    stop = Agreement(comm, flag, Path(request_file) if request_file else None, max_every=1)
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


def _paced(comm, seconds_per_step, signal_step):
    """Steps whose duration is this rank's ``seconds_per_step`` on a fake clock; SIGUSR1 on every rank
    at ``signal_step``. Returns (stop step, the agreed intervals seen, the log lines)."""
    flag, now, lines, seen = PreemptionFlag(["SIGUSR1"]), [0.0], [], []
    stop = Agreement(comm, flag, None, log=lines.append, clock=lambda: now[0])
    for step in range(400):
        now[0] += seconds_per_step[comm.rank]
        if step == signal_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        seen.append(stop.every)
        if stop.poll(step + 1):
            stop.close()
            return step + 1, sorted(set(seen)), lines
    stop.close()
    return None, sorted(set(seen)), lines


def test_the_check_interval_follows_the_slowest_rank_s_pace_and_every_rank_stops_at_the_same_step():
    # 10 ms steps on rank 0, 100 ms on rank 1: the agreed interval is rank 1's 5 steps (0.5 s), not 50
    out = run_ranks(_paced, 2, [0.01, 0.1], 200)
    (stop0, every0, lines0), (stop1, every1, _) = out
    assert stop0 == stop1 and every0 == every1 == [1, 5]
    assert 200 < stop0 <= 201 + 2 * 5                            # within two checks of the signal
    assert lines0 == [f"[qhm-launch] SIGUSR1: stopping after global step {stop0} (the next check), with a checkpoint"]


def test_fast_steps_are_checked_every_half_second_and_slow_ones_every_step():
    assert run_ranks(_paced, 2, [0.001, 0.001], 300)[0][1] == [1, 500]            # 1 ms steps: every 500
    stop, every, _ = run_ranks(_paced, 2, [2.0, 2.0], 100)[0]
    assert every == [1] and stop == 102                          # a 2 s step: two steps, about 4 s


def test_the_watchdog_judges_a_stuck_step_only_after_a_signal_and_a_slow_one_against_the_steps_before():
    from launcher.train.signals import STALL_FACTOR, STALL_MIN_S, STUCK_AFTER_S, watch_verdict
    # no signal: a step 31 s long where steps take 0.1 s is a stall; 29 s is not (the floor); a 1 s step
    # takes 20 s before a 21 s one is worth saying
    assert watch_verdict(100.0, "step", 100.0 - 31, 0.1, None) == "stall"
    assert watch_verdict(100.0, "step", 100.0 - (STALL_MIN_S - 1), 0.1, None) is None
    assert watch_verdict(100.0, "step", 100.0 - 35, 2.0, None) is None and STALL_FACTOR * 2.0 == 40
    assert watch_verdict(100.0, "step", 0.0, None, None) is None           # no step measured yet
    # a signal: stuck once neither the signal nor the last progress is within STUCK_AFTER_S
    assert watch_verdict(100.0, "step", 50.0, 0.1, 100.0 - STUCK_AFTER_S - 1) == "stuck"
    assert watch_verdict(100.0, "between steps", 50.0, 0.1, 100.0 - STUCK_AFTER_S - 1) == "stuck"
    assert watch_verdict(100.0, "step", 50.0, 0.1, 100.0 - STUCK_AFTER_S + 1) == "stall"   # not yet stuck
    assert watch_verdict(100.0, "step", 100.0 - 1, 0.1, 50.0) is None       # steps still end: the stop comes
    # saving and evaluating are progress of their own, however long they take
    for busy in ("saving", "evaluating", "resuming", "starting"):
        assert watch_verdict(1e6, busy, 0.0, 0.1, 0.0) is None
