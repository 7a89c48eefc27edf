"""Bounds: terms from the step sequences against sums computed by hand, and the closed forms of
Corollaries 3 and 5 as upper bounds over many K."""
import itertools
import math
import time

import numpy as np
import pytest

from qhm import (BatchSchedule, BetaSchedule, Constants, GammaSchedule, LRSchedule, Schedule,
                 corollary3, corollary5, epoch_table, step_sequences, summary, theorem2, theorem4,
                 verdict)


def sched(bs="exponential", lr="constant", beta="step_decay", gamma="step_decay", M=40, E=5, b=8,
          a_max=0.1, a_min=0.0, p=2.0, beta_max=0.9, beta_min=0.5, gamma_max=0.7):
    return Schedule(epochs=M, batch=BatchSchedule(bs, b, growth=2, interval=E),
                    lr=LRSchedule(lr, a_max, a_min, power=p, epochs=M),
                    beta=BetaSchedule(beta, max=beta_max, min=beta_min, factor=0.5, interval=E),
                    gamma=GammaSchedule(gamma, max=gamma_max, factor=0.5, interval=E))


def test_theorem2_terms_equal_plain_sums():
    s = sched(lr="cosine", a_min=0.01, M=6, E=2)
    seq = step_sequences(epoch_table(s, 50))
    t = theorem2(seq)
    for K in (1, 7, 13, len(seq.lr)):
        a = [float(x) for x in seq.lr[:K]]
        sa = sum(a)
        assert t.A[K - 1] == pytest.approx(1 / sa, rel=1e-12)
        assert t.B[K - 1] == pytest.approx(sum(x * x / int(b) for x, b in zip(a, seq.batch[:K])) / sa, rel=1e-12)
        assert t.C[K - 1] == pytest.approx(sum(float(g) * float(bb) for g, bb in zip(seq.gamma[:K], seq.beta[:K])) / sa,
                                           rel=1e-12)


def test_theorem2_bound_with_constants_by_hand():
    s = sched(M=4, E=2)
    seq = step_sequences(epoch_table(s, 40))
    c = Constants(L=2.0, sigma2=3.0, G=1.5, f_gap=4.0)
    t = theorem2(seq, c)
    gb, am = 0.7 * 0.9, 0.1
    D = (1 - gb) * (2 - am * 2.0)
    expect = (2 * 4.0 * t.A + 2.0 * 3.0 * t.B + 2 * am * (1 + am * 2.0) * 1.5 ** 2 * t.C) / D
    assert np.allclose(t.bound, expect, rtol=1e-13)
    assert theorem2(seq).bound is None                           # no constants: terms only
    assert "2/L" in theorem2(seq, Constants(L=30.0, sigma2=1, G=1, f_gap=1)).note


def test_theorem4_terms_and_condition():
    s = sched(lr="decay", beta="increasing", gamma="constant", M=8, E=2, a_max=0.1, beta_min=0.5)
    seq = step_sequences(epoch_table(s, 30))
    t = theorem4(seq, Constants(L=1.0, sigma2=1.0, G=1.0, f_gap=1.0))
    K = len(seq.lr)
    sa = float(np.sum(seq.lr))
    assert t.B[-1] == pytest.approx(float(np.sum((1 - seq.beta) / seq.batch)) / sa)
    assert t.C[-1] == pytest.approx(float(np.sum(seq.lr ** 2)) / sa)
    assert t.D[-1] == pytest.approx(float(np.sum(seq.lr ** 2 / (1 - seq.beta))) / sa)
    assert t.condition_holds and t.bound is not None and len(t.bound) == K
    # beta_max = 0.96 with alpha = 0.1 breaks beta (alpha/2 + 1) <= 1 (the paper: beta_max <= 0.9523...)
    bad = theorem4(step_sequences(epoch_table(sched(lr="constant", beta="constant", beta_max=0.96, M=3), 16)))
    assert not bad.condition_holds and bad.first_violation == 0 and bad.bound is None


LR_KINDS = ("constant", "sqrt_decay", "cosine", "polynomial")


def assert_bounded(terms, closed: dict) -> None:
    """Every computed term is at most its closed form, for every K."""
    for name, bound in closed.items():
        term = getattr(terms, name)
        assert np.all(term <= bound * (1 + 1e-12)), (name, np.max(term / bound))


@pytest.mark.parametrize("bs,lr,a_min,p", [
    (bs, lr, a_min, p) for bs, lr, a_min, p in itertools.product(
        ("constant", "exponential"), LR_KINDS, (0.0, 0.02), (0.5, 2.0))
    if not (lr in ("constant", "sqrt_decay") and (a_min, p) != (0.0, 2.0))])
