"""The epoch's running sums (launcher.train.state.EpochSums): what waits between folds adds up as one
addition per micro-batch would, counts finite steps as the per-step check did, and survives a save,
a redo and another world size."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from launcher.train.state import EpochSums

CPU = torch.device("cpu")


def _steps(n: int, nan_at: int | None = None, seed: int = 0) -> list[list[tuple]]:
    """n steps of 1 to 3 micro-batches of 4 samples: (float32 loss sum, predicted classes, targets, samples)
    each; losses of very different sizes, so an addition in another order gives other bits."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for s in range(n):
        micro = []
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            loss = torch.rand((), generator=g) * 10.0 ** float(torch.randint(-4, 5, (1,), generator=g))
            micro.append((loss.float(), torch.randint(0, 3, (4,), generator=g), torch.randint(0, 3, (4,), generator=g), 4))
        if s == nan_at:
            micro[-1] = (torch.tensor(float("nan")), *micro[-1][1:])
        steps.append(micro)
    return steps


def _run(steps, log_at=(), save_at=None, start_step=0):
    """(windows taken at log_at, the finite count there, the final sums) with an optional save and load
    (checked for finite losses first, as the trainer does); every step measures the noise scale too."""
    sums, out = EpochSums(CPU), []
    sums.start_epoch(start_step)
    g = torch.Generator().manual_seed(1)
    for s, micro in enumerate(steps):
        if s == save_at:
            assert float(sums.finite()) == start_step + s
            state = sums.state_dict()
            sums = EpochSums(CPU)
            sums.load_state_dict(state)
            sums.start_epoch(start_step + s)
        for m in micro:
            sums.add(*m)
        sums.add_noise(torch.rand(2, 2, generator=g, dtype=torch.float64), tuple(torch.rand(2, generator=g)))
        sums.step_done()
        if s in log_at:
            out.append((sums.take_window(), float(sums.finite())))
    return out, sums


def test_waiting_losses_add_as_one_addition_each_and_resume_in_the_same_groups():
    steps = _steps(150)
    log_at = (5, 40, 139)                          # 40 -> 139: a fold of FOLD_EVERY steps in between
    windows, sums = _run(steps, log_at)
    loss, correct, samples = torch.zeros((), dtype=torch.float64), 0, 0
    logged = (torch.zeros((), dtype=torch.float64), 0, 0)
    for s, micro in enumerate(steps):              # the reference: one float64 addition per micro-batch
        for part, predicted, target, n in micro:
            loss += part
            correct, samples = correct + int((predicted == target).sum()), samples + n
        if s in log_at:
            window, finite = windows[log_at.index(s)]
            assert torch.equal(window[0], loss - logged[0])
            assert (window[1], window[2], finite) == (correct - logged[1], samples - logged[2], s + 1)
            logged = (loss.clone(), correct, samples)
    assert torch.equal(sums.as_tensor()[0], loss)
    for save_at in (3, 41, 64, 100):               # mid-group, after a read, at a group's end
        resumed, _ = _run(steps, log_at, save_at)
        assert all(torch.equal(a, b) and fa == fb for (a, fa), (b, fb) in zip(resumed, windows)), save_at


@pytest.mark.parametrize("save_at", [None, 10, 20])   # a checkpoint holds only finite steps
def test_the_finite_count_stops_at_the_first_non_finite_loss(save_at):
    """As the per-step check did: steps of the epoch after which the running sum was still finite."""
    steps = _steps(80, nan_at=20)
    windows, sums = _run(steps, log_at=(10, 19, 20, 75), save_at=save_at, start_step=7)
    assert [finite for _, finite in windows] == [7 + 11, 7 + 20, 7 + 20, 7 + 20]
    assert math.isnan(float(sums.as_tensor()[0]))


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_a_step_issues_no_kernel_for_its_sums_until_they_are_read():
    sums, steps = EpochSums(CPU), _steps(EpochSums.FOLD_EVERY)
    matrix, norms = torch.ones(2, 2, dtype=torch.float64), (torch.tensor(1.0), torch.tensor(2.0))
    with _Ops() as seen:
        for micro in steps[:-1]:
            for m in micro:
                sums.add(*m)
            sums.add_noise(matrix, norms)
            sums.step_done()
    assert set(seen.ops) <= {"aten.detach"}, seen.ops
    with _Ops() as seen:                           # the 64th step folds everything that waits
        for m in steps[-1]:
            sums.add(*m)
        sums.step_done()
    assert "aten.cumsum" in seen.ops
    assert sums.noise_steps == EpochSums.FOLD_EVERY - 1 and float(sums.finite()) == EpochSums.FOLD_EVERY


def test_waiting_sums_survive_a_redo_and_another_world_size():
    steps = _steps(30)
    ranks = [EpochSums(CPU), EpochSums(CPU)]
    for s, micro in enumerate(steps):
        for m in micro:
            ranks[s % 2].add(*m)
        ranks[s % 2].step_done()
    snapshot = ranks[0].snapshot()                 # a step redone (max_micro_batch: auto) adds nothing twice
    ranks[0].add(*steps[0][0])
    ranks[0].restore(snapshot)
    saved = [r.state_dict() for r in ranks]
    assert len(saved[0]["loss_waiting"]["ends"]) == 15
    total = sum(r.as_tensor() for r in ranks)
    one = EpochSums(CPU)
    one.load_state_dict(EpochSums(CPU).reshard(saved, 0, 1, 30))
    assert one.as_tensor()[:3].tolist() == pytest.approx(total[:3].tolist(), rel=1e-12)
