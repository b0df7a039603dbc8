"""Looped models first-class (issue 20, items 1-3): fixed depth, last-pass gradients, halts that
cost no extra pass, min_iter; against hand loops on closed-form maps."""
from __future__ import annotations

import pytest
import torch

import fpsolve
from fpsolve import Status

F64 = torch.float64
CHECKS = [1, 2, 4, None]


def plus_one(z, x):
    return z + 1


@pytest.mark.parametrize("halting", ["sample", "batch"])
@pytest.mark.parametrize("check_every", CHECKS)
def test_depth_returns_f_to_the_k_of_z0(halting, check_every):
    sol = fpsolve.solve(plus_one, torch.zeros(3, 1), torch.zeros(3, 1), criterion=fpsolve.Depth(5),
                        halting=halting, check_every=check_every)
    assert sol.z.flatten().tolist() == [5.0] * 3                 # not the best iterate: f^5(0)
    assert sol.iterations.tolist() == [5] * 3 and sol.status.tolist() == [int(Status.HALTED)] * 3
    assert sol.evaluations <= 3 * 5 + (0 if halting == "batch" else 3 * 3)
    assert sol.residual.tolist() == [1.0] * 3                    # the last step, ||z_5 - z_4||


def test_depth_on_the_logistic_map_equals_the_hand_loop():
    r = torch.tensor([[2.5], [3.2], [3.9]], dtype=F64)           # settling, 2-cycle, chaos
    logistic = lambda z, r: r * z * (1 - z)  # noqa: E731
    z = torch.full((3, 1), 0.3, dtype=F64)
    want = z.clone()
    for _ in range(17):
        want = logistic(want, r)
    sol = fpsolve.solve(logistic, z, r, criterion=fpsolve.Depth(17))
    assert torch.equal(sol.z, want)
    got = sorted(fpsolve.stream(logistic, [r], slots=2, z0=z[:1], criterion=fpsolve.Depth(17)), key=lambda t: t.index)
    assert torch.equal(torch.stack([t.z for t in got]), want) and [t.iterations for t in got] == [17] * 3


@pytest.mark.parametrize("backward", [fpsolve.Unroll(steps=3), fpsolve.Phantom(steps=3, damping=1.0),
                                      fpsolve.Unroll(steps=3, checkpoint=2), fpsolve.Unroll(steps=9),
                                      fpsolve.Unroll()])
@pytest.mark.parametrize("halting", ["sample", "batch"])
def test_depth_with_a_last_pass_gradient_equals_the_hand_loop(backward, halting):
    """K = 7 passes of an affine-tanh block; the gradient of the last k (all of them for
    Unroll() and for k >= K), value z_7: equal to a hand loop, checked in float64."""
    torch.manual_seed(0)
    W = (0.5 * torch.randn(3, 3, dtype=F64)).requires_grad_()
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    f = lambda z, x: torch.tanh(z @ W + x)  # noqa: E731
    K = 7
    k = K if backward.steps is None else min(backward.steps, K)

    def hand():
        z = torch.zeros(4, 3, dtype=F64)
        with torch.no_grad():
            for _ in range(K - k):
                z = f(z, x)
        for _ in range(k):
            z = f(z, x)
        return z

    sol = fpsolve.solve(f, torch.zeros(4, 3, dtype=F64), x, criterion=fpsolve.Depth(K), backward=backward,
                        halting=halting)
    want = hand()
    assert torch.equal(sol.z.detach(), want.detach()) and sol.iterations.tolist() == [K] * 4
    got = torch.autograd.grad(sol.z.sin().sum(), (W, x))
    ref = torch.autograd.grad(want.sin().sum(), (W, x))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_depth_gradients_pass_gradcheck():
    torch.manual_seed(1)
    W = 0.5 * torch.randn(2, 2, dtype=F64)
    x = torch.randn(3, 2, dtype=F64, requires_grad=True)

    def g(x):
        return fpsolve.solve(lambda z, x: torch.tanh(z @ W + x), torch.zeros(3, 2, dtype=F64), x,
                             criterion=fpsolve.Depth(4), backward=fpsolve.Unroll()).z

    assert torch.autograd.gradcheck(g, (x,))


@pytest.mark.parametrize("halting", ["sample", "batch"])
@pytest.mark.parametrize("check_every", CHECKS)
def test_a_read_out_halt_costs_no_extra_pass(halting, check_every):
    """f(z) = z + 1 with a head that fires at 3: sol.z = 3 after 3 iterations (API.md)."""
    head = lambda z: 10.0 * (z[:, 0] - 2.5)  # noqa: E731
    sol = fpsolve.solve(plus_one, torch.zeros(2, 1), torch.zeros(2, 1), criterion=fpsolve.HaltHead(head),
                        halting=halting, check_every=check_every)
    assert sol.z.flatten().tolist() == [3.0, 3.0] and sol.iterations.tolist() == [3, 3]
    rows = list(fpsolve.stream(plus_one, [torch.zeros(3, 1)], slots=2, criterion=fpsolve.HaltHead(head),
                               check_every=check_every, solver="anderson"))
    assert [float(r.z) for r in rows] == [3.0] * 3 and [r.iterations for r in rows] == [3] * 3


