"""The gradient noise scale, measured online from the two batch sizes every step already has
(McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", appendix A.1).

In a step, a gradient over b samples (this rank's share of the global batch; on one process under
accumulation, the first micro-batch) and the global batch's gradient over B samples satisfy
E|g_b|^2 = |G|^2 + tr(Sigma)/b and E|g_B|^2 = |G|^2 + tr(Sigma)/B, so

    |G|^2     ~ (B |g_B|^2 - b |g_b|^2) / (B - b)
    tr(Sigma) ~ (|g_b|^2 - |g_B|^2) / (1/b - 1/B)

are unbiased. Each step adds both estimates to the epoch's running sums (:class:`EpochSums`) with one
kernel, on the device; a steps.jsonl row reports the window's means and B_simple = tr(Sigma) / |G|^2, the
ratio of the means (a mean of per-step ratios is biased; McCandlish A.1 says the same).

Where the two squared norms come from:

- several ranks under DDP: a comm hook reads the norms of each gradient bucket before its all-reduce
  (this rank's sum, scaled by world/B by the loss), then all-reduces it with DDP's own operations (divide
  by the world size, sum), so the update is unchanged; once backward() returns, the step reads the
  norms of the reduced gradients (the global mean) in the main thread, so the hook's way back runs no
  Python beyond the one callback DDP requires. The squared norms are summed in parameter order at the
  step's end: DDP rebuilds its buckets after a process's first step, so per-bucket sums would round
  differently in a resumed process than in the uninterrupted one, and resume must give the same rows bit
  for bit. The explicit-reduce path (``max_micro_batch: auto``) records its gradients the same way on
  both sides of its all-reduce;
- one process under accumulation: the gradient after the first micro-batch and after the last;
- otherwise (one process and one micro-batch per step; DeepSpeed, whose ZeRO keeps gradients in its own
  partitioned buffers, out of reach of DDP's hooks) there is one batch size per step: null, said once.
"""
from __future__ import annotations

import torch

RANKS, FIRST_MICRO_BATCH = "ranks", "first micro-batch"


def source(recipe, world: int, accumulates: bool) -> tuple[str | None, str]:
    """(where the small batch comes from, or None; why not, for the log line). ``accumulates``: some
    stage of the plan runs more than one micro-batch per step."""
    if not recipe.tracking.noise_scale:
        return None, "tracking.noise_scale is off"
    if recipe.distributed.engine == "deepspeed":
        return None, "DeepSpeed keeps its gradients in its own partitioned buffers, out of reach of the hook"
    if world > 1:
        return RANKS, ""
    if accumulates or recipe.distributed.max_micro_batch == "auto":
        return FIRST_MICRO_BATCH, ""
    return None, "one process and no gradient accumulation: each step has one batch size"


def squared_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(grads)).to(torch.float64).square().sum()


def _bucket_result(fut):
    return fut.value()[0]