def test_corollary3_closed_forms_bound_the_terms_for_every_K(bs, lr, a_min, p):
    s = sched(bs=bs, lr=lr, a_min=a_min, p=p, M=60, E=6, b=8, a_max=0.2)
    table = epoch_table(s, 500)
    seq = step_sequences(table)
    t = theorem2(seq)
    K = np.arange(1, len(seq.lr) + 1)
    closed = corollary3(s, table, K)
    assert set(closed) == {"A", "B", "C"}
    assert_bounded(t, closed)


def test_corollary3_is_tight_for_constant_lr():
    s = sched(bs="constant", lr="constant", b=64, a_max=0.25, M=10)
    table = epoch_table(s, 1000)
    t = theorem2(step_sequences(table))
    K = np.arange(1, table.total_steps + 1)
    closed = corollary3(s, table, K)
    assert np.allclose(t.A, closed["A"], rtol=1e-12)           # A_K = 1/(alpha K) exactly
    assert np.allclose(t.B, closed["B"], rtol=1e-12)           # B_K = alpha/b exactly


@pytest.mark.parametrize("bs", ["constant", "exponential"])
@pytest.mark.parametrize("pair", [("sqrt_decay", "constant"), ("decay", "increasing")])
@pytest.mark.parametrize("a_max", [0.05, 0.5])
def test_corollary5_closed_forms_bound_the_terms_for_every_K(bs, pair, a_max):
    s = sched(bs=bs, lr=pair[0], beta=pair[1], gamma="constant", M=80, E=8, b=8, a_max=a_max,
              beta_max=0.5, beta_min=0.3)
    table = epoch_table(s, 200)
    t = theorem4(step_sequences(table))
    K = np.arange(1, table.total_steps + 1)
    closed = corollary5(s, table, K)
    assert set(closed) == {"A", "B", "C", "D"}
    assert_bounded(t, closed)


def test_paper_printed_forms_that_we_corrected_are_indeed_violated():
    """The discrepancies the module docstring lists are real (so the corrections are needed)."""
    s = sched(bs="constant", lr="cosine", M=60, E=6, a_max=0.2)
    table = epoch_table(s, 500)
    t = theorem2(step_sequences(table))
    K = table.total_steps
    printed_c = 0.7 * 0.9 * table.steps[0] * 6 / ((1 - 0.25) * (0.2 + 0.0) * K)   # no factor 2
    assert t.C[-1] > printed_c
    # Corollary 5 with one step per epoch (n = b), where the slack of sum alpha_k is smallest
    def theorem4_end(lr, beta):
        s5 = sched(bs="constant", lr=lr, beta=beta, gamma="constant", M=400, E=8, b=8, a_max=0.05,
                   beta_max=0.5, beta_min=0.3)
        table5 = epoch_table(s5, 8)
        return theorem4(step_sequences(table5)), table5.total_steps
    t5, K5 = theorem4_end("decay", "increasing")
    assert t5.D[-1] > 2 * 0.05 * 1 / ((1 - 0.3) * math.log(K5 + 1))                  # printed D' (decay)
    t5, K5 = theorem4_end("sqrt_decay", "constant")
    root = math.sqrt(K5 + 1) - 1
    assert t5.D[-1] > 0.05 / ((1 - 0.5) * root)                                        # printed D' (sqrt)
    assert t5.B[-1] > K5 * (1 - 0.5) / (8 * root)                                      # printed B' (sqrt)


def test_verdicts_name_the_regime():
    assert "O(1/K)" in verdict(sched(bs="exponential", lr="cosine"))
    assert "noise floor" in verdict(sched(bs="constant", lr="constant"))
    assert "O(log K/sqrt K)" in verdict(sched(bs="constant", lr="sqrt_decay"))
    assert "O(1/log K)" in verdict(sched(lr="decay", beta="increasing", gamma="constant"))
    assert "floor" in verdict(sched(beta="constant", gamma="constant"))


def test_two_million_steps_well_under_a_second():
    s = sched(bs="constant", lr="cosine", M=300, E=30, b=8)
    table = epoch_table(s, 50_000)
    assert table.total_steps == 300 * 6250
    t0 = time.perf_counter()
    out = summary(s, 50_000, Constants(L=1.0, sigma2=1.0, G=1.0, f_gap=1.0))
    elapsed = time.perf_counter() - t0
    assert out["K"] == 1_875_000 and out["theorem2"]["bound"] is not None
    print(f"bounds over {out['K']} steps: {elapsed * 1000:.0f} ms")
