"""qhm.plan_steps: whole epochs at one batch are one span that repeats, planned in one jump; written out,
they are the spans of the walk epoch by epoch, and a length of 10^15 tokens plans as a handful of spans."""
import bisect
import functools
import random

import numpy as np
import pytest

from qhm import plan_steps


def piecewise(changes: list[int], batches: list[int]):
    """batch_at(u) = batches[i] for u in [changes[i-1], changes[i]) (changes[-1] = 0), next_change(u): the next
    change after u (None past the last)."""
    def batch_at(u):
        return batches[bisect.bisect_right(changes, u)]

    def next_change(u):
        i = bisect.bisect_right(changes, u)
        return changes[i] if i < len(changes) else None
    return batch_at, next_change


def random_case(rng: random.Random):
    n = rng.randint(1, 60)
    unit = rng.choice(["step", "sample", "token"])
    tps = rng.choice([1, 3, 16])
    per_epoch = {"step": n, "sample": n, "token": n * tps}[unit]
    changes = sorted(rng.sample(range(1, 30 * per_epoch), rng.randint(0, 4)))
    batches = [rng.randint(1, n) for _ in range(len(changes) + 1)]
    d_unit = rng.choice(["epoch", "step", "sample", "token"])
    amount = {"epoch": rng.randint(1, 40), "step": rng.randint(1, 40 * n), "sample": rng.randint(1, 40 * n),
              "token": rng.randint(1, 40 * n * tps)}[d_unit]
    return n, unit, tps, piecewise(changes, batches), (d_unit, amount)


def capped(batch_at, most: int, u: int) -> int:
    return min(batch_at(u), most)


@pytest.mark.parametrize("seed", range(5))
def test_repeating_spans_written_out_are_the_walk_epoch_by_epoch(seed):
    rng = random.Random(seed)
    jumped = 0
    for _ in range(100):
        n, unit, tps, (batch_at, next_change), duration = random_case(rng)
        fast = plan_steps(batch_at, next_change, unit, n, duration, tps)
        slow = plan_steps(batch_at, next_change, unit, n, duration, tps, repeat_epochs=False)
        assert all(s.repeat == 1 for s in slow.spans)
        assert fast.epoch_spans() == list(slow.spans), (n, unit, tps, duration)
        assert (fast.epochs, fast.total_steps, fast.total_samples) == (slow.epochs, slow.total_steps, slow.total_samples)
        for key, values in fast.positions().items():
            np.testing.assert_array_equal(values, slow.positions()[key], err_msg=key)
        for step in {0, slow.total_steps // 3, slow.total_steps - 1, slow.total_steps}:
            assert fast.position_at(step) == slow.position_at(step)
        assert [fast.steps_in(e) for e in range(slow.epochs + 1)] == [slow.steps_in(e) for e in range(slow.epochs + 1)]
        jumped += len(fast.spans) < len(slow.spans)
    assert jumped > 20           # the cases exercise the jump, not only single epochs


@pytest.mark.parametrize("seed", range(3))
def test_a_branch_repeats_the_same_way(seed):
    """The parent's steps up to the branch step S, then factor x its batch, ending exactly at its length
    (a partial last step where the length is in samples or tokens)."""
    rng = random.Random(100 + seed)
    for _ in range(100):
        n, unit, tps, (batch_at, next_change), _ = random_case(rng)
        parent = plan_steps(batch_at, next_change, unit, n, ("epoch", rng.randint(2, 30)), tps)
        at = rng.randint(0, parent.total_steps)
        d_unit = rng.choice(["step", "sample", "token"])
        start = parent.position_at(at)
        amount = {"step": at, "sample": start["samples"], "token": start["samples"] * tps}[d_unit] \
            + rng.randint(1, 20 * n)
        factor = rng.choice([f for f in (1, 2, 4) if f <= n])
        cap = functools.partial(capped, batch_at, max(1, n // factor))     # the factor keeps the batch within n
        branch = (at, factor)
        fast = plan_steps(cap, next_change, unit, n, (d_unit, amount), tps, branch=branch)
        slow = plan_steps(cap, next_change, unit, n, (d_unit, amount), tps, branch=branch, repeat_epochs=False)
        assert fast.epoch_spans() == list(slow.spans), (n, unit, tps, d_unit, amount, branch)


def test_ten_to_the_fifteen_tokens_of_a_small_corpus_plan_as_two_spans():
    """1,500 samples of 10 tokens at batch 100: an epoch is 15 steps and 15,000 tokens. 10^15 tokens are
    66,666,666,666 whole epochs (one repeating span) and 10,000 tokens more: 10 steps of 1,000 tokens."""
    batch_at, next_change = piecewise([], [100])
    plan = plan_steps(batch_at, next_change, "token", 1500, ("token", 10 ** 15), 10)
    whole = 66_666_666_666
    assert [(s.epoch, s.steps, s.repeat) for s in plan.spans] == [(0, 15, whole), (whole, 10, 1)]
    assert plan.total_steps == whole * 15 + 10 and plan.total_tokens == 10 ** 15 and plan.epochs == whole + 1
    assert plan.position_at(15 * 1_000_000_000 + 7) == {"epoch": 1_000_000_000, "step": 7,
                                                         "global_step": 15 * 1_000_000_000 + 7,
                                                         "samples": 1500 * 1_000_000_000 + 700,
                                                         "tokens": 15_000 * 1_000_000_000 + 7_000}
    assert plan.steps_in(whole - 1) == 15 and plan.steps_in(whole) == 10 and plan.steps_in(whole + 1) == 0


def test_a_span_that_repeats_is_cut_where_the_batch_changes():
    """Batch 100 to token 100,000 (6.67 epochs of 15,000), then 300: epochs 0-5 repeat, epoch 6 runs 10 steps
    of 100 (the tenth reaches 100,000 tokens... its last step starts before the change) then 300s."""
    batch_at, next_change = piecewise([100_000], [100, 300])
    plan = plan_steps(batch_at, next_change, "token", 1500, ("epoch", 9), 10)
    assert [(s.epoch, s.first, s.steps, s.batch, s.repeat) for s in plan.spans] == [
        (0, 0, 15, 100, 6), (6, 0, 10, 100, 1), (6, 10, 2, 300, 1), (7, 0, 5, 300, 2)]