def test_a_deq_takes_depth_and_min_iter():
    layer = fpsolve.DEQ(plus_one, criterion=fpsolve.Depth(4), backward=fpsolve.Unroll(steps=1))
    z, sol = layer(torch.zeros(2, 3))
    assert z.flatten().tolist() == [4.0] * 6
    layer = fpsolve.DEQ(lambda z, x: 0.5 * z + x, min_iter=12)
    _, sol = layer(torch.ones(2, 3))
    assert sol.iterations.min() >= 12 and sol.converged.all() and "min_iter=12" in repr(layer)


@pytest.mark.parametrize("halting", ["sample", "batch"])
def test_min_iter_holds_every_sample_back(halting):
    f = lambda z, x: 0.5 * z + x  # noqa: E731
    x = torch.ones(3, 2, dtype=F64)
    free = fpsolve.solve(f, torch.zeros_like(x), x, solver="anderson", halting=halting)
    held = fpsolve.solve(f, torch.zeros_like(x), x, solver="anderson", min_iter=9, halting=halting)
    assert free.iterations.max() < 9 and held.iterations.tolist() == [9] * 3 and held.converged.all()
    rows = list(fpsolve.stream(f, [x], slots=2, min_iter=9))
    assert [r.iterations for r in rows] == [9] * 3
    nan = x.clone()
    nan[1] = float("nan")        # a diverged sample still stops at once
    sol = fpsolve.solve(f, torch.zeros_like(x), nan, min_iter=9, halting=halting)
    assert int(sol.status[1]) == int(Status.DIVERGED) and (halting == "batch" or int(sol.iterations[1]) == 1)


def test_bad_looped_options_are_clear_errors():
    with pytest.raises(ValueError, match="passes"):
        fpsolve.Depth(0)
    with pytest.raises(ValueError, match="max_iter"):
        fpsolve.solve(plus_one, torch.zeros(1, 1), torch.zeros(1, 1), criterion=fpsolve.Depth(60))
    with pytest.raises(ValueError, match="min_iter"):
        fpsolve.solve(plus_one, torch.zeros(1, 1), torch.zeros(1, 1), min_iter=80)
    with pytest.raises(ValueError, match="min_iter"):
        fpsolve.DEQ(plus_one, min_iter=0)
    with pytest.raises(ValueError, match="damping"):
        x = torch.zeros(1, 1, requires_grad=True)
        fpsolve.solve(lambda z, x: z + x, torch.zeros(1, 1), x, criterion=fpsolve.Depth(3),
                      backward=fpsolve.Phantom(steps=1, damping=0.5))


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@settings(max_examples=max(20, settings.default.max_examples // 4), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 16), B=st.integers(1, 12), n=st.integers(1, 8),
       solver=st.sampled_from(["fixed_point", "anderson", "broyden"]), low=st.floats(0.05, 0.6),
       high=st.floats(0.6, 0.97), rtol=st.sampled_from([1e-3, 1e-5, 1e-8]),
       dtype=st.sampled_from([torch.float32, F64]))
def test_no_wasted_passes_and_exact_counts(seed, B, n, solver, low, high, rtol, dtype):
    """Issue 20, item 5: with the default check_every, f is called at most once more than the
    hardest sample's iterations, and every count, status and answer equals a look every pass."""
    if dtype == torch.float32 and rtol < 1e-6:
        rtol = 1e-5
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    q = q.to(dtype)
    rates = torch.linspace(low, high, B, dtype=F64).to(dtype)[:, None]   # per-sample contraction
    x = (rates, torch.randn(B, n, generator=gen, dtype=F64).to(dtype))
    calls = [0]

    def f(z, x):
        calls[0] += 1
        return torch.tanh(x[0] * (z @ q.T) + x[1])

    z0 = torch.zeros_like(x[1])
    sol = fpsolve.solve(f, z0, x, solver=solver, rtol=rtol, max_iter=200)
    assert calls[0] <= int(sol.iterations.max()) + 1, (calls[0], sol.iterations.tolist())
    every = fpsolve.solve(f, z0, x, solver=solver, rtol=rtol, max_iter=200, check_every=1)
    assert torch.equal(sol.iterations, every.iterations) and torch.equal(sol.status, every.status)
    assert torch.equal(sol.z, every.z)
