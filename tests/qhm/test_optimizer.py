"""QHM against independent references: torch.optim.SGD, a plain-Python Algorithm 1, itself across kernels."""
import copy
import math

import pytest
import torch

from qhm import QHM, from_torch_sgd, qhm, to_torch_sgd

STEPS = 300


def make_params(seed=0, dtype=torch.float64):
    """Random shapes, a 0-d scalar and a non-contiguous (transposed) tensor."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(), (1,), (7,), (3, 5), (2, 3, 4), (6, 4)]
    params = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    params[-1] = torch.randn(4, 6, generator=g, dtype=dtype).t()  # non-contiguous
    assert not params[-1].is_contiguous()
    return [torch.nn.Parameter(p) for p in params]


def grads_for(step, params, seed=1):
    g = torch.Generator().manual_seed(seed * 100003 + step)
    # gradient depends on the current point too, so trajectories diverge if updates differ
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) + 0.1 * p.detach() for p in params]


def run(opt_factory, steps=STEPS, hyper=None, seed=0):
    params = make_params(seed)
    opt = opt_factory(params)
    for k in range(steps):
        if hyper:
            for group in opt.param_groups:
                group.update(hyper(k))
        for p, g in zip(params, grads_for(k, params)):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


def assert_close(a, b, rtol=1e-10, atol=1e-12):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def changing(k):
    """beta, gamma and alpha change every few steps, as schedules do between epochs."""
    return {"lr": [0.05, 0.02, 0.1][(k // 7) % 3], "beta": [0.9, 0.5, 0.0, 0.3][(k // 5) % 4],
            "gamma": [0.7, 1.0, 0.0, 0.35][(k // 11) % 4]}


def reference_algorithm1(steps, hyper, weight_decay=0.0, maximize=False):
    """A plain-Python, element-by-element transcription of Algorithm 1 (floats, no torch ops)."""
    params = make_params(0)
    xs = [p.detach().reshape(-1).tolist() for p in params]
    ds = [[0.0] * len(x) for x in xs]                       # d_{-1} = 0
    for k in range(steps):
        h = hyper(k)
        live = [torch.nn.Parameter(torch.tensor(x, dtype=torch.float64).reshape(p.shape))
                for x, p in zip(xs, params)]
        gs = [g.reshape(-1).tolist() for g in grads_for(k, live)]
        for x, d, g in zip(xs, ds, gs):
            for i in range(len(x)):
                gi = (-g[i] if maximize else g[i]) + weight_decay * x[i]
                d[i] = (1 - h["beta"]) * gi + h["beta"] * d[i]
                m = (1 - h["gamma"]) * gi + h["gamma"] * d[i]
                x[i] = x[i] - h["lr"] * m
    return [torch.tensor(x, dtype=torch.float64).reshape(p.shape) for x, p in zip(xs, params)]


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_plain_python_algorithm1_with_changing_hyperparameters(foreach):
    ours = run(lambda p: QHM(p, lr=0.05, beta=0.9, gamma=0.7, foreach=foreach), steps=120, hyper=changing)
    ref = reference_algorithm1(120, changing)
    assert_close(ours, ref, rtol=1e-11, atol=1e-12)


def test_weight_decay_and_maximize_match_reference():
    hyper = lambda k: {"lr": 0.03, "beta": 0.8, "gamma": 0.4}  # noqa: E731
    ours = run(lambda p: QHM(p, lr=0.03, beta=0.8, gamma=0.4, weight_decay=0.01, maximize=True), steps=60)
    ref = reference_algorithm1(60, hyper, weight_decay=0.01, maximize=True)
    assert_close(ours, ref, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("wd", [0.0, 1e-3])
def test_foreach_is_bitwise_the_single_tensor_loop(wd):
    a = run(lambda p: QHM(p, lr=0.05, beta=0.9, gamma=0.7, weight_decay=wd, foreach=False), hyper=changing)
    b = run(lambda p: QHM(p, lr=0.05, beta=0.9, gamma=0.7, weight_decay=wd, foreach=True), hyper=changing)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("wd", [0.0, 5e-4])
def test_gamma_zero_is_torch_sgd(wd):
    ours = run(lambda p: QHM(p, lr=0.05, beta=0.9, gamma=0.0, weight_decay=wd))
    ref = run(lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=wd))
    assert_close(ours, ref, rtol=0, atol=0)


def test_beta_zero_is_torch_sgd():
    ours = run(lambda p: QHM(p, lr=0.05, beta=0.0, gamma=0.6))
    ref = run(lambda p: torch.optim.SGD(p, lr=0.05))
    assert_close(ours, ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("wd", [0.0, 1e-3])
def test_nshb_and_nesterov_match_torch_sgd_with_converted_hyperparameters(nesterov, wd):
    eta, mu = 0.01, 0.9
    h = from_torch_sgd(eta, mu, nesterov=nesterov)
    assert h["beta"] == mu and h["gamma"] == (mu if nesterov else 1.0)
    assert math.isclose(h["lr"], eta / (1 - mu))
    ours = run(lambda p: QHM(p, weight_decay=wd, **h))
    ref = run(lambda p: torch.optim.SGD(p, lr=eta, momentum=mu, nesterov=nesterov, weight_decay=wd))
    assert_close(ours, ref, rtol=1e-9, atol=1e-11)
    assert to_torch_sgd(**h) == pytest.approx({"lr": eta, "momentum": mu, "nesterov": nesterov})


def test_to_torch_sgd_refuses_non_matching_gamma():
    with pytest.raises(ValueError, match="gamma"):
        to_torch_sgd(0.1, 0.9, 0.5)


def test_state_dict_round_trip_continues_bit_identically():
    params = make_params(0)
    opt = QHM(params, lr=0.05, beta=0.9, gamma=0.7)
    for k in range(40):
        for p, g in zip(params, grads_for(k, params)):
            p.grad = g
        opt.step()
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    for k in range(40, 80):
        for p, g in zip(params, grads_for(k, params)):
            p.grad = g
        opt.step()
    continued = [p.detach().clone() for p in params]

    fresh = [torch.nn.Parameter(t.clone()) for t in saved_params]
    opt2 = QHM(fresh, lr=0.5, beta=0.1, gamma=0.1)
    opt2.load_state_dict(saved_state)
    assert opt2.param_groups[0]["lr"] == 0.05
    for k in range(40, 80):
        for p, g in zip(fresh, grads_for(k, fresh)):
            p.grad = g
        opt2.step()
    for x, y in zip(continued, fresh):
        assert torch.equal(x, y.detach())


def test_one_buffer_per_parameter_and_skips_params_without_grad():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = QHM([a, b], lr=0.1, beta=0.5, gamma=0.5)
    a.grad = torch.ones(3)
    opt.step()
    assert list(opt.state[a].keys()) == ["momentum_buffer"]
    assert b not in opt.state and torch.equal(b.detach(), torch.ones(2))
    # d_0 = (1 - beta) g = 0.5; m_0 = 0.5 g + 0.5 d_0 = 0.75; x = 1 - 0.1 * 0.75
    torch.testing.assert_close(opt.state[a]["momentum_buffer"], torch.full((3,), 0.5))
    torch.testing.assert_close(a.detach(), torch.full((3,), 1 - 0.075))


def test_functional_form_is_the_class():
    params = make_params(3)
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grads = grads_for(0, params)
    bufs = [torch.zeros_like(p) for p in clone]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    QHM(params, lr=0.1, beta=0.7, gamma=0.3).step()
    with torch.no_grad():
        qhm([p.data for p in clone], grads, bufs, lr=0.1, beta=0.7, gamma=0.3)
    for x, y in zip(params, clone):
        assert torch.equal(x.detach(), y.detach())


@pytest.mark.parametrize("kwargs,name", [
    ({"lr": -0.1}, "lr"), ({"beta": 1.0}, "beta"), ({"beta": -0.1}, "beta"), ({"gamma": 1.5}, "gamma"),
    ({"gamma": -0.01}, "gamma"), ({"weight_decay": -1.0}, "weight_decay"), ({"lr": float("nan")}, "lr"),
])
def test_invalid_arguments_raise_naming_the_argument(kwargs, name):
    args = {"lr": 0.1, "beta": 0.9, "gamma": 0.7, **kwargs}
    with pytest.raises(ValueError, match=name):
        QHM([torch.nn.Parameter(torch.ones(1))], **args)


def test_invalid_value_written_by_a_schedule_raises_at_step():
    p = torch.nn.Parameter(torch.ones(2))
    opt = QHM([p], lr=0.1, beta=0.9, gamma=0.7)
    opt.param_groups[0]["beta"] = 1.0
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="beta"):
        opt.step()


@pytest.mark.slow
def test_compiled_matches_loop_within_tolerance():
    """compiled=True: float64 within 1e-12 relative of the loop; float32 within 1e-5."""
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        def go(dtype=dtype, **kw):
            params = [torch.nn.Parameter(p.detach().to(dtype)) for p in make_params(0)]
            opt = QHM(params, lr=0.05, beta=0.9, gamma=0.7, weight_decay=1e-3, **kw)
            for k in range(50):
                for group in opt.param_groups:
                    group.update(changing(k))
                for p, g in zip(params, grads_for(k, params)):
                    p.grad = g.to(dtype)
                opt.step()
            return [p.detach() for p in params]
        assert_close(go(compiled=True), go(foreach=False), rtol=rtol, atol=rtol)


def test_compiled_and_foreach_together_is_an_error():
    with pytest.raises(ValueError, match="fused"):
        QHM([torch.nn.Parameter(torch.ones(1))], fused=True, foreach=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kw", [{"foreach": True}, {"compiled": True}])
def test_cuda_kernels_match_the_cpu_loop(kw):
    cpu = run(lambda p: QHM(p, lr=0.05, beta=0.9, gamma=0.7, foreach=False), steps=50, hyper=changing)
    params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(0)]
    opt = QHM(params, lr=0.05, beta=0.9, gamma=0.7, **kw)
    for k in range(50):
        for group in opt.param_groups:
            group.update(changing(k))
        for p, g in zip(params, grads_for(k, [q.detach().cpu() for q in params])):
            p.grad = g.cuda()
        opt.step()
    assert_close([p.detach().cpu() for p in params], cpu, rtol=1e-12, atol=1e-12)
