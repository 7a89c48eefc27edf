r"""QHAdam: quasi-hyperbolic Adam (Ma & Yarats 2019, "Quasi-hyperbolic momentum and Adam for deep
learning", the Adam-family sibling of QHM), with qhoptim's parameter names.

.. math::
    w^{(i)}_k &= 1 + \beta_i\, w^{(i)}_{k-1}, \quad w^{(i)}_{-1} = 0, \qquad
        \hat\beta_{i,k} = 1 - 1/w^{(i)}_k \quad (i = 1, 2) \\
    g_{k+1} &= \hat\beta_{1,k}\, g_k + (1 - \hat\beta_{1,k})\, \nabla_k \\
    s_{k+1} &= \hat\beta_{2,k}\, s_k + (1 - \hat\beta_{2,k})\, \nabla_k^2 \\
    x_{k+1} &= x_k - \alpha\, \frac{(1-\nu_1) \nabla_k + \nu_1 g_{k+1}}
                                  {\sqrt{(1-\nu_2) \nabla_k^2 + \nu_2 s_{k+1}} + \epsilon}

The weights w make g and s the bias-corrected averages (Adam's correction, computed as running
normalisers rather than 1 - beta^k). ``nus = (1, 1)`` is Adam; ``nu1 = beta1`` with ``nu2 = 1`` is
NAdam's form. ``weight_decay`` is added to the gradient (coupled L2), or with
``decouple_weight_decay`` multiplies x by (1 - alpha wd) first (AdamW's decoupled decay).

Structure follows ``torch.optim.Adam``: :class:`QHAdam` collects tensors, the functional
:func:`qhadam` dispatches to a per-tensor loop or a multi-tensor (``torch._foreach_*``) kernel grouped
by device and dtype. Both apply the same operations in the same order as qhoptim's reference loop, so
in float64 they agree with it to rounding (the test compares 200 steps).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

__all__ = ["QHAdam", "qhadam"]


def _check(lr, betas, nus, weight_decay, eps) -> None:
    if not lr >= 0.0:
        raise ValueError(f"Invalid lr: {lr} (must be >= 0)")
    for i, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid betas[{i}]: {b} (must be in [0, 1))")
    for i, nu in enumerate(nus):
        if not 0.0 <= nu <= 1.0:
            raise ValueError(f"Invalid nus[{i}]: {nu} (must be in [0, 1])")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")
    if not eps >= 0.0:
        raise ValueError(f"Invalid eps: {eps} (must be >= 0)")


class QHAdam(Optimizer):
    """Quasi-hyperbolic Adam; see the module docstring for the algorithm.

    Args:
        params: iterable of parameters or param groups.
        lr: learning rate alpha (>= 0).
        betas: (beta1, beta2), the decays of the averages of the gradient and of its square.
        nus: (nu1, nu2) in [0, 1], how much of each average goes into the step (1: Adam's).
        weight_decay: L2 penalty (>= 0), added to the gradient, or decoupled.
        decouple_weight_decay: x *= 1 - lr * weight_decay before the step (AdamW's form).
        eps: added to the denominator.
        foreach: multi-tensor kernel; default: on where every tensor is on a native device.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), nus=(1.0, 1.0), weight_decay: float = 0.0,
                 decouple_weight_decay: bool = False, eps: float = 1e-8, *, foreach: Optional[bool] = None):
        _check(lr, betas, nus, weight_decay, eps)
        defaults = dict(lr=lr, betas=tuple(betas), nus=tuple(nus), weight_decay=weight_decay,
                        decouple_weight_decay=decouple_weight_decay, eps=eps, foreach=foreach)
        super().__init__(params, defaults)

    def _init_group(self, group, params, grads, averages, squares, states) -> None:
        params += [p for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("QHAdam does not support sparse gradients")
        grads += [p.grad for p in params]
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state["beta1_weight"], state["beta2_weight"] = 0.0, 0.0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states.append(state)
        averages += [s["exp_avg"] for s in states]
        squares += [s["exp_avg_sq"] for s in states]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _check(group["lr"], group["betas"], group["nus"], group["weight_decay"], group["eps"])
            params, grads, averages, squares, states = [], [], [], [], []
            self._init_group(group, params, grads, averages, squares, states)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            # the running normalisers, one pair per parameter as qhoptim keeps them: a parameter without a
            # gradient at some step skips it and its own normaliser with it. Parameters whose normalisers
            # agree (all of them, unless some skipped steps) share one kernel call.
            by_weights: dict[tuple, list[int]] = {}
            for i, s in enumerate(states):
                s["beta1_weight"] = 1.0 + beta1 * s["beta1_weight"]
                s["beta2_weight"] = 1.0 + beta2 * s["beta2_weight"]
                by_weights.setdefault((s["beta1_weight"], s["beta2_weight"]), []).append(i)
            for (w1, w2), index in by_weights.items():
                pick = (lambda xs: xs) if len(index) == len(states) else (lambda xs, index=index: [xs[i] for i in index])
                qhadam(pick(params), pick(grads), pick(averages), pick(squares), lr=group["lr"],
                       beta1_adj=1.0 - 1.0 / w1, beta2_adj=1.0 - 1.0 / w2, nus=group["nus"],
                       weight_decay=group["weight_decay"], decouple_weight_decay=group["decouple_weight_decay"],
                       eps=group["eps"], foreach=group["foreach"])
        return loss


def qhadam(params: list[Tensor], grads: list[Tensor], averages: list[Tensor], squares: list[Tensor], *,
           lr: float, beta1_adj: float, beta2_adj: float, nus, weight_decay: float, decouple_weight_decay: bool,
           eps: float, foreach: Optional[bool] = None) -> None:
    """Functional QHAdam: updates ``params``, ``averages`` (g) and ``squares`` (s) in place, with this
    step's bias-adjusted decays (see :class:`QHAdam`)."""
    if foreach is None:
        foreach = all(p.device.type in ("cpu", "cuda") for p in params) and not torch.jit.is_scripting()
    kernel = _multi_tensor_qhadam if foreach else _single_tensor_qhadam
    kernel(params, grads, averages, squares, lr=lr, beta1_adj=beta1_adj, beta2_adj=beta2_adj, nu1=nus[0],
           nu2=nus[1], weight_decay=weight_decay, decouple=decouple_weight_decay, eps=eps)


def _single_tensor_qhadam(params, grads, averages, squares, *, lr, beta1_adj, beta2_adj, nu1, nu2, weight_decay,
                          decouple, eps):
    for p, g, avg, sq in zip(params, grads, averages, squares):
        if weight_decay != 0:
            if decouple:
                p.mul_(1.0 - lr * weight_decay)
            else:
                g = g.add(p, alpha=weight_decay)
        g_sq = g.mul(g)
        avg.mul_(beta1_adj).add_(g, alpha=1.0 - beta1_adj)
        sq.mul_(beta2_adj).add_(g_sq, alpha=1.0 - beta2_adj)
        step = avg.mul(nu1)
        if nu1 != 1.0:
            step.add_(g, alpha=1.0 - nu1)
        rms = sq.mul(nu2)
        if nu2 != 1.0:
            rms.add_(g_sq, alpha=1.0 - nu2)
        rms.sqrt_()
        if eps != 0.0:
            rms.add_(eps)
        p.addcdiv_(step, rms, value=-lr)


def _multi_tensor_qhadam(params, grads, averages, squares, *, lr, beta1_adj, beta2_adj, nu1, nu2, weight_decay,
                         decouple, eps):
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, averages, squares])
    for (p, g, avg, sq), _ in grouped.values():
        if weight_decay != 0:
            if decouple:
                torch._foreach_mul_(p, 1.0 - lr * weight_decay)
            else:
                g = torch._foreach_add(g, p, alpha=weight_decay)
        g_sq = torch._foreach_mul(g, g)
        torch._foreach_mul_(avg, beta1_adj)
        torch._foreach_add_(avg, g, alpha=1.0 - beta1_adj)
        torch._foreach_mul_(sq, beta2_adj)
        torch._foreach_add_(sq, g_sq, alpha=1.0 - beta2_adj)
        step = torch._foreach_mul(avg, nu1)
        if nu1 != 1.0:
            torch._foreach_add_(step, g, alpha=1.0 - nu1)
        rms = torch._foreach_mul(sq, nu2)
        if nu2 != 1.0:
            torch._foreach_add_(rms, g_sq, alpha=1.0 - nu2)
        torch._foreach_sqrt_(rms)
        if eps != 0.0:
            torch._foreach_add_(rms, eps)
        torch._foreach_addcdiv_(p, step, rms, value=-lr)
