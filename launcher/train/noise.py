"""The gradient noise scale, measured online from the two batch sizes every step already has
(McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", appendix A.1).

In a step, a gradient over b samples (this rank's share of the global batch; on one process under
accumulation, the first micro-batch) and the global batch's gradient over B samples satisfy
E|g_b|^2 = |G|^2 + tr(Sigma)/b and E|g_B|^2 = |G|^2 + tr(Sigma)/B, so

    |G|^2     ~ (B |g_B|^2 - b |g_b|^2) / (B - b)
    tr(Sigma) ~ (|g_b|^2 - |g_B|^2) / (1/b - 1/B)

are unbiased for samples drawn independently. An epoch is a permutation of the n training samples, so
a batch is drawn without replacement, E|g_b|^2 = |G|^2 + tr(S)/b (n - b)/n with S the covariance
over the n samples (divided by n - 1), and then the first estimate's expectation is |G|^2 - tr(S)/n
while the second's is tr(S). So the launcher adds the tr(Sigma) estimate over n back to the |G|^2 one:
both are unbiased for the data the run samples from, and B_simple = tr(S)/|G|^2 means the same on a
small dataset as on a large one (uncorrected, it is inflated by about 1/(1 - B_simple/n): measured at
fixed parameters on 1,024 samples, the |G|^2 estimate's mean ratio was 0.98, 0.77, 0.53 and -0.25 at
B_simple 22, 226, 464 and 1,241; corrected, 1.00-1.04). Each step's norms join the epoch's running sums
(:class:`EpochSums`), which add the estimates of many steps with one product on the device; a steps.jsonl
row reports the window's means and B_simple = tr(Sigma) / |G|^2, the ratio of the means (a mean of
per-step ratios is biased; McCandlish A.1 says the same).

Where the two squared norms come from:

- several ranks under DDP: this rank's accumulated gradient (its sum, scaled by world/B by the loss) is
  read at the end of the step's synchronised backward, by a callback queued ahead of DDP's own (when the
  first trainable parameter's gradient is complete): autograd runs its final callbacks in order, and DDP
  queues its own once every gradient is complete; that one copies the all-reduced mean into ``.grad``.
  Until then ``.grad`` is this rank's gradient, because DDP is built without ``gradient_as_bucket_view``
  where the noise scale is measured (it reduces a copy in its buckets: one more gradient's worth of memory
  and one more copy per step). DDP's reduce stays DDP's built-in one, so the update is bit for bit the one
  without measuring on any number of ranks (a Python comm hook that divided each bucket, as DDP's
  documented default hook does, gave other bits on 3 ranks: the built-in reduce multiplies by 1/world),
  and no Python runs on the communication thread. Once backward() returns, the step reads the norms of the
  reduced gradients (the global mean). Both sides are read per parameter, in parameter order, whatever
  DDP's buckets (it rebuilds them after a process's first step), so a resumed process gives the same rows
  bit for bit. The explicit-reduce path (``max_micro_batch: auto``) records its gradients the same way on
  both sides of its all-reduce;
- several ranks under FSDP: the same two gradients, read where FSDP has them
  (:class:`launcher.engines.fsdp.MeasuredReduceScatter`): each unit's reduce-scatter input is this rank's
  accumulated gradient of the unit (zero-padded); its norm is taken before FSDP's own reduce-scatter runs.
  The reduced gradient is sharded, so its squared norm is the sum of every rank's shards' squares (a 0-d
  all-reduce per step, on every rank). The norms come per unit, not per parameter: squares add up the
  same, to rounding (an FSDP run's rows equal a DDP run's to that, tests/launcher/test_fsdp.py);
- one process under accumulation: the gradient after the first micro-batch and after the last;
- otherwise (one process and one micro-batch per step, or FSDP on one process; DeepSpeed, whose ZeRO
  keeps gradients in its own partitioned buffers, out of reach of DDP's hooks) there is one batch size
  per step: null, said once.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from launcher import engines

if TYPE_CHECKING:
    from launcher.config import Recipe

RANKS, FIRST_MICRO_BATCH = "ranks", "first micro-batch"


def source(recipe: Recipe, world: int, accumulates: bool) -> tuple[str | None, str]:
    """(where the small batch comes from, or None; why not, for the log line). ``accumulates``: some
    stage of the plan runs more than one micro-batch per step."""
    if not recipe.tracking.noise_scale:
        return None, "tracking.noise_scale is off"
    why = engines.noise_refusal(recipe, world)
    if why is not None:
        return None, why
    if world > 1:
        return RANKS, ""
    if accumulates or recipe.distributed.max_micro_batch == "auto":
        return FIRST_MICRO_BATCH, ""
    return None, "one process and no gradient accumulation: each step has one batch size"


class NoiseProbe:
    """This rank's gradient norms of the step in progress, small batch and big, per parameter (0-d
    tensors on the device, as ``torch._foreach_norm`` gives them): under RANKS this rank's gradients
    before the all-reduce and after it, under FIRST_MICRO_BATCH after the first micro-batch and after
    the last. A measured step hands both to :meth:`EpochSums.add_noise` with the coefficients of their
    squares, and issues no other kernel."""

    def __init__(self, kind: str | None, module: torch.nn.Module, world: int, device: torch.device,
                 n: int | None = None):
        """``n``: the samples an epoch permutes (the estimates' finite-population correction)."""
        self.kind, self.module, self.world, self.device, self.n = kind, module, world, device, n
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self._small: tuple | None = None       # the small batch's norms, this step
        self._big: tuple | None = None         # the big batch's (the global batch's) norms, this step
        self.small_batch = 0                   # samples behind the small batch's gradient in this step
        self._matrices: dict[tuple, torch.Tensor] = {}    # (b, B, norms of each) -> the step's coefficients

    def start_step(self) -> None:
        """Before a step's first micro-batch (and before a step that is redone)."""
        if self.kind is not None:
            self._small, self._big, self.small_batch = None, None, 0

    def micro_step_done(self, index: int, last: bool, samples: int) -> None:
        """After micro-batch ``index``'s backward, which had ``samples`` samples on this rank."""
        if self.kind == RANKS:
            self.small_batch += samples            # the callback (or the explicit reduce) reads the local norms
            if last and self._small is not None and self._big is None:    # DDP's reduce is done
                self.record_reduced([p.grad for p in self.trainable])
        elif self.kind == FIRST_MICRO_BATCH and (index == 0 or last):
            norms = torch._foreach_norm([p.grad for p in self.module.parameters() if p.grad is not None])
            if index == 0:
                self.small_batch, self._small = samples, norms
            if last:
                self._big = norms

    def end_step(self, sums, size: int) -> None:
        """After the update: the step's norms into the running sums (a step with one batch size, or none
        on this rank, or whose gradients were not read, adds nothing)."""
        b = self.small_batch
        if self.kind is None or self._big is None or not 0 < b < size:
            return
        key = (b, size, len(self._small), len(self._big))
        matrix = self._matrices.get(key)
        if matrix is None:                         # C's first column once per small norm, its second per big
            c = coefficients(b, size, self.world if self.kind == RANKS else 1, self.device, self.n)
            matrix = c.repeat_interleave(torch.tensor(key[2:], device=self.device), dim=1)
            self._matrices[key] = matrix
        sums.add_noise(matrix, self._small + self._big)

    def read_local(self) -> None:
        """This rank's accumulated gradients, before DDP's reduce lands in them: their norms (a final
        callback of the synchronised backward, see the module docstring)."""
        self.record_local([p.grad for p in self.trainable])

    def record_norms(self, small: tuple, big: tuple) -> None:
        """Both sides at once, as norms of any pieces whose squares add up to each gradient's (FSDP's
        units before the reduce-scatter; the reduced gradient's norm over every rank's shards)."""
        self._small, self._big = small, big

    def record_local(self, grads: list[torch.Tensor]) -> None:
        """This rank's gradients of every trainable parameter, in parameter order, before the all-reduce."""
        self._small = torch._foreach_norm(grads)

    def record_reduced(self, grads: list[torch.Tensor]) -> None:
        """The all-reduced mean gradients of every trainable parameter, in parameter order: their norms."""
        self._big = torch._foreach_norm(grads)


def coefficients(small: int, big: int, world: int, device: torch.device, n: int | None = None) -> torch.Tensor:
    """The 2x2 map from the raw squares (|this rank's accumulated gradient|^2, |g_B|^2) to the step's
    (|G|^2, tr(Sigma)) estimates. The loss is scaled by world/B, so the raw small gradient is
    world*b/B times the mean gradient over its b samples: its square is scaled by (B / (world b))^2.
    ``n``: batches drawn without replacement from n samples: the |G|^2 row gets the tr row over n added
    (the module docstring)."""
    b, B = float(small), float(big)
    scale = (B / (world * b)) ** 2
    inverse_gap = 1.0 / (1.0 / b - 1.0 / B)
    grad_sq = [-b * scale / (B - b), B / (B - b)]
    trace = [scale * inverse_gap, -inverse_gap]
    if n:
        grad_sq = [g + t / n for g, t in zip(grad_sq, trace)]
    return torch.tensor([grad_sq, trace], dtype=torch.float64, device=device)


# Where the estimate cannot be trusted: a B_simple of n/TRUST_SHARE or more on a training set of n samples. An
# epoch is a permutation, so a batch comes from the samples the epoch has left, against parameters the samples
# before it shaped: the gradient over what is left outgrows the gradient over all n and |G|^2 comes out too large,
# B_simple too small (least squares while training under SGD, tests/launcher/test_noise_training.py: 0.96x the
# truth at B_simple 0.07 n, 0.84x at 0.13 n, 0.55x at 0.35 n, 0.22x at 1.3 n, the estimate stalling near 0.2-0.3 n
# whatever the truth; at fixed parameters it is unbiased at any size). From n/10 on it is a lower bound.
TRUST_SHARE = 10
TARGET_ERROR = 0.2         # a step row's B_simple: over the fewest recent log windows that reach this error
MIN_WINDOWS = 6            # the error is the spread of the windows' own estimates: at least this many
KEEP_WINDOWS = 1024        # the log windows kept to look back over (a bounded checkpoint part)
REGIME_EPOCHS = 3          # the epochs whose estimate says whether a row can be trusted (TRUST_SHARE)


def trust(noise_scale: float | None, n: int | None, regime: float | None = None) -> dict:
    """``noise_scale`` as a row gives it: itself, or null with ``noise_scale_lower_bound`` and the reason
    where the regime is n/TRUST_SHARE or more (see TRUST_SHARE). The regime is ``regime``, the last whole
    epochs' estimate where there is one (a row judged by its own value would pass exactly where noise put
    it low: the rows kept near the line would be biased low), else the row's own."""
    judged = regime if regime is not None else noise_scale
    if noise_scale is None or not n or judged < n / TRUST_SHARE:
        return {"noise_scale": noise_scale}
    return {"noise_scale": None, "noise_scale_lower_bound": noise_scale,
            "noise_scale_reason": f"B_simple {noise_scale:.4g} >= n/{TRUST_SHARE} of the {n:,} training samples: "
                                  "batches drawn from what an epoch has left overstate |G|^2 against parameters "
                                  "the samples before them shaped, so this is a lower bound"}


def window_fields(totals, n: int | None = None) -> dict:
    """``grad_sq``, ``trace_cov`` (means over the measured steps) and ``noise_scale`` from summed
    (grad_sq, trace_cov, steps); null where no step was measured, and the scale null unless both means
    are positive. Each is unbiased, not positive: over a short window either can fall below zero when
    the gradient is small against its noise (late in training, one outlier sample in the small batch
    gives tr(Sigma) < 0 with |G|^2 > 0, a ratio of exactly -4 at b = B/2), and a ratio of such is no scale."""
    grad_sq, trace, steps = (float(v) for v in totals)
    if steps == 0:
        return {"grad_sq": None, "trace_cov": None, "noise_scale": None}
    grad_sq, trace = grad_sq / steps, trace / steps
    out = {"grad_sq": grad_sq, "trace_cov": trace}
    if grad_sq > 0 and trace > 0:
        return out | trust(trace / grad_sq, n)
    return out | {"noise_scale": None, "noise_scale_reason": non_positive(grad_sq, int(steps))}


def non_positive(grad_sq: float, steps: int) -> str:
    """Why a window's estimates give no scale: one of them is not positive."""
    which = "|G|^2" if grad_sq <= 0 else "tr(Sigma)"
    return (f"the {which} estimate is <= 0 over {steps:,} step(s): the noise outweighs the gradient there "
            "(a longer window: more steps)")


def variance_margin(dof: int) -> float:
    """sqrt(dof / chi2_0.1(dof)): a standard deviation from ``dof`` degrees of freedom widened to the 90%
    upper bound of its variance (chi-square's 10% quantile by the Wilson-Hilferty cube, within 2% from 3
    degrees of freedom on)."""
    z, a = -1.2815516, 2.0 / (9.0 * dof)
    return (1.0 / max(1.0 - a + z * a ** 0.5, 1e-3) ** 3) ** 0.5


class NoiseWindows:
    """The step rows' B_simple, each over the fewest recent log windows whose estimates reach TARGET_ERROR.

    A log window's |G|^2 and tr(Sigma) means are noisy (their ratio more so: over 10 steps at B_simple near
    the batch, a third of them are not even positive). So a step row's ``noise_scale`` is the ratio of the
    means over the log windows ending at it, taking more windows (back to KEEP_WINDOWS) until its relative
    error is at most TARGET_ERROR; ``noise_scale_error`` is that error and ``noise_scale_steps`` the steps it
    spans. The error is the windows' batch means: the spread of each window's estimates around the span's
    mean, weighted by its steps (the standard error of a mean, not assuming the steps independent within a
    window), through the ratio's first-order error, widened to the 90% upper bound of a variance estimated
    from k windows (a few windows that happen to agree state no false precision). A drifting scale widens
    it too (conservative). Where no span reaches the target, the row is null, with the reason and the best
    error found.

    State: the windows' (|G|^2 sum, tr sum, steps) since the run began, newest last, as every rank has them
    (a replicated checkpoint part: rows after a resume are the same)."""

    def __init__(self, n: int | None = None, world: int = 1):
        """``n``: the training samples an epoch permutes (see TRUST_SHARE); ``world``: the ranks whose
        measured steps a window's count adds up."""
        self.n, self.world = n, world
        self.windows: list[tuple[float, float, int]] = []
        self.epochs: list[tuple[float, float]] = []   # the last REGIME_EPOCHS epochs' summed (|G|^2, tr(Sigma))

    @property
    def epoch_scale(self) -> float | None:
        """B_simple over the last REGIME_EPOCHS whole epochs: the regime a row is judged in (None before
        the first epoch ends, or where a mean is not positive)."""
        grad_sq, trace = sum(g for g, _ in self.epochs), sum(t for _, t in self.epochs)
        return trace / grad_sq if self.epochs and grad_sq > 0 and trace > 0 else None

    def state_dict(self) -> dict:
        return {"windows": [list(w) for w in self.windows], "epochs": [list(e) for e in self.epochs], "version": 1}

    def load_state_dict(self, state: dict) -> None:
        self.windows = [(float(g), float(t), int(k)) for g, t, k in state.get("windows", [])]
        self.epochs = [(float(g), float(t)) for g, t in state.get("epochs", [])]

    def end_epoch(self, totals) -> None:
        """An epoch's summed (|G|^2, tr(Sigma), measured steps) over all ranks, for the regime."""
        grad_sq, trace, steps = (float(v) for v in totals)
        if steps:
            self.epochs = (self.epochs + [(grad_sq / steps, trace / steps)])[-REGIME_EPOCHS:]

    def add(self, totals) -> dict:
        """A log window's summed (|G|^2, tr(Sigma), measured steps): the step row's noise fields."""
        grad_sq, trace, steps = (float(v) for v in totals)
        if steps == 0:
            return {}
        self.windows = (self.windows + [(grad_sq, trace, int(steps))])[-KEEP_WINDOWS:]
        return self.estimate()

    def estimate(self) -> dict:
        """The newest span's B_simple (see the class docstring)."""
        best = None
        n_sum = g_sum = t_sum = 0.0                         # steps, and the estimates' sums, over the span
        sq = {"n2": 0.0, "n2g": 0.0, "n2t": 0.0, "n2gg": 0.0, "n2tt": 0.0, "n2gt": 0.0}   # sums of w^2 x ...
        for k, (g_total, t_total, steps) in enumerate(reversed(self.windows), start=1):
            g, t, w = g_total / steps, t_total / steps, float(steps)       # the window's means, its weight
            n_sum, g_sum, t_sum = n_sum + w, g_sum + g_total, t_sum + t_total
            for key, value in (("n2", 1.0), ("n2g", g), ("n2t", t), ("n2gg", g * g), ("n2tt", t * t), ("n2gt", g * t)):
                sq[key] += w * w * value
            if k < MIN_WINDOWS:
                continue
            mg, mt = g_sum / n_sum, t_sum / n_sum
            if mg <= 0 or mt <= 0:
                continue
            scale = k / (k - 1) / n_sum ** 2            # the weighted batch means' variance of the mean
            var_g = scale * (sq["n2gg"] - 2 * mg * sq["n2g"] + mg * mg * sq["n2"])
            var_t = scale * (sq["n2tt"] - 2 * mt * sq["n2t"] + mt * mt * sq["n2"])
            cov = scale * (sq["n2gt"] - mg * sq["n2t"] - mt * sq["n2g"] + mg * mt * sq["n2"])
            error = max(var_t / mt ** 2 + var_g / mg ** 2 - 2 * cov / (mt * mg), 0.0) ** 0.5 * variance_margin(k - 1)
            if best is None or error < best[0]:
                best = (error, mt / mg, int(n_sum) // self.world)
            if error <= TARGET_ERROR:
                return trust(mt / mg, self.n, self.epoch_scale) | {"noise_scale_error": error,
                                                                    "noise_scale_steps": int(n_sum) // self.world}
        if best is None and len(self.windows) < MIN_WINDOWS:
            return {"noise_scale": None, "noise_scale_reason": f"fewer than {MIN_WINDOWS} log windows so far"}
        if best is None:
            which = "|G|^2" if mg <= 0 else "tr(Sigma)"
            return {"noise_scale": None, "noise_scale_reason": f"the {which} estimate's mean is <= 0 over every span of "
                                                               f"{MIN_WINDOWS} to {len(self.windows)} log windows back "
                                                               "from here: the noise outweighs the gradient"}
        return {"noise_scale": None, "noise_scale_reason": f"not precise: {best[0]:.0%} relative error at best "
                                                           f"(over {best[2]:,} steps), more than {TARGET_ERROR:.0%}"}
