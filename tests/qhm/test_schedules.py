"""Schedules and their expansion, against the paper's formulas computed by hand."""
import math

import numpy as np
import pytest

from qhm import (BatchSchedule, BetaSchedule, GammaSchedule, LRSchedule, Schedule, epoch_table,
                 step_sequences)


def test_batch_constant_and_exponential_at_stage_boundaries():
    assert BatchSchedule("constant", 256)(0) == 256 and BatchSchedule("constant", 256)(299) == 256
    b = BatchSchedule("exponential", 8, growth=2, interval=30)   # the paper's b_0 = 2^3, delta = 2, E = 30
    assert [b(m) for m in (0, 29, 30, 59, 60, 299)] == [8, 8, 16, 16, 32, 8 * 2 ** 9]


def test_lr_schedules_by_hand():
    M = 300
    assert LRSchedule("constant", 0.1, epochs=M)(123) == 0.1
    assert LRSchedule("sqrt_decay", 0.1, epochs=M)(3) == pytest.approx(0.1 / 2)
    assert LRSchedule("decay", 0.1, epochs=M)(4) == pytest.approx(0.1 / 5)
    cos = LRSchedule("cosine", 0.5, 0.1, epochs=M)
    assert cos(0) == pytest.approx(0.5) and cos(M - 1) == pytest.approx(0.1)
    assert cos(1) == pytest.approx(0.1 + 0.4 / 2 * (1 + math.cos(math.pi / (M - 1))))
    assert LRSchedule("cosine", 0.5, 0.1, epochs=1)(0) == 0.5          # M = 1
    poly = LRSchedule("polynomial", 0.5, 0.1, power=2, epochs=M)
    assert poly(0) == pytest.approx(0.5)
    assert poly(M - 1) == pytest.approx(0.1 + 0.4 * (1 / M) ** 2)      # last epoch is not 0
    assert poly(150) == pytest.approx(0.1 + 0.4 * 0.25)


def test_warmup_is_off_by_default_and_linear_when_on():
    base = LRSchedule("cosine", 0.4, 0.0, epochs=10)
    warm = LRSchedule("cosine", 0.4, 0.0, epochs=10, warmup=3)
    assert warm(0) == pytest.approx(base(0) / 4) and warm(2) == pytest.approx(base(2) * 3 / 4)
    assert warm(3) == pytest.approx(base(3)) and warm(9) == base(9)


def test_momentum_schedules_by_hand():
    b = BetaSchedule("step_decay", max=0.9, factor=0.5, interval=30)
    assert [b(m) for m in (0, 29, 30, 60)] == pytest.approx([0.9, 0.9, 0.45, 0.225])
    inc = BetaSchedule("increasing", min=0.5)
    assert inc(0) == pytest.approx(0.5) and inc(15) == pytest.approx(1 - 0.5 / 16 ** 0.75)
    g = GammaSchedule("step_decay", max=0.7, factor=0.5, interval=30)
    assert [g(m) for m in (0, 30, 90)] == pytest.approx([0.7, 0.35, 0.0875])
    assert GammaSchedule("constant", 1.0)(17) == 1.0


@pytest.mark.parametrize("ctor,field", [
    (lambda: BatchSchedule("exponential", 8, growth=1.0), "batch.growth"),
    (lambda: BatchSchedule("constant", 0), "batch.size"),
    (lambda: BatchSchedule("linear", 8), "batch.kind"),
    (lambda: BatchSchedule("exponential", 8, interval=0), "interval"),
    (lambda: LRSchedule("cosine", 0.1, 0.2, epochs=3), "lr.min"),
    (lambda: LRSchedule("cosine", -0.1, epochs=3), "lr.max"),
    (lambda: LRSchedule("polynomial", 0.1, power=0, epochs=3), "lr.power"),
    (lambda: LRSchedule("constant", 0.1, epochs=0), "epochs"),
    (lambda: BetaSchedule("step_decay", factor=1.0), "beta.factor"),
    (lambda: BetaSchedule("constant", max=1.0), "beta.max"),
    (lambda: GammaSchedule("step_decay", factor=0.0), "gamma.factor"),
    (lambda: GammaSchedule("constant", max=1.2), "gamma.max"),
])
def test_invalid_fields_raise_naming_the_field(ctor, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ctor()


def paper_schedule(M=12, E=4):
    return Schedule(epochs=M, batch=BatchSchedule("exponential", 8, growth=2, interval=E),
                    lr=LRSchedule("cosine", 0.1, 0.0, epochs=M),
                    beta=BetaSchedule("step_decay", max=0.9, factor=0.5, interval=E),
                    gamma=GammaSchedule("step_decay", max=0.7, factor=0.5, interval=E))


def test_epoch_table_and_step_sequences():
    n = 1000
    table = epoch_table(paper_schedule(), n)
    assert table.batch.tolist() == [8] * 4 + [16] * 4 + [32] * 4
    assert table.steps.tolist() == [125] * 4 + [63] * 4 + [32] * 4      # ceil(1000/16) = 63
    assert table.total_steps == 4 * (125 + 63 + 32)
    assert table.total_samples == 12 * n
    seq = step_sequences(table)
    assert len(seq.lr) == table.total_steps
    # first step of epoch 4 (the batch switch) carries epoch 4's values
    k = 4 * 125
    assert seq.batch[k - 1] == 8 and seq.batch[k] == 16
    assert seq.lr[k] == pytest.approx(0.05 * (1 + math.cos(4 * math.pi / 11)))
    assert seq.beta[k] == pytest.approx(0.45) and seq.gamma[k] == pytest.approx(0.35)
    assert seq.lr[-1] == pytest.approx(0.0, abs=1e-15)


def test_m_equals_one():
    s = Schedule(epochs=1, batch=BatchSchedule("constant", 10), lr=LRSchedule("cosine", 0.3, epochs=1),
                 beta=BetaSchedule("constant", 0.9), gamma=GammaSchedule("constant", 0.7))
    table = epoch_table(s, 25)
    assert table.steps.tolist() == [3] and table.lr.tolist() == [0.3]


def test_vectorised_values_equal_scalar_calls():
    s = paper_schedule(M=40, E=7)
    m = np.arange(40)
    for sched in (s.batch, s.lr, s.beta, s.gamma):
        assert np.allclose(sched.values(m), [sched(int(i)) for i in m], rtol=0, atol=0)


def test_increasing_beta_per_epoch_or_in_stages_as_the_paper_s_code():
    per_epoch = BetaSchedule("increasing", min=0.5, interval=3)
    staged = BetaSchedule("increasing", min=0.5, interval=3, staged=True)
    for m in range(10):
        assert per_epoch(m) == pytest.approx(1 - 0.5 / (m + 1) ** 0.75, rel=1e-15)       # eq. (10)
        assert staged(m) == pytest.approx(1 - 0.5 / (m // 3 + 1) ** 0.75, rel=1e-15)    # the code's stages
