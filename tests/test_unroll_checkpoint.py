"""`Unroll(checkpoint=c)`: activation checkpointing gives plain `Unroll`'s gradient, and what
autograd keeps grows with the number of segments, not with the number of passes.

Gradients are checked in float64 with `torch.autograd.gradcheck` and against plain `Unroll`
(the same graph, recomputed: equal to round-off). Memory is counted as in test_backward.py:
the bytes of the tensors autograd saves for backward (`saved_tensors_hooks`); a checkpointed
segment saves only its inputs (the state entering it, and x).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import fpsolve

from problems import SOLVERS, generator, random_contraction

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
TIGHT = dict(rtol=1e-12, max_iter=400)


def _randn(*shape, seed=0, requires_grad=False):
    return torch.randn(*shape, dtype=F64, generator=generator(seed)).requires_grad_(requires_grad)


def _tanh(W):
    return lambda z, x: torch.tanh(z @ W.T + x)


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def test_checkpoint_is_validated_at_construction():
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises((TypeError, ValueError), match=r"Unroll\(checkpoint=\.\.\.\) must be an integer >= 1"):
            fpsolve.Unroll(checkpoint=bad)
    assert fpsolve.Unroll(steps=4, checkpoint=2).checkpoint == 2
    assert fpsolve.Unroll().checkpoint is None


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("steps, checkpoint", [(None, 1), (None, 3), (5, 2), (6, 3), (4, 10)])
def test_gradient_equals_plain_unroll(solver, steps, checkpoint):
    """On a general contractive map (where truncated Unroll is not the derivative of z*), the
    checkpointed graph is the same computation as the plain one."""
    W = random_contraction(1, 4, 0.9, seed=1)[0].requires_grad_()
    x = _randn(3, 4, seed=2, requires_grad=True)
    c = _randn(3, 4, seed=3)
    out = {}
    for ck in (None, checkpoint):
        sol = fpsolve.solve(_tanh(W), torch.zeros(3, 4, dtype=F64), x, solver=solver, rtol=1e-8,
                            max_iter=60, backward=fpsolve.Unroll(steps=steps, checkpoint=ck))
        out[ck] = (sol.z.detach(), sol.iterations, _grads((c * sol.z).sum(), (x, W)))
    (z0, it0, g0), (z1, it1, g1) = out[None], out[checkpoint]
    assert torch.equal(it0, it1) and int(it0.min()) > 5   # samples halt apart, after many passes
    torch.testing.assert_close(z1, z0, rtol=0, atol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("halting", ["sample", "batch"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_gradcheck_whole_solve_checkpointed(solver, halting):
    x = _randn(2, 3, seed=6, requires_grad=True)
    W = random_contraction(1, 3, 0.5, seed=7)[0].requires_grad_()

    def fn(x, W):
        return fpsolve.solve(_tanh(W), torch.zeros(2, 3, dtype=F64), x, solver=solver, halting=halting,
                             backward=fpsolve.Unroll(checkpoint=2), **TIGHT).z

    assert torch.autograd.gradcheck(fn, (x, W))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("checkpoint", [1, 2, 3])
def test_gradcheck_last_k_passes_checkpointed(solver, checkpoint):
    """U strictly upper triangular: any 3 passes from z* carry the exact derivative (see
    test_backward.py), so gradcheck applies to Unroll(steps=3) with every segment length."""
    U = torch.triu(_randn(3, 3, seed=8), diagonal=1).requires_grad_()
    x = _randn(2, 3, seed=9, requires_grad=True)

    def fn(x, U):
        return fpsolve.solve(_tanh(U), torch.zeros(2, 3, dtype=F64), x, solver=solver,
                             backward=fpsolve.Unroll(steps=3, checkpoint=checkpoint), **TIGHT).z

    assert torch.autograd.gradcheck(fn, (x, U))


def test_tuple_state_and_tuple_x():
    """The segments carry a packed tuple state and a tuple x through the checkpoint."""
    W = random_contraction(1, 3, 0.6, seed=10)[0].requires_grad_()
    a_in = _randn(2, 3, seed=11, requires_grad=True)
    s_in = _randn(2, 1, seed=12, requires_grad=True)

    def f(z, x):
        a, s = z
        u, v = x
        return torch.tanh(a @ W.T + u), 0.5 * torch.sin(s + a.sum(1, keepdim=True)) + v

    z0 = (torch.zeros(2, 3, dtype=F64), torch.zeros(2, 1, dtype=F64))
    got = {}
    for bw in (fpsolve.Unroll(steps=7), fpsolve.Unroll(steps=7, checkpoint=3),
               fpsolve.Unroll(), fpsolve.Unroll(checkpoint=2)):
        a, s = fpsolve.solve(f, z0, (a_in, s_in), rtol=1e-10, backward=bw).z
        got[bw] = _grads(a.sum() + 2 * s.sum(), (W, a_in, s_in))
    pairs = [(fpsolve.Unroll(steps=7), fpsolve.Unroll(steps=7, checkpoint=3)),
             (fpsolve.Unroll(), fpsolve.Unroll(checkpoint=2))]
    for plain, ck in pairs:
        for a, b in zip(got[ck], got[plain]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


class SpectralCell(nn.Module):
    def __init__(self, width=6):
        super().__init__()
        self.lin = spectral_norm(nn.Linear(width, width))
        self.inj = nn.Linear(width, width)

    def forward(self, z, x):
        return torch.tanh(0.9 * self.lin(z) + self.inj(x))


@pytest.mark.parametrize("steps", [None, 6])
def test_deq_with_spectral_norm_replays_the_same_map(steps):
    """DEQ computes spectral_norm once per forward (parametrize.cached); the recomputation in
    backward runs after that context closed, and must use the same weight (a fresh power
    iteration would give another map). Gradients equal plain Unroll's, buffers move once."""
    torch.manual_seed(0)
    cell = SpectralCell().double()
    x = _randn(4, 6, seed=13)
    grads, us = {}, {}
    state = {k: v.clone() for k, v in cell.state_dict().items()}
    for ck in (None, 2):
        cell.load_state_dict(state)
        layer = fpsolve.DEQ(cell, solver="fixed_point", rtol=1e-10, max_iter=200,
                            backward=fpsolve.Unroll(steps=steps, checkpoint=ck))
        z, sol = layer(x)
        assert sol.converged.all()
        grads[ck] = _grads(z.square().sum(), list(cell.parameters()))
        us[ck] = cell.lin.parametrizations.weight[0]._u.clone()
    for a, b in zip(grads[2], grads[None]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(us[2], us[None], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# memory: saved tensors grow with segments, not passes
# --------------------------------------------------------------------------------------------

def saved_bytes(run):
    """Bytes of the tensors autograd saves for backward while `run()` executes."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return total, out


def _mlp():
    """A block with inner activations 4x the state (a hidden layer of width 128)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 32), nn.Tanh()).double()


