r"""Convergence bounds of the paper, computed from the step sequences for every K.

Theorem 2 (decreasing gamma*beta):
    min E||grad f||^2 <= c1 A_K + c2 sigma^2 B_K + c3 G^2 C_K,
    A_K = 1/sum alpha_k,  B_K = sum(alpha_k^2/b_k)/sum alpha_k,  C_K = sum(gamma_k beta_k)/sum alpha_k,
    c1 = 2(f(x0)-f*)/D, c2 = L/D, c3 = 2 alpha_max (1 + alpha_max L)/D, D = (1-gb)(2-alpha_max L),
    gb = sup_k gamma_k beta_k, alpha_max < 2/L.
Theorem 4 (increasing beta; needs beta_k (alpha_k/2 + 1) <= 1 for every k):
    min E||grad f||^2 <= 2(f(x0)-f*) A_K + 4 sigma^2 B'_K + 5 L^2 G^2 C'_K + 2 L^2 G^2 D'_K,
    B'_K = sum((1-beta_k)/b_k)/sum alpha_k, C'_K = sum alpha_k^2/sum alpha_k,
    D'_K = sum(alpha_k^2/(1-beta_k))/sum alpha_k.

Corollaries 3 and 5 give closed-form upper bounds of these terms. We derived each again from the
schedules; where the printed form is not an upper bound of the term it bounds, we use the derived one.
Every form bounds its term at every K it is evaluated at, with one restriction: Corollary 3's B_K for
polynomial LR with a constant batch holds at the end of training only (K = sum_m T_m; see END_ONLY),
and is NaN before. The tests check every form against the computed terms for every K of wide grids
of schedules, including the audit's cases. The corrections:
  * Corollary 3, C_K with cosine LR: the printed form lacks the factor 2 that A_K's cosine bound has
    (sum alpha_k >= K (alpha_max + alpha_min)/2); with it the bound holds.
  * Corollary 5, B'_K for sqrt-decay LR + constant beta + constant BS: the printed
    K(1-beta_max)/(b(sqrt(K+1)-1)) lacks 1/(2 alpha_max) (from sum alpha_k >= 2 alpha_max (sqrt(K+1)-1)).
  * Corollary 5, D'_K for sqrt-decay LR: the printed alpha_max/((1-beta_max)(sqrt(K+1)-1)) drops the
    T_0 (1 + log(K+1))/2 that C'_K's sqrt bound carries; we use alpha_max T_0 (1+log(K+1)) /
    (2 (1-beta_max)(sqrt(K+1)-1)).
  * Corollary 5, D'_K for decay LR + increasing beta: sum_m (m+1)^(-5/4) reaches zeta(5/4) ~ 4.6, not 2;
    we use 5 alpha_max T_0 / ((1-beta_min) log(K+1)).
All arrays are numpy, vectorised over K: ~2M steps take a few tens of milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional

import numpy as np

from .plan import EpochTable, Schedule, StepPlan, StepSequences, epoch_table, inverse_batch_sums, step_sequences

__all__ = ["Theorem2", "Theorem4", "theorem2", "theorem4", "corollary3", "corollary5", "verdict",
           "Constants", "summary", "Order", "term_orders", "theorem4_condition"]


@dataclass(frozen=True)
class Constants:
    """Problem constants of the theorems; each optional (without them only the terms are reported)."""
    L: Optional[float] = None          # smoothness
    sigma2: Optional[float] = None     # variance bound sigma^2
    G: Optional[float] = None          # gradient bound
    f_gap: Optional[float] = None      # f(x_0) - f_star

    def complete(self) -> tuple[float, float, float, float] | None:
        """(L, sigma2, G, f_gap) when every one is given, else None."""
        if self.L is None or self.sigma2 is None or self.G is None or self.f_gap is None:
            return None
        return self.L, self.sigma2, self.G, self.f_gap


@dataclass
class Theorem2:
    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    gamma_beta_sup: float
    alpha_max: float
    bound: Optional[np.ndarray] = None
    note: str = ""


@dataclass
class Theorem4:
    A: np.ndarray
    B: np.ndarray          # B'_K
    C: np.ndarray          # C'_K
    D: np.ndarray          # D'_K
    condition_holds: bool
    first_violation: Optional[int] = None   # first k with beta_k (alpha_k/2 + 1) > 1
    bound: Optional[np.ndarray] = None
    note: str = field(default="")


def _over_sum_alpha(numerators: np.ndarray, sum_alpha: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.cumsum(numerators) / sum_alpha


def theorem2(seq: StepSequences, constants: Constants = Constants()) -> Theorem2:
    sum_alpha = np.cumsum(seq.lr)
    with np.errstate(divide="ignore"):
        A = 1.0 / sum_alpha
    B = _over_sum_alpha(seq.lr ** 2 / seq.batch, sum_alpha)
    C = _over_sum_alpha(seq.gamma * seq.beta, sum_alpha)
    gb, a_max = float(np.max(seq.gamma * seq.beta)), float(np.max(seq.lr))
    out = Theorem2(A=A, B=B, C=C, gamma_beta_sup=gb, alpha_max=a_max)
    given = constants.complete()
    if given is not None:
        L, sigma2, G, f_gap = given
        if not a_max * L < 2:
            out.note = f"alpha_max={a_max} >= 2/L={2 / L}: Theorem 2 does not apply"
        elif not gb < 1:
            out.note = f"sup gamma*beta={gb} >= 1: Theorem 2 does not apply"
        else:
            D = (1 - gb) * (2 - a_max * L)
            out.bound = (2 * f_gap * A + L * sigma2 * B + 2 * a_max * (1 + a_max * L) * G ** 2 * C) / D
    return out


def theorem4(seq: StepSequences, constants: Constants = Constants()) -> Theorem4:
    sum_alpha = np.cumsum(seq.lr)
    with np.errstate(divide="ignore"):
        A = 1.0 / sum_alpha
    one_minus_beta = 1.0 - seq.beta
    B = _over_sum_alpha(one_minus_beta / seq.batch, sum_alpha)
    C = _over_sum_alpha(seq.lr ** 2, sum_alpha)
    D = _over_sum_alpha(seq.lr ** 2 / one_minus_beta, sum_alpha)
    bad = np.flatnonzero(seq.beta * (seq.lr / 2 + 1) > 1 + 1e-12)
    out = Theorem4(A=A, B=B, C=C, D=D, condition_holds=bad.size == 0,
                   first_violation=int(bad[0]) if bad.size else None)
    if not out.condition_holds:
        k = out.first_violation
        out.note = (f"beta_k (alpha_k/2 + 1) <= 1 fails first at k={k} "
                    f"(beta={seq.beta[k]:.6g}, alpha={seq.lr[k]:.6g}): Theorem 4 does not apply")
    elif (given := constants.complete()) is not None:
        L, sigma2, G, f_gap = given
        LG = L ** 2 * G ** 2
        out.bound = 2 * f_gap * A + 4 * sigma2 * B + 5 * LG * C + 2 * LG * D
    return out


# --------------------------------------------------------------------------------------------
# Closed forms (Corollaries 3 and 5), as arrays over K = 1..len(K).

def _common(schedule: Schedule, table: EpochTable):
    lr = schedule.lr
    return lr.max, lr.min, lr.power, int(table.steps[0]), schedule.batch


def corollary3(schedule: Schedule, table: EpochTable, K: np.ndarray) -> dict:
    """Upper bounds of A_K, B_K, C_K (step-decay beta and gamma); keys absent where not covered."""
    a, c, p, T0, bs = _common(schedule, table)
    K = np.asarray(K, dtype=np.float64)
    kind, out = schedule.lr.kind, dict[str, np.ndarray]()
    if schedule.lr.warmup:
        return out
    root = np.sqrt(K + 1) - 1
    mean = {"constant": a * K, "sqrt_decay": 2 * a * root, "cosine": (a + c) * K / 2,
            "polynomial": (a + p * c) * K / (p + 1)}.get(kind)
    if mean is None:
        return out
    out["A"] = 1.0 / mean
    if bs.kind == "constant":
        b = bs.size
        out["B"] = {"constant": np.full(K.shape, a / b),
                    "sqrt_decay": a * T0 * (1 + np.log(K + 1)) / (2 * b * root),
                    "cosine": (a + c) / b + T0 * (a - c) ** 2 / (2 * b * (a + c) * K),
                    "polynomial": ((p + 1) * a * a + 2 * p * a * c + 2 * p * p * c * c)
                    / (b * (2 * p + 1) * (a + p * c)) + (p + 1) * (a * a - c * c) * T0 / ((a + p * c) * K),
                    }[kind]
    else:
        b0, delta, E = bs.size, bs.growth, bs.interval
        out["B"] = a * a * T0 * E * delta / (b0 * (delta - 1)) / mean
    beta, gamma = schedule.beta, schedule.gamma
    if beta.kind == "step_decay" and gamma.kind == "step_decay" and beta.interval == gamma.interval:
        E = beta.interval
        out["C"] = gamma.max * beta.max * T0 * E / (1 - gamma.factor * beta.factor) / mean
    for name in END_ONLY.get((kind, bs.kind), ()):       # no claim before the end of training
        out[name] = np.where(K >= table.total_steps, out[name], np.nan)
    return out


# Closed forms that bound their term at K = sum_m T_m (the end of training) but not at every K before:
# polynomial LR with a constant batch. B_K is a running average of alpha_k weighted by alpha_k, so early
# in training it is near alpha_max/b, above the form's full-schedule average (n = 1000, b = 1, M = 300,
# alpha_max = 0.05, alpha_min = 0.005, p = 4: 1.42x the form at K = 35,000). Their values are NaN before.
END_ONLY = {("polynomial", "constant"): ("B",)}


def corollary5(schedule: Schedule, table: EpochTable, K: np.ndarray) -> dict:
    """Upper bounds of A_K, B'_K, C'_K, D'_K for (sqrt-decay LR, constant beta) and
    (decay LR, increasing beta); empty for other pairs."""
    a, _, _, T0, bs = _common(schedule, table)
    K = np.asarray(K, dtype=np.float64)
    pair = (schedule.lr.kind, schedule.beta.kind)
    if schedule.lr.warmup or pair not in (("sqrt_decay", "constant"), ("decay", "increasing")):
        return {}
    log = np.log(K + 1)
    if pair == ("sqrt_decay", "constant"):
        one_minus = 1 - schedule.beta.max
        sum_alpha = 2 * a * (np.sqrt(K + 1) - 1)
        C = a * T0 * (1 + log) / (2 * (np.sqrt(K + 1) - 1))
        D = C / one_minus
    else:
        one_minus = 1 - schedule.beta.min
        sum_alpha = a * log
        C = 2 * a * T0 / log
        D = 5 * a * T0 / (one_minus * log)
    if bs.kind == "constant":
        if pair == ("sqrt_decay", "constant"):
            B = K * one_minus / bs.size / sum_alpha
        else:
            B = T0 * (1 + 4 * one_minus * (K + 1) ** 0.25) / (bs.size * sum_alpha)
    else:
        factor = one_minus if pair == ("sqrt_decay", "constant") else 1.0
        B = factor * T0 * bs.interval * bs.growth / (bs.size * (bs.growth - 1)) / sum_alpha
    return {"A": 1.0 / sum_alpha, "B": B, "C": C, "D": D}


# --------------------------------------------------------------------------------------------
# Verdicts: how each term behaves as the run gets longer, derived from the schedule kinds, and the
# reading of Theorem 2 / Theorem 4 that follows. Cosine and polynomial LR are read as the paper's
# corollaries read them: bounded below on average (like a constant LR), their horizon growing with K.

@dataclass(frozen=True, order=True)
class Order:
    """A term's order as K grows: K^power (log K)^log_power. (0, 0) is a floor > 0; above it, growth."""
    power: Fraction
    log_power: int = 0

    @property
    def vanishes(self) -> bool:
        return (self.power, self.log_power) < (0, 0)

    def __str__(self) -> str:
        def k(p):
            return {Fraction(1): "K", Fraction(1, 2): "sqrt K"}.get(p, f"K^({p})")
        log = "" if self.log_power == 0 else ("log K" if abs(self.log_power) == 1 else f"(log K)^{abs(self.log_power)}")
        if (self.power, self.log_power) == (0, 0):
            return "tends to a floor > 0"
        if self.vanishes:
            num = log if self.log_power > 0 else "1"
            den = " ".join(x for x in (k(-self.power) if self.power else "", log if self.log_power < 0 else "") if x)
            return f"O({num}/{den})"
        tail = {1: f" {log}", -1: f"/{log}", 0: ""}[(self.log_power > 0) - (self.log_power < 0)]
        return f"grows like {k(self.power) if self.power else '1'}{tail}"