class NoiseProbe:
    """This rank's squared gradient norms of the step in progress, (small, big), on the device."""

    def __init__(self, kind: str | None, module: torch.nn.Module, world: int, device: torch.device):
        self.kind, self.module, self.world = kind, module, world
        self.squares = torch.zeros(2, dtype=torch.float64, device=device)
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self._position = {id(p): i for i, p in enumerate(self.trainable)}
        self._local: list[tuple[list, list]] = []      # RANKS: (parameters, their norms) per bucket, this step
        self._reduced: list | None = None              # RANKS: every gradient's norm after the all-reduce
        self._orders: dict[tuple, torch.Tensor] = {}   # the buckets' parameters -> parameter order
        self.small_batch = 0                       # samples behind squares[0] in this step
        self._coefficients: dict[tuple[int, int], torch.Tensor] = {}

    def start_step(self) -> None:
        """Before a step's first micro-batch (and before a step that is redone)."""
        if self.kind is not None:
            self._local, self._reduced, self.small_batch = [], None, 0

    def micro_step_done(self, index: int, last: bool, samples: int) -> None:
        """After micro-batch ``index``'s backward, which had ``samples`` samples on this rank."""
        if self.kind == RANKS:
            self.small_batch += samples            # the hook (or the explicit reduce) read the local norms
            if last and self._local and self._reduced is None:       # the hook's: the reduce is done
                self.record_reduced([p.grad for p in self.trainable])
        elif self.kind == FIRST_MICRO_BATCH and (index == 0 or last):
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            if index == 0:
                self.small_batch = samples
                self.squares[0] = squared_norm(grads)
            if last:
                self.squares[1] = squared_norm(grads)

    def end_step(self, sums, size: int) -> None:
        """After the update: the step's estimates into the running sums (a step with one batch size,
        or none on this rank, adds nothing)."""
        b = self.small_batch
        if self.kind is None or not 0 < b < size:
            return
        if self.kind == RANKS:
            self._sum_squares()
        key = (b, size)
        if key not in self._coefficients:
            self._coefficients[key] = coefficients(b, size, self.world if self.kind == RANKS else 1, self.squares.device)
        sums.add_noise(self._coefficients[key], self.squares)

    def _sum_squares(self) -> None:
        """squares = (sum of the local squared norms, of the reduced ones), each summed in parameter order:
        DDP rebuilds its buckets after a process's first step, so per-bucket sums would round differently
        in a resumed process than in the uninterrupted one, and resume must give the same rows bit for bit."""
        key = tuple(id(p) for params, _ in self._local for p in params)
        if key not in self._orders:
            where = [self._position[k] for k in key]
            order = sorted(range(len(where)), key=where.__getitem__)
            self._orders[key] = torch.tensor(order, device=self.squares.device)
        local = torch.stack([n for _, norms in self._local for n in norms])[self._orders[key]]
        both = torch.stack([local, torch.stack(self._reduced)]).to(torch.float64)
        torch.sum(both.square(), dim=1, out=self.squares)

    # the DDP side: a comm hook, and the explicit reduce's two reads

    def comm_hook(self, state, bucket):
        """DDP's all-reduce with this rank's bucket read before it: the bucket divided by the world size
        and summed over ranks, the same operations as DDP's own (its documented default hook), so the
        update is bit for bit the one without the hook. One callback, no other Python on the way back:
        the reduced gradients are read by the step once backward() returns."""
        self.record_local(bucket.parameters(), bucket.gradients())
        return torch.distributed.all_reduce(bucket.buffer().div_(self.world), group=state,
                                            async_op=True).get_future().then(_bucket_result)

    def record_local(self, params: list, grads: list[torch.Tensor]) -> None:
        """This rank's gradients of ``params`` (a bucket, or all), before the all-reduce: their norms."""
        self._local.append((params, torch._foreach_norm(grads)))

    def record_reduced(self, grads: list[torch.Tensor]) -> None:
        """The all-reduced mean gradients of every trainable parameter, in parameter order: their norms."""
        self._reduced = torch._foreach_norm(grads)


def coefficients(small: int, big: int, world: int, device: torch.device) -> torch.Tensor:
    """The 2x2 map from the raw squares (|this rank's accumulated gradient|^2, |g_B|^2) to the step's
    (|G|^2, tr(Sigma)) estimates. The loss is scaled by world/B, so the raw small gradient is
    world*b/B times the mean gradient over its b samples: its square is scaled by (B / (world b))^2."""
    b, B = float(small), float(big)
    scale = (B / (world * b)) ** 2
    inverse_gap = 1.0 / (1.0 / b - 1.0 / B)
    return torch.tensor([[-b * scale / (B - b), B / (B - b)],
                         [scale * inverse_gap, -inverse_gap]], dtype=torch.float64, device=device)


def window_fields(totals) -> dict:
    """``grad_sq``, ``trace_cov`` (means over the measured steps) and ``noise_scale`` from summed
    (grad_sq, trace_cov, steps); null where no step was measured, and the scale null unless both means
    are positive. Each is unbiased, not positive: over a short window either can fall below zero when
    the gradient is small against its noise (late in training, one outlier sample in the small batch
    gives tr(Sigma) < 0 with |G|^2 > 0, a ratio of exactly -4 at b = B/2), and a ratio of such is no scale."""
    grad_sq, trace, steps = (float(v) for v in totals)
    if steps == 0:
        return {"grad_sq": None, "trace_cov": None, "noise_scale": None}
    grad_sq, trace = grad_sq / steps, trace / steps
    return {"grad_sq": grad_sq, "trace_cov": trace,
            "noise_scale": trace / grad_sq if grad_sq > 0 and trace > 0 else None}
