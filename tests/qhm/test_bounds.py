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
    """Every computed term is at most its closed form, at every K where the form makes a claim (NaN:
    none). 1e-9 relative: the tight constant-LR forms equal their terms up to the rounding of a cumsum."""
    for name, bound in closed.items():
        term = getattr(terms, name)
        claimed = ~np.isnan(bound)
        assert claimed[-1], f"{name}: every form holds at the end of training"
        assert np.all(term[claimed] <= bound[claimed] * (1 + 1e-9)), (name, np.max(term[claimed] / bound[claimed]))


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
    assert "the noise term" in verdict(sched(bs="constant", lr="constant"))
    assert "O(log K/sqrt K)" in verdict(sched(bs="constant", lr="sqrt_decay"))
    assert "O(1/log K)" in verdict(sched(lr="decay", beta="increasing", gamma="constant"))
    assert "floor" in verdict(sched(beta="constant", gamma="constant"))


def test_the_audit_s_decay_case_is_read_right():
    """Decay LR with constant beta and gamma: C_K grows (it does not tend to a floor), and with an
    exponential batch Theorem 4's conditions hold."""
    v = verdict(sched(bs="exponential", lr="decay", beta="constant", gamma="constant", beta_max=0.5))
    assert "C_K grows like K/log K" in v and v.startswith("converges, min E||grad f||^2 = O(1/log K)")
    assert "Theorem 4: A_K O(1/log K)" in v
    seq = step_sequences(epoch_table(sched(bs="exponential", lr="decay", beta="constant", gamma="constant",
                                           beta_max=0.5, M=200, E=20), 400))
    C = theorem2(seq).C
    assert C[-1] > 5 * C[len(C) // 20]                       # grows, by a lot


# --- every combination of schedule kinds: the verdict's orders against plain sums over long horizons

def _plain_terms(bs, lr, beta, gamma, M, n=20, b=10, E=10, a=0.1, beta_max=0.5, beta_min=0.5, gamma_max=0.5):
    """Theorem 2 and 4 terms at the end of an M-epoch run, as plain sums over epochs (T_m steps each)
    written out here from the paper's formulas, not through qhm: an independent computation."""
    m = np.arange(M, dtype=np.float64)
    stage = np.floor(m / E)
    size = np.full(M, float(b)) if bs == "constant" else b * np.power(2.0, np.minimum(stage, 1000))
    steps = np.maximum(1, np.ceil(n / size))
    alpha = {"constant": np.full(M, a), "sqrt_decay": a / np.sqrt(m + 1), "decay": a / (m + 1),
             "cosine": a / 2 * (1 + np.cos(m * math.pi / (M - 1))), "polynomial": a * (1 - m / M) ** 2}[lr]
    bet = {"constant": np.full(M, beta_max), "step_decay": beta_max * 0.5 ** stage,
           "increasing": 1 - (1 - beta_min) / (m + 1) ** 0.75}[beta]
    gam = {"constant": np.full(M, gamma_max), "step_decay": gamma_max * 0.5 ** stage}[gamma]
    total = lambda x: float(np.sum(steps * x))  # noqa: E731
    s = total(alpha)
    return {"A": 1 / s, "B": total(alpha ** 2 / size) / s, "C": total(gam * bet) / s,
            "B'": total((1 - bet) / size) / s, "C'": total(alpha ** 2) / s, "D'": total(alpha ** 2 / (1 - bet)) / s}


COMBINATIONS = list(itertools.product(("constant", "exponential"),
                                      ("constant", "sqrt_decay", "decay", "cosine", "polynomial"),
                                      ("constant", "step_decay", "increasing"), ("constant", "step_decay")))


@pytest.mark.parametrize("bs,lr,beta,gamma", COMBINATIONS)
def test_every_combination_s_term_orders_match_plain_sums(bs, lr, beta, gamma):
    from qhm.bounds import term_orders
    M1 = 2000
    short, long = _plain_terms(bs, lr, beta, gamma, M1), _plain_terms(bs, lr, beta, gamma, 64 * M1)
    orders = term_orders(sched(bs=bs, lr=lr, beta=beta, gamma=gamma, M=20, E=10, b=10, a_max=0.1,
                               beta_max=0.5, beta_min=0.5, gamma_max=0.5))
    for theorem in ("theorem2", "theorem4"):
        for name, order in orders[theorem].items():
            ratio = long[name] / short[name]
            if order.vanishes:
                assert ratio < 0.9, (theorem, name, str(order), ratio)
            elif (order.power, order.log_power) == (0, 0):
                assert 0.8 < ratio < 1.25, (theorem, name, str(order), ratio)
            else:
                assert ratio > 1.1, (theorem, name, str(order), ratio)


def test_zero_momentum_weights_make_gamma_beta_summable():
    assert "C_K O(1/K)" in verdict(sched(bs="exponential", lr="constant", beta="constant", gamma="constant",
                                         gamma_max=0.0))
    assert "C_K O(1/K)" in verdict(sched(bs="exponential", lr="constant", beta="constant", gamma="constant",
                                         beta_max=0.0))


def test_theorem_4_condition_failing_is_said():
    assert "Theorem 4 does not apply" in verdict(sched(lr="constant", beta="constant", beta_max=0.96))


# --- the audit's cases for the closed forms

def _poly_constant(n, b, M, a_max, a_min, p, E=1):
    s = sched(bs="constant", lr="polynomial", b=b, M=M, E=E, a_max=a_max, a_min=a_min, p=p)
    table = epoch_table(s, n)
    return s, table, theorem2(step_sequences(table))


@pytest.mark.parametrize("n,b,a_max,a_min,p,K,worst", [(1000, 1, 0.05, 0.005, 4.0, 35_000, 1.4),
                                                        (1000, 3, 1.0, 0.1, 2.0, None, 1.15)])
def test_polynomial_constant_batch_B_is_claimed_at_the_end_only(n, b, a_max, a_min, p, K, worst):
    s, table, t = _poly_constant(n, b, 300, a_max, a_min, p)
    Ks = np.arange(1, table.total_steps + 1)
    # the printed form, by hand, as a function of K: below the term somewhere before the end
    T0 = table.steps[0]
    printed = (((p + 1) * a_max ** 2 + 2 * p * a_max * a_min + 2 * p * p * a_min ** 2)
               / (b * (2 * p + 1) * (a_max + p * a_min)) + (p + 1) * (a_max ** 2 - a_min ** 2) * T0 / ((a_max + p * a_min) * Ks))
    ratio = t.B / printed
    assert ratio.max() > worst and ratio[-1] <= 1
    if K is not None:
        assert ratio[K - 1] > worst
    closed = corollary3(s, table, Ks)
    assert np.isnan(closed["B"][:-1]).all() and closed["B"][-1] == pytest.approx(printed[-1], rel=1e-12)
    assert_bounded(t, closed)


def test_a_non_integer_growth_rounds_up_and_the_exponential_forms_hold():
    s = sched(bs="exponential", lr="constant", b=3, M=60, E=1, a_max=0.1)
    s = Schedule(epochs=60, batch=BatchSchedule("exponential", 3, growth=1.5, interval=1), lr=s.lr, beta=s.beta,
                 gamma=s.gamma)
    table = epoch_table(s, 2)
    expect = [math.ceil(3 * 1.5 ** m - 1e-9) for m in range(60)]          # by hand: 3, 5 (4.5), 7 (6.75), ...
    assert table.batch.tolist() == expect and expect[:4] == [3, 5, 7, 11]
    assert all(int(got) >= 3 * 1.5 ** m for m, got in enumerate(table.batch))
    t = theorem2(step_sequences(table))
    assert_bounded(t, corollary3(s, table, np.arange(1, table.total_steps + 1)))


def test_a_batch_that_outgrows_an_int64_is_refused_naming_the_epoch():
    with pytest.raises(ValueError, match="passes it at epoch 60"):
        sched(bs="exponential", b=8, M=70, E=1)


def test_two_million_steps_well_under_a_second():
    s = sched(bs="constant", lr="cosine", M=300, E=30, b=8)
    table = epoch_table(s, 50_000)
    assert table.total_steps == 300 * 6250
    t0 = time.perf_counter()
    out = summary(s, 50_000, Constants(L=1.0, sigma2=1.0, G=1.0, f_gap=1.0))
    elapsed = time.perf_counter() - t0
    assert out["K"] == 1_875_000 and out["theorem2"]["bound"] is not None
    print(f"bounds over {out['K']} steps: {elapsed * 1000:.0f} ms")


def test_partial_last_batches_against_the_bounds_assumption_by_hand():
    from qhm import inverse_batch_sums
    s = sched(bs="constant", lr="constant", b=4096, M=2, E=1)
    nominal, actual = inverse_batch_sums(epoch_table(s, 50_000))
    assert nominal[0] == pytest.approx(13 / 4096, rel=1e-15)                      # T = ceil(50000/4096) = 13
    assert actual[0] == pytest.approx(12 / 4096 + 1 / 848, rel=1e-15)              # 50000 - 12 * 4096 = 848
    assert actual[0] / nominal[0] - 1 == pytest.approx(0.2946, abs=1e-4)           # the issue's ~30%
    out = summary(s, 50_000)
    assert out["partial_batches"]["worst_excess"] == pytest.approx(actual[0] / nominal[0] - 1)