def _o(power, log_power=0) -> Order:
    return Order(Fraction(power), log_power)


FLOOR = _o(0)


def term_orders(schedule: Schedule) -> dict:
    """{"theorem2": {A, B, C}, "theorem4": {A, B', C', D'}}: each term's Order, from the schedule kinds.

    With K steps: sum alpha_k is K (constant, cosine, polynomial LR), sqrt K (sqrt decay) or log K
    (decay); sum gamma_k beta_k is finite when beta or gamma decays in steps (or is 0), else ~K; an
    exponential batch makes sum 1/b_k finite; increasing beta has 1 - beta_k ~ k^(-3/4).
    """
    lr = {"constant": "flat", "cosine": "flat", "polynomial": "flat", "wsd": "flat"}.get(schedule.lr.kind,
                                                                                           schedule.lr.kind)
    beta, gamma = schedule.beta, schedule.gamma
    exp_bs = schedule.batch.kind == "exponential"
    increasing = beta.kind == "increasing"
    A = {"flat": _o(-1), "sqrt_decay": _o(Fraction(-1, 2)), "decay": _o(0, -1)}[lr]
    gb_summable = (beta.kind == "step_decay" or gamma.kind == "step_decay" or gamma.max == 0
                   or (not increasing and beta.max == 0))
    over_sum = {"flat": FLOOR, "sqrt_decay": _o(Fraction(1, 2)), "decay": _o(1, -1)}[lr]   # ~K / sum alpha
    sq_over_sum = {"flat": FLOOR, "sqrt_decay": _o(Fraction(-1, 2), 1), "decay": A}[lr]    # sum alpha^2 / sum alpha
    t2 = {"A": A, "B": A if exp_bs else sq_over_sum, "C": A if gb_summable else over_sum}
    if increasing:                                       # sum (1 - beta_k) ~ K^(1/4)
        b4 = {"flat": _o(Fraction(-3, 4)), "sqrt_decay": _o(Fraction(-1, 4)), "decay": _o(Fraction(1, 4), -1)}[lr]
        d4 = {"flat": _o(Fraction(3, 4)), "sqrt_decay": _o(Fraction(1, 4)), "decay": A}[lr]
    else:                                                # 1 - beta_k bounded away from 0
        b4, d4 = over_sum, sq_over_sum
    t4 = {"A": A, "B'": A if exp_bs else b4, "C'": sq_over_sum, "D'": d4}
    return {"theorem2": t2, "theorem4": t4}