def _run(backward, passes=None):
    """A solve whose tolerance is never met (exactly `passes` forward passes when given)."""
    net = _mlp()
    x = _randn(8, 32, seed=14, requires_grad=True)
    budget = 30 if passes is None else passes
    return lambda: fpsolve.solve(lambda z, x: net(z) + x, torch.zeros(8, 32, dtype=F64), x,
                                 solver="fixed_point", rtol=1e-30, max_iter=budget, backward=backward)


def test_saved_bytes_grow_with_segments_not_passes():
    size = lambda steps, ck: saved_bytes(_run(fpsolve.Unroll(steps=steps, checkpoint=ck)))[0]  # noqa: E731
    # the same number of segments (3), four times as many passes: the same bytes
    assert size(12, 4) == size(48, 16) == size(3, 1)
    # twice the segments: the per-segment bytes double (a fixed part comes from the first call)
    base = size(1, 1) - (size(2, 1) - size(1, 1))
    per_segment = size(2, 1) - size(1, 1)
    assert per_segment > 0
    for segments in (3, 6, 12):
        assert size(24, 24 // segments) == base + segments * per_segment
    # plain Unroll(steps=24) keeps every pass's activations: far more than 3 segments
    plain = size(24, None)
    assert plain > 8 * (size(24, 8) - base), (plain, size(24, 8))


def distinct_saved_bytes(run):
    """Bytes of the storages autograd saves for backward while `run()` executes, each storage
    counted once (by its data_ptr: x, W and an iterate saved by several ops or segments are
    memory once). A checkpointed segment saves only its inputs, through the same hook."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(storages.values()), out


SOLVER_OBJECTS = {"fixed_point": fpsolve.FixedPointIteration(), "anderson": fpsolve.Anderson(),
                  "broyden": fpsolve.Broyden()}


def _width64(backward, solver="fixed_point", halting="sample", passes=120):
    """A width-64 tanh/linear block run exactly `passes` passes (`Depth`), batch 16."""
    W = (0.9 * torch.linalg.qr(_randn(64, 64, seed=30))[0]).requires_grad_()
    x = _randn(16, 64, seed=31, requires_grad=True)
    return lambda: (fpsolve.solve(_tanh(W), torch.zeros(16, 64, dtype=F64), x, solver=SOLVER_OBJECTS[solver],
                                  halting=halting, criterion=fpsolve.Depth(passes), max_iter=passes,
                                  backward=backward), (x, W))


@pytest.mark.parametrize("halting", ["sample", "batch"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_whole_solve_checkpointed_keeps_segment_states_only(solver, halting):
    """steps=None (issue 19, item 11): only the loop's state entering each segment of c passes
    is kept (the iterate, the solver's state, the rows' inputs), and the passes, the solver's
    algebra included, are recomputed in backward: at K = 120, c = 10, at most 0.3x the bytes
    of plain Unroll() (measured: fixed_point 0.20, anderson 0.09, broyden 0.07), with its
    gradient exactly (the same operations, recomputed)."""
    plain, (sol0, inputs0) = distinct_saved_bytes(_width64(fpsolve.Unroll(), solver, halting))
    ck, (sol1, inputs1) = distinct_saved_bytes(_width64(fpsolve.Unroll(checkpoint=10), solver, halting))
    assert ck <= 0.3 * plain, (ck, plain, ck / plain)
    assert sol0.iterations.tolist() == sol1.iterations.tolist() == [120] * 16
    torch.testing.assert_close(sol1.z, sol0.z, rtol=0, atol=0)
    for a, b in zip(_grads(sol1.z.square().sum(), inputs1), _grads(sol0.z.square().sum(), inputs0)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_whole_solve_checkpointed_bytes_grow_with_segments():
    """Doubling the passes at a fixed segment length doubles what is kept; doubling the
    segment length at fixed passes halves it (beyond the fixed part: x, W, the first call)."""
    size = lambda passes, c: distinct_saved_bytes(  # noqa: E731
        _width64(fpsolve.Unroll(checkpoint=c), passes=passes))[0]
    per_segment = (size(240, 10) - size(120, 10)) / 12
    assert per_segment > 0
    assert abs((size(240, 20) - size(120, 20)) / (6 * per_segment) - 1) < 0.05
    state = 16 * 64 * 8   # one float64 state [16, 64]
    assert per_segment <= 1.1 * state, per_segment   # (the iterate entering the segment, and a few indices)


@pytest.mark.parametrize("halting", ["sample", "batch"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_whole_solve_checkpointed_replays_the_forwards_decisions(solver, halting):
    """Rows that halt at their own passes, rows that spend the budget, Anderson's safeguard
    rejecting steps: statuses, iterations, trace and z are plain Unroll()'s, bit for bit, and so
    is the gradient (each segment's replay drops the rows the forward dropped, where it did)."""
    W = (2.5 * _randn(8, 8, seed=32) / 8 ** 0.5).requires_grad_()
    x = _randn(6, 8, seed=33, requires_grad=True)
    f = lambda z, x: 0.5 * z + 0.5 * torch.tanh(z @ W.T + x)  # noqa: E731
    out = {}
    for ck in (None, 3):
        sol = fpsolve.solve(f, torch.zeros(6, 8, dtype=F64), x, solver=SOLVER_OBJECTS[solver], halting=halting,
                            rtol=1e-10, max_iter=80, record=True, backward=fpsolve.Unroll(checkpoint=ck))
        out[ck] = sol, _grads(sol.z.square().sum(), (x, W))
    (sol0, g0), (sol1, g1) = out[None], out[3]
    for name in ("iterations", "status", "residual", "trace"):
        torch.testing.assert_close(getattr(sol1, name), getattr(sol0, name), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(sol1.z, sol0.z, rtol=0, atol=0)
    assert halting == "batch" or sol0.iterations.unique().numel() > 1   # (rows halt apart)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_replay_that_decides_otherwise_raises():
    """The replay takes the forward's decisions by computing the same values again: an f that
    gives other values in backward (not deterministic) makes rows stop elsewhere, which raises
    rather than giving another gradient."""
    W = random_contraction(1, 4, 0.5, seed=34)[0].requires_grad_()
    x = _randn(6, 4, seed=35, requires_grad=True)
    shift = {"value": 0.0}
    f = lambda z, x: torch.tanh(z @ W.T + x) + shift["value"]  # noqa: E731
    sol = fpsolve.solve(f, torch.zeros(6, 4, dtype=F64), x, solver="fixed_point", rtol=1e-10, max_iter=80,
                        backward=fpsolve.Unroll(checkpoint=4))
    assert sol.iterations.unique().numel() > 1
    shift["value"] = 1e-3   # (backward sees another map)
    with pytest.raises(RuntimeError, match="stopped elsewhere than in the forward"):
        sol.z.sum().backward()
