r"""Mini-batch Quasi-Hyperbolic Momentum (Algorithm 1 of the paper).

.. math::
    d_k &= (1-\beta_k)\, g_k + \beta_k\, d_{k-1}, \qquad d_{-1} = 0 \\
    m_k &= (1-\gamma_k)\, g_k + \gamma_k\, d_k \\
    x_{k+1} &= x_k - \alpha_k\, m_k

``g_k`` is the mini-batch gradient; with ``weight_decay`` > 0 it is ``g_k + wd * x_k`` (coupled L2, as
in ``torch.optim.SGD``). One buffer per parameter (``momentum_buffer`` = d_k); m_k is never stored.
gamma = 0 is SGD, gamma = 1 is normalised heavy ball (NSHB), gamma = beta is stochastic Nesterov.

Structure follows ``torch.optim.SGD``: :class:`QHM` collects tensors, the functional :func:`qhm`
dispatches to a per-tensor loop, a multi-tensor (``torch._foreach_*``) kernel grouped by device and
dtype, or a single-pass kernel compiled once per process by torch.compile (``compiled=True``; on CPU
tensors, where it was measured to win. CUDA tensors use the foreach kernel, faster there, and the
optimizer says so once). ``fused=True`` is the earlier name of ``compiled=True``.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

__all__ = ["QHM", "qhm", "from_torch_sgd", "to_torch_sgd", "PRESETS"]


def _check_hyperparams(lr, beta, gamma, weight_decay) -> None:
    if not lr >= 0.0:
        raise ValueError(f"Invalid lr: {lr} (must be >= 0)")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"Invalid beta: {beta} (must be in [0, 1))")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"Invalid gamma: {gamma} (must be in [0, 1])")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")


class QHM(Optimizer):
    r"""Quasi-hyperbolic momentum; see the module docstring for the algorithm.

    Args:
        params: iterable of parameters or param groups.
        lr: learning rate alpha (>= 0).
        beta: momentum weight beta in [0, 1): the decay of the buffer d.
        gamma: momentum weight gamma in [0, 1]: how much of d goes into the step.
        weight_decay: coupled L2 penalty added to the gradient (>= 0).
        maximize: ascend instead of descend.
        foreach: multi-tensor kernel; default: on where every tensor is on a native device.
        compiled: single-pass kernel compiled by torch.compile (p and d written once each) for CPU
            tensors; CUDA tensors use the foreach kernel (with a one-line warning, once); falls back to
            foreach with a warning where compilation is unavailable.
        fused: the earlier name of ``compiled`` (not a fused CUDA kernel as in torch.optim).

    ``lr``, ``beta``, ``gamma`` and ``weight_decay`` live in ``param_groups`` so schedules may change them
    between steps; a change applies from the next ``step()``.
    """

    def __init__(self, params, lr: float = 1e-2, beta: float = 0.9, gamma: float = 0.7,
                 weight_decay: float = 0.0, *, maximize: bool = False,
                 foreach: Optional[bool] = None, compiled: Optional[bool] = None,
                 fused: Optional[bool] = None):
        _check_hyperparams(lr, beta, gamma, weight_decay)
        compiled = compiled or fused
        if compiled and foreach:
            raise ValueError("Invalid compiled (fused)/foreach: compiled=True and foreach=True cannot both be set")
        defaults = dict(lr=lr, beta=beta, gamma=gamma, weight_decay=weight_decay,
                        maximize=maximize, foreach=foreach, compiled=compiled)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("compiled", group.pop("fused", None))

    def _init_group(self, group, params, grads, buffers) -> None:
        # comprehensions rather than one loop of appends: this runs for every tensor at every step
        params += [p for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("QHM does not support sparse gradients")
        grads += [p.grad for p in params]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if "momentum_buffer" not in state:
                # d_{-1} = 0: the first step then gives d_0 = (1 - beta) g_0, as Algorithm 1 says.
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buffers += [state["momentum_buffer"] for state in states]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _check_hyperparams(group["lr"], group["beta"], group["gamma"], group["weight_decay"])
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            if not params:
                continue
            qhm(params, grads, buffers, lr=group["lr"], beta=group["beta"], gamma=group["gamma"],
                weight_decay=group["weight_decay"], maximize=group["maximize"],
                foreach=group["foreach"], compiled=group.get("compiled", group.get("fused")))
        return loss


def qhm(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *,
        lr: float, beta: float, gamma: float, weight_decay: float = 0.0, maximize: bool = False,
        foreach: Optional[bool] = None, compiled: Optional[bool] = None, fused: Optional[bool] = None) -> None:
    """Functional QHM: updates ``params`` and ``momentum_buffers`` in place (see :class:`QHM`)."""
    if compiled or fused:
        kernel = _compiled_qhm
    elif foreach is None:
        native = all(p.device.type in ("cpu", "cuda") for p in params)
        kernel = _multi_tensor_qhm if native and not torch.jit.is_scripting() else _single_tensor_qhm
    else:
        kernel = _multi_tensor_qhm if foreach else _single_tensor_qhm
    kernel(params, grads, momentum_buffers, lr=lr, beta=beta, gamma=gamma,
           weight_decay=weight_decay, maximize=maximize)


def _single_tensor_qhm(params, grads, buffers, *, lr, beta, gamma, weight_decay, maximize):
    for p, g, d in zip(params, grads, buffers):
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        d.lerp_(g, 1.0 - beta)                      # d = beta d + (1 - beta) g
        if gamma == 0.0:
            p.add_(g, alpha=-lr)
        elif gamma == 1.0:
            p.add_(d, alpha=-lr)
        else:                                       # x -= lr ((1 - gamma) g + gamma d), m never stored
            p.add_(g, alpha=-lr * (1.0 - gamma))
            p.add_(d, alpha=-lr * gamma)


def _multi_tensor_qhm(params, grads, buffers, *, lr, beta, gamma, weight_decay, maximize):
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, buffers])
    for (device_params, device_grads, device_buffers), _ in grouped.values():
        if maximize:
            device_grads = torch._foreach_neg(device_grads)
        if weight_decay != 0:
            device_grads = torch._foreach_add(device_grads, device_params, alpha=weight_decay)
        torch._foreach_lerp_(device_buffers, device_grads, 1.0 - beta)
        if gamma == 0.0:
            torch._foreach_add_(device_params, device_grads, alpha=-lr)
        elif gamma == 1.0:
            torch._foreach_add_(device_params, device_buffers, alpha=-lr)
        else:
            torch._foreach_add_(device_params, device_grads, alpha=-lr * (1.0 - gamma))
            torch._foreach_add_(device_params, device_buffers, alpha=-lr * gamma)


# ---------------------------------------------------------------------------------------------
# Compiled path: one pass over (p, g, d), reading 3 and writing 2 values per element (the floor that
# torch's fused SGD also runs at). The update is written once, over lists, as plain elementwise
# math; torch.compile (inductor) turns it into fused loops that write p and d in place. The
# hyper-parameters are 0-d tensors so changing them every epoch does not recompile; the graph
# depends only on the parameter set, so it is compiled once per process and parameter set
# (inductor also caches it on disk across processes).

def _qhm_foreach_fusable_(params, grads, buffers, lr, beta, gamma, weight_decay, sign):
    for p, g, d in zip(params, grads, buffers):
        g = sign * g + weight_decay * p
        d_new = beta * d + (1.0 - beta) * g
        p.copy_(p - lr * ((1.0 - gamma) * g + gamma * d_new))
        d.copy_(d_new)


_compiled_kernel = None
_compile_failed = False


def _get_compiled_kernel():
    """The compiled update, built once per process; None where compilation is unavailable."""
    global _compiled_kernel, _compile_failed
    if _compiled_kernel is None and not _compile_failed:
        try:
            _compiled_kernel = torch.compile(_qhm_foreach_fusable_, fullgraph=True)
        except Exception as exc:  # noqa: BLE001  # pragma: no cover - any failure to compile: the eager kernels
            _fall_back(exc)
    return _compiled_kernel


def _fall_back(exc: Exception) -> None:
    global _compile_failed
    _compile_failed = True
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    warnings.warn(f"QHM compiled=True: compilation unavailable ({type(exc).__name__}: {first_line}); "
                  "using the foreach kernel", stacklevel=4)


_told_cuda = False


def _compiled_qhm(params, grads, buffers, *, lr, beta, gamma, weight_decay, maximize):
    # Measured on an H200 (benchmarks/results_gpu_h200.txt): the compiled list kernel launches one
    # kernel per tensor and took 1.68 ms per ResNet-18 step, the foreach kernel 0.28 ms (faster than
    # torch's fused SGD there). So the compiled path serves CPU tensors, and CUDA ones go to foreach.
    global _told_cuda
    if params and params[0].device.type != "cpu":
        if not _told_cuda:
            _told_cuda = True
            warnings.warn("QHM compiled=True: CUDA tensors use the foreach kernel (measured faster there)",
                          stacklevel=4)
        return _multi_tensor_qhm(params, grads, buffers, lr=lr, beta=beta, gamma=gamma,
                                 weight_decay=weight_decay, maximize=maximize)
    kernel = _get_compiled_kernel()
    if kernel is not None:
        try:
            grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, buffers])
            for (device_params, device_grads, device_buffers), _ in grouped.values():
                p0 = device_params[0]
                scalars = [torch.tensor(v, device=p0.device, dtype=p0.dtype)
                           for v in (lr, beta, gamma, weight_decay, -1.0 if maximize else 1.0)]
                kernel(device_params, device_grads, device_buffers, *scalars)
            return
        except Exception as exc:  # noqa: BLE001  # pragma: no cover - e.g. no C++ compiler at the first call
            _fall_back(exc)
    _multi_tensor_qhm(params, grads, buffers, lr=lr, beta=beta, gamma=gamma,
                      weight_decay=weight_decay, maximize=maximize)


# ---------------------------------------------------------------------------------------------
# Presets and the correspondence with torch.optim.SGD.
#
# torch.optim.SGD(lr=eta, momentum=mu, dampening=0) keeps buf_k = mu buf_{k-1} + g_k with buf_0 = g_0,
# i.e. buf_k = sum_j mu^j g_{k-j} = d_k / (1 - mu) for QHM's d_k with beta = mu and d_{-1} = 0. So
#   heavy ball:  x -= eta buf_k                   = eta/(1-mu) d_k         -> QHM(lr=eta/(1-mu), beta=mu, gamma=1)
#   Nesterov:    x -= eta (g_k + mu buf_k)        = eta/(1-mu) ((1-mu) g_k + mu d_k)
#                                                                           -> QHM(lr=eta/(1-mu), beta=mu, gamma=mu)
# torch's first-step buf_0 = g_0 (no dampening) is exactly d_0/(1-mu) = g_0, so the match holds from step 0.

PRESETS = {
    "qhm": {},
    "sgd": {"gamma": 0.0},    # gamma = 0: plain SGD (beta only shapes the unused buffer)
    "nshb": {"gamma": 1.0},   # gamma = 1: normalised stochastic heavy ball
}


def from_torch_sgd(lr: float, momentum: float, nesterov: bool = False) -> dict:
    """QHM hyper-parameters equal to ``torch.optim.SGD(lr, momentum, dampening=0, nesterov)``."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"Invalid momentum: {momentum} (must be in [0, 1))")
    return {"lr": lr / (1.0 - momentum), "beta": momentum, "gamma": momentum if nesterov else 1.0}


def to_torch_sgd(lr: float, beta: float, gamma: float) -> dict:
    """The ``torch.optim.SGD`` arguments equal to QHM(lr, beta, gamma), where one exists.

    Exists for gamma = 1 (heavy ball), gamma = beta (Nesterov) and gamma = 0 or beta = 0 (plain SGD).
    """
    _check_hyperparams(lr, beta, gamma, 0.0)
    if gamma == 0.0 or beta == 0.0:
        return {"lr": lr, "momentum": 0.0, "nesterov": False}
    if gamma == 1.0:
        return {"lr": lr * (1.0 - beta), "momentum": beta, "nesterov": False}
    if gamma == beta:
        return {"lr": lr * (1.0 - beta), "momentum": beta, "nesterov": True}
    raise ValueError(f"Invalid gamma: {gamma} (torch.optim.SGD matches QHM only for gamma in "
                     f"{{0, 1, beta={beta}}} or beta = 0)")