def theorem4_condition(schedule: Schedule, seq: StepSequences | None = None) -> bool:
    """beta_k (alpha_k/2 + 1) <= 1 at every epoch of the run (Theorem 4's hypothesis); with ``seq``, at
    every step it schedules."""
    if seq is not None:
        return bool(np.all(seq.beta * (seq.lr / 2 + 1) <= 1 + 1e-12))
    m = np.arange(schedule.epochs)
    return bool(np.all(schedule.beta.values(m) * (schedule.lr.values(m) / 2 + 1) <= 1 + 1e-12))


def verdict(schedule: Schedule, seq: StepSequences | None = None) -> str:
    """The reading of Theorem 2 and Theorem 4 for this schedule family, in one line, from
    :func:`term_orders` and Theorem 4's condition (over ``seq``'s steps where given). A piecewise batch
    is read as its last batch, held: constant as K grows."""
    orders = term_orders(schedule)
    parts, best = [], None
    for theorem, terms in (("Theorem 2", orders["theorem2"]), ("Theorem 4", orders["theorem4"])):
        if theorem == "Theorem 4" and not theorem4_condition(schedule, seq):
            parts.append("Theorem 4 does not apply (beta_k (alpha_k/2 + 1) <= 1 fails)")
            continue
        worst = max(terms.values())
        if worst.vanishes:
            parts.append(f"{theorem}: " + ", ".join(f"{k}_K {v}" for k, v in terms.items())
                         + f", so min E||grad f||^2 = {worst}")
            best = worst if best is None or worst < best else best
        else:
            culprits = ", ".join(f"{k}_K {v}" for k, v in terms.items() if not v.vanishes)
            why = " (the noise term sigma^2 B_K)" if theorem == "Theorem 2" and not terms["B"].vanishes else ""
            parts.append(f"{theorem}: {culprits}{why}: its bound does not vanish")
    head = (f"converges, min E||grad f||^2 = {best}" if best is not None
            else "no convergence guarantee from Theorem 2 or 4 (a noise or momentum floor, or a growing term)")
    return head + "; " + "; ".join(parts)


def summary(schedule: Schedule, n: int, constants: Constants = Constants(), batches=None,
            plan: StepPlan | None = None) -> dict:
    """The terms at the end of training, the closed forms there, and the verdict (for the CLI).
    ``batches``: the batches a run actually used, per epoch trained (see :func:`epoch_table`); the terms
    are then those of its K steps, and the corollaries (closed forms for eqs. 1 and 2) are left out.
    ``plan``: the run's steps, where its schedules move inside epochs (units step, sample, token): the
    terms are the theorems' sums over the steps it schedules, each at its own alpha_k, beta_k, gamma_k
    and b_k; the corollaries, closed forms per epoch, are left out."""
    if plan is not None:
        seq = plan.sequences(schedule)
        positions = plan.positions()
        epochs = positions["epoch"]
        nominal = np.bincount(epochs, weights=1.0 / positions["batch"])
        actual = np.bincount(epochs, weights=1.0 / positions["size"])
        batch_of = np.array([s.batch for s in plan.epoch_spans() if s.first == 0])
        total = plan.total_samples
    else:
        table = epoch_table(schedule, n, batches)
        seq = step_sequences(table)
        nominal, actual = inverse_batch_sums(table)
        batch_of, total = table.batch, table.total_samples
    K = len(seq.lr)
    t2, t4 = theorem2(seq, constants), theorem4(seq, constants)
    last = lambda x: None if x is None else float(x[-1])  # noqa: E731
    closed = batches is None and plan is None
    cor3 = {k: float(v[-1]) for k, v in corollary3(schedule, table, np.array([K])).items()} if closed else {}
    cor5 = {k: float(v[-1]) for k, v in corollary5(schedule, table, np.array([K])).items()} if closed else {}
    worst = int(np.argmax(actual / nominal))
    return {
        "n": int(n), "K": K, "total_samples": total,
        "partial_batches": {"excess": float(actual.sum() / nominal.sum() - 1),
                            "worst_epoch": worst, "worst_batch": int(batch_of[worst]),
                            "worst_excess": float(actual[worst] / nominal[worst] - 1)},
        "theorem2": {"A_K": last(t2.A), "B_K": last(t2.B), "C_K": last(t2.C),
                     "sup_gamma_beta": t2.gamma_beta_sup, "alpha_max": t2.alpha_max,
                     "bound": last(t2.bound), "note": t2.note, "corollary3": cor3},
        "theorem4": {"A_K": last(t4.A), "B'_K": last(t4.B), "C'_K": last(t4.C), "D'_K": last(t4.D),
                     "condition_holds": t4.condition_holds, "first_violation": t4.first_violation,
                     "bound": last(t4.bound), "note": t4.note, "corollary5": cor5},
        "verdict": verdict(schedule, seq if plan is not None else None),
    }
