"""Gradients of `sol.z` under every backward mode, and the cases where torchdeq's are wrong.

Exactness is checked in float64 against closed forms (a linear map's fixed point is a linear
solve, which autograd differentiates) and with `torch.autograd.gradcheck`. Phantom and
truncated Unroll are *not* the derivative of z*: they are checked against their own definition
(k passes of f from z*, written out by hand), and with gradcheck only on a map whose Jacobian
in z is nilpotent, where k passes from z* carry the exact derivative.

Per-sample data travels in `x` (per-sample halting passes f only the rows still active);
tensors shared by every sample (weight matrices) are closed over.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fpsolve
from fpsolve import Status

from problems import SOLVERS, generator, linear_map, random_contraction

pytestmark = pytest.mark.usefixtures("one_thread")


F64 = torch.float64
#: Forward tolerances under which the implicit gradient is exact to gradcheck's tolerance.
TIGHT = dict(rtol=1e-12, max_iter=400)


def _randn(*shape, seed=0, requires_grad=False):
    return torch.randn(*shape, dtype=F64, generator=generator(seed)).requires_grad_(requires_grad)


def _weight(n, q=0.7, seed=1, requires_grad=True):
    """A weight shared by every sample, spectral norm q."""
    return random_contraction(1, n, q, seed=seed)[0].requires_grad_(requires_grad)


def _tanh(W):
    return lambda z, x: torch.tanh(z @ W.T + x)


def _linear_closed_form(W, x):
    """The fixed point of z -> z Wᵀ + x, row by row: z = x (I - Wᵀ)⁻¹; differentiable."""
    eye = torch.eye(W.shape[0], dtype=W.dtype)
    return torch.linalg.solve(eye - W, x.T).T


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True)


# --------------------------------------------------------------------------------------------
# gradcheck: every backward mode x every solver
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", SOLVERS)
def test_gradcheck_implicit_tanh_map(solver):
    x = _randn(3, 4, seed=2, requires_grad=True)
    W = _weight(4)

    def fn(x, W):
        return fpsolve.solve(_tanh(W), torch.zeros(3, 4, dtype=F64), x, solver=solver,
                             backward="implicit", **TIGHT).z

    assert torch.autograd.gradcheck(fn, (x, W))


@pytest.mark.parametrize("solver", SOLVERS)
def test_gradcheck_implicit_per_sample_data_in_a_tuple_x(solver):
    """Per-sample matrices and offsets in x = (A, b), contractions from 0.2 to 0.9, so the
    samples halt at different iterations in the forward and in the adjoint."""
    B, n = 4, 3
    A = random_contraction(B, n, 1.0, seed=4) * torch.linspace(0.2, 0.9, B, dtype=F64)[:, None, None]
    A.requires_grad_()
    b = _randn(B, n, seed=5, requires_grad=True)

    def fn(A, b):
        return fpsolve.solve(linear_map, torch.zeros(B, n, dtype=F64), (A, b), solver=solver,
                             backward="implicit", **TIGHT).z

    assert torch.autograd.gradcheck(fn, (A, b))


@pytest.mark.parametrize("solver", SOLVERS)
def test_gradcheck_unroll_whole_solve(solver):
    x = _randn(2, 3, seed=6, requires_grad=True)
    W = _weight(3, q=0.5, seed=7)

    def fn(x, W):
        return fpsolve.solve(_tanh(W), torch.zeros(2, 3, dtype=F64), x, solver=solver,
                             backward=fpsolve.Unroll(), **TIGHT).z

    assert torch.autograd.gradcheck(fn, (x, W))


def _nilpotent_map(n=3, seed=8):
    """z -> tanh(z Uᵀ + x) with U strictly upper triangular: the Jacobian in z is strictly upper
    triangular, so any n passes from z* no longer depend on z* and carry the exact derivative."""
    U = torch.triu(_randn(n, n, seed=seed), diagonal=1).requires_grad_()
    return U, _tanh(U)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("backward", [fpsolve.Phantom(steps=3), fpsolve.Unroll(steps=3),
                                      fpsolve.Phantom(steps=5)], ids=str)
def test_gradcheck_truncated_modes_on_a_map_where_k_passes_are_exact(solver, backward):
    U, _ = _nilpotent_map()
    x = _randn(2, 3, seed=9, requires_grad=True)

    def fn(x, U):
        return fpsolve.solve(_tanh(U), torch.zeros(2, 3, dtype=F64), x, solver=solver,
                             backward=backward, **TIGHT).z

    assert torch.autograd.gradcheck(fn, (x, U))


@pytest.mark.parametrize("backward", ["implicit", "phantom", "unroll"])
def test_gradcheck_map_independent_of_z(backward):
    """f(z, x) = g(x): one pass is exact, so every mode gives the true derivative."""
    x = _randn(3, 2, seed=10, requires_grad=True)

    def fn(x):
        return fpsolve.solve(lambda z, x: torch.sin(x) * x, torch.zeros(3, 2, dtype=F64), x,
                             backward=backward, **TIGHT).z

    assert torch.autograd.gradcheck(fn, (x,))


def test_gradcheck_implicit_tuple_state():
    """A state made of two tensors (different shapes) gets the implicit gradient of each."""
    x = _randn(2, 3, seed=11, requires_grad=True)
    W = _weight(3, q=0.5, seed=12)

    def f(z, x):
        a, c = z
        return torch.tanh(a @ W.T + x), 0.5 * torch.cos(a).sum(dim=1, keepdim=True) + 0.25 * c

    def fn(x, W):
        z0 = (torch.zeros(2, 3, dtype=F64), torch.zeros(2, 1, dtype=F64))
        a, c = fpsolve.solve(f, z0, x, backward="implicit", **TIGHT).z
        return a, c

    assert torch.autograd.gradcheck(fn, (x, W))


def test_gradcheck_implicit_under_batch_halting():
    x = _randn(3, 4, seed=13, requires_grad=True)
    W = _weight(4, seed=14)

    def fn(x, W):
        return fpsolve.solve(_tanh(W), torch.zeros(3, 4, dtype=F64), x, halting="batch",
                             backward="implicit", **TIGHT).z

    assert torch.autograd.gradcheck(fn, (x, W))


# --------------------------------------------------------------------------------------------
# closed forms and definitions
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("backward", ["implicit", "unroll"])
def test_linear_deq_gradient_is_the_analytic_one(solver, backward):
    """z* = x (I - Wᵀ)⁻¹ row by row: compared with autograd through that linear solve."""
    W = _weight(5, q=0.8, seed=15)
    x = _randn(4, 5, seed=16, requires_grad=True)
    c = _randn(4, 5, seed=17)
    sol = fpsolve.solve(lambda z, x: z @ W.T + x, torch.zeros(4, 5, dtype=F64), x,
                        solver=solver, backward=backward, **TIGHT)
    assert sol.converged.all()
    got = _grads((c * sol.z).sum(), (x, W))
    want = _grads((c * _linear_closed_form(W, x)).sum(), (x, W))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


def test_implicit_gradient_matches_a_dense_ift_solve_on_a_nonlinear_map():
    """dL/dx = uᵀ diag(sech²) with u = (I - Jᵀ)⁻¹ c, J = diag(sech²(W z* + x)) W, per sample."""
    W = _weight(6, q=0.9, seed=18)
    x = _randn(3, 6, seed=19, requires_grad=True)
    c = _randn(3, 6, seed=20)
    sol = fpsolve.solve(_tanh(W), torch.zeros(3, 6, dtype=F64), x, **TIGHT)
    (gx,) = _grads((c * sol.z).sum(), (x,))
    with torch.no_grad():
        z = sol.z
        d = 1 - torch.tanh(z @ W.T + x) ** 2          # [B, n]
        for i in range(3):
            J = d[i, :, None] * W
            u = torch.linalg.solve(torch.eye(6, dtype=F64) - J.T, c[i])
            torch.testing.assert_close(gx[i], u * d[i], rtol=1e-9, atol=1e-11)


def _manual_steps(f, z_star, x, steps, damping):
    z = z_star.detach()
    for _ in range(steps):
        z = (1 - damping) * z + damping * f(z, x)
    return z


@pytest.mark.parametrize("solver", SOLVERS)
def test_phantom_1_1_is_the_one_step_gradient(solver):
    W = _weight(4, q=0.9, seed=21)
    x = _randn(3, 4, seed=22, requires_grad=True)
    c = _randn(3, 4, seed=23)
    f = _tanh(W)
    sol = fpsolve.solve(f, torch.zeros(3, 4, dtype=F64), x, solver=solver,
                        backward=fpsolve.Phantom(steps=1, damping=1.0), **TIGHT)
    got = _grads((c * sol.z).sum(), (x, W))
    want = _grads((c * f(sol.z.detach(), x)).sum(), (x, W))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    # and it is not the implicit gradient (the map is far from z-independent)
    sol_i = fpsolve.solve(f, torch.zeros(3, 4, dtype=F64), x, solver=solver, **TIGHT)
    (gi,) = _grads((c * sol_i.z).sum(), (x,))
    assert (gi - got[0]).abs().max() > 1e-3


@pytest.mark.parametrize("backward, steps, damping", [
    (fpsolve.Phantom(steps=4, damping=0.5), 4, 0.5),
    (fpsolve.Phantom(steps=2, damping=0.8), 2, 0.8),
    (fpsolve.Unroll(steps=3), 3, 1.0),
])
def test_truncated_modes_follow_their_definition(backward, steps, damping):
    W = _weight(4, q=0.9, seed=24)
    x = _randn(3, 4, seed=25, requires_grad=True)
    c = _randn(3, 4, seed=26)
    f = _tanh(W)
    sol = fpsolve.solve(f, torch.zeros(3, 4, dtype=F64), x, backward=backward, **TIGHT)
    got = _grads((c * sol.z).sum(), (x, W))
    want = _grads((c * _manual_steps(f, sol.z, x, steps, damping)).sum(), (x, W))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    # the value is z*, not the value of the k passes (they agree here, to the tolerance)
    assert sol.converged.all()


# --------------------------------------------------------------------------------------------
# memory: saved tensors, counted in bytes
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


def _depth_run(backward, depth, solver="fixed_point"):
    # W = 0.99 x an orthogonal matrix and a small input: every eigenvalue of the Jacobian has
    # modulus about 0.99, so no sample reaches machine precision within 200 iterations
    Q, _ = torch.linalg.qr(_randn(32, 32, seed=27))
    W = (0.99 * Q).requires_grad_()
    x = (0.1 * _randn(8, 32, seed=28)).requires_grad_()
    # a tolerance that is never met: exactly `depth` evaluations of f
    return lambda: fpsolve.solve(_tanh(W), torch.zeros(8, 32, dtype=F64), x, solver=solver,
                                 rtol=1e-30, max_iter=depth, backward=backward)


@pytest.mark.parametrize("backward", [fpsolve.Implicit(max_iter=60), fpsolve.Phantom(steps=3)], ids=str)
def test_saved_memory_is_flat_in_depth_for_implicit_and_phantom(backward):
    sizes = {}
    for depth in (10, 50, 200):
        sizes[depth], sol = saved_bytes(_depth_run(backward, depth))
        assert int(sol.iterations.min()) == depth
    assert sizes[10] > 0
    assert sizes[200] == sizes[10], sizes


@pytest.mark.parametrize("solver", SOLVERS)
def test_saved_memory_grows_with_depth_for_unroll(solver):
    sizes = {d: saved_bytes(_depth_run(fpsolve.Unroll(), d, solver))[0] for d in (10, 50, 200)}
    implicit = saved_bytes(_depth_run(fpsolve.Implicit(), 10, solver))[0]
    assert sizes[10] > implicit
    assert sizes[50] > 3 * sizes[10] and sizes[200] > 3 * sizes[50], sizes


# --------------------------------------------------------------------------------------------
# the torchdeq failure cases: each one right here
# --------------------------------------------------------------------------------------------

def _linear_deq(n=5, seed=30, **options):
    """A DEQ whose block is z -> z Wᵀ + x (W a parameter, spectral norm 0.8), float64."""
    lin = torch.nn.Linear(n, n, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(random_contraction(1, n, 0.8, seed=seed)[0])
    options = dict(TIGHT, **options)
    return fpsolve.DEQ(lambda z, x: lin(z) + x, **options), lin.weight


def test_same_module_called_twice_in_one_graph():
    """torchdeq 0.1.0 with hook_ift=True never returns from this backward (its hook, stored on
    the module, re-enters itself); here each call has its own autograd node."""
    layer, W = _linear_deq()
    x = _randn(3, 5, seed=31, requires_grad=True)
    c = _randn(3, 5, seed=32)
    z1, _ = layer(x)
    z2, _ = layer(z1)             # sequential: the output of the first call is the next input
    z3, _ = layer(2 * x)          # parallel: a second call on another input in the same graph
    got = _grads((c * z2).sum() + (c * z3).sum(), (x, W))
    ref = lambda x: _linear_closed_form(W, x)  # noqa: E731
    want = _grads((c * ref(ref(x))).sum() + (c * ref(2 * x)).sum(), (x, W))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backward", ["implicit", "phantom", "unroll"])
def test_second_backward_with_retain_graph_gives_the_same_gradient(backward):
    """torchdeq 0.1.0 with hook_ift=True removes its hook in the first backward and silently
    returns the one-step gradient in the second; here every backward pass agrees exactly."""
    layer, W = _linear_deq(backward=backward)
    x = _randn(3, 5, seed=33, requires_grad=True)
    z, sol = layer(x)
    loss = (z ** 2).sum()
    loss.backward(retain_graph=True)
    first = (x.grad.clone(), W.grad.clone())
    loss.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, 2 * first[0], rtol=1e-13, atol=0)
    torch.testing.assert_close(W.grad, 2 * first[1], rtol=1e-13, atol=0)
    again = _grads(loss, (x, W))   # a third time, through torch.autograd.grad
    for g, w in zip(again, first):
        torch.testing.assert_close(g, w, rtol=1e-13, atol=0)
    if backward == "implicit":
        want = _grads((_linear_closed_form(W, x) ** 2).sum(), (x, W))
        for g, w in zip(first, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)
        assert sol.adjoint is not None and bool(sol.adjoint.converged.all())


def _mixed_linear(B=5, n=4, seed=34):
    """Per-sample linear maps of contractions 0.1 .. 0.95 (x = (A, b)): samples halt apart."""
    A = random_contraction(B, n, 1.0, seed=seed) * torch.linspace(0.1, 0.95, B, dtype=F64)[:, None, None]
    b = _randn(B, n, seed=seed + 1)
    return A.requires_grad_(), b.requires_grad_()


def _linear_answer_graph(A, b):
    eye = torch.eye(A.shape[-1], dtype=F64)
    return torch.linalg.solve(eye - A, b.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("take", [
    lambda z: z[1:, :2],                 # slice rows and columns
    lambda z: z[2],                      # one sample
    lambda z: z[[0, 3, 3]],              # fancy indexing, a row twice
    lambda z: z[:, -1:] * z[:, :1],      # two slices of the same output
    lambda z: z.view(-1)[::3],           # a strided view of the flattened state
], ids=["slice", "row", "fancy", "two_slices", "strided"])
def test_indexing_or_slicing_sol_z_before_the_loss(solver, take):
    """torchdeq issue 7: the gradient of an indexed output. Samples also halt apart here."""
    A, b = _mixed_linear()
    sol = fpsolve.solve(linear_map, torch.zeros(5, 4, dtype=F64), (A, b), solver=solver, **TIGHT)
    if solver != "broyden":   # (Broyden solves a 4-dim linear map in the same few steps)
        assert len(set(sol.iterations.tolist())) > 1     # per-sample halting really happened
    got = _grads(take(sol.z).pow(2).sum(), (A, b))
    want = _grads(take(_linear_answer_graph(A, b)).pow(2).sum(), (A, b))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backward", ["implicit", "phantom", "unroll"])
def test_autograd_grad_equals_backward(backward):
    W = _weight(4, seed=35)
    x = _randn(3, 4, seed=36, requires_grad=True)

    def loss():
        sol = fpsolve.solve(_tanh(W), torch.zeros(3, 4, dtype=F64), x, backward=backward, **TIGHT)
        return sol.z.sin().sum()

    gx, gw = torch.autograd.grad(loss(), (x, W))
    loss().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-13, atol=0)
    torch.testing.assert_close(gw, W.grad, rtol=1e-13, atol=0)
    # grad with respect to only one of the inputs (the other receives nothing)
    (gw_only,) = torch.autograd.grad(loss(), (W,))
    torch.testing.assert_close(gw_only, gw, rtol=1e-13, atol=0)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("backward", ["implicit", "unroll"])
def test_x_not_requiring_grad_while_parameters_do(solver, backward):
    layer, W = _linear_deq(solver=solver, backward=backward)
    x = _randn(3, 5, seed=37)                      # plain data: no grad
    z, _ = layer(x)
    assert z.requires_grad
    (z.cos().sum()).backward()
    assert x.grad is None
    want = _grads(_linear_closed_form(W, x).cos().sum(), (W,))[0]
    torch.testing.assert_close(W.grad, want, rtol=1e-9, atol=1e-11)


def test_unconverged_samples_still_get_their_adjoint_solved():
    """Sample 1 (contraction 0.99) runs out of forward budget; its adjoint is still solved, and
    the backward's own status is visible in sol.adjoint. For a linear map the gradient in b
    does not depend on z, so it is exact for every sample; the gradient in A is u zᵀ at the
    returned (unconverged) z."""
    n = 4
    Q, _ = torch.linalg.qr(_randn(2, n, n, seed=38))    # orthogonal: every |eigenvalue| = 1
    A = Q * torch.tensor([0.3, 0.99], dtype=F64)[:, None, None]
    A.requires_grad_()
    b = _randn(2, n, seed=39, requires_grad=True)
    c = _randn(2, n, seed=40)
    sol = fpsolve.solve(linear_map, torch.zeros(2, n, dtype=F64), (A, b), solver="fixed_point",
                        rtol=1e-12, max_iter=60,
                        backward=fpsolve.Implicit(solver="anderson", max_iter=500))
    assert sol.status.tolist() == [Status.CONVERGED, Status.MAX_ITER]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", fpsolve.ConvergenceWarning)
        gA, gb = _grads((c * sol.z).sum(), (A, b))
    # the forward's unconverged sample is named; the adjoint converges (no adjoint warning)
    msgs = [str(w.message) for w in caught if issubclass(w.category, fpsolve.ConvergenceWarning)]
    assert len(msgs) == 1 and "1 of 2 samples are not at one" in msgs[0], msgs
    adj = sol.adjoint
    assert adj is not None and adj.converged.all() and (adj.iterations >= 1).all()
    assert adj.status.tolist() == [Status.CONVERGED, Status.CONVERGED]
    with torch.no_grad():
        eye = torch.eye(n, dtype=F64)
        u = torch.linalg.solve(eye - A.transpose(1, 2), c.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(gb, u, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(gA, u.unsqueeze(-1) * sol.z.unsqueeze(1), rtol=1e-9, atol=1e-11)


def test_adjoint_that_does_not_converge_warns_and_reports_its_status():
    A, b = _mixed_linear()
    sol = fpsolve.solve(linear_map, torch.zeros(5, 4, dtype=F64), (A, b), solver="fixed_point",
                        rtol=1e-12, max_iter=1000, backward=fpsolve.Implicit(max_iter=3))
    assert sol.converged.all()
    with pytest.warns(fpsolve.ConvergenceWarning, match="adjoint"):
        (sol.z.sum()).backward()
    adj = sol.adjoint
    assert not adj.converged.all()
    assert (adj.status[~adj.converged] == Status.MAX_ITER).all()
    assert (adj.iterations <= 3).all()
    # users who want it can turn the warning into an error
    sol = fpsolve.solve(linear_map, torch.zeros(5, 4, dtype=F64), (A, b), solver="fixed_point",
                        rtol=1e-12, max_iter=1000, backward=fpsolve.Implicit(max_iter=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fpsolve.ConvergenceWarning)
        with pytest.raises(fpsolve.ConvergenceWarning):
            sol.z.sum().backward()


def test_adjoint_status_is_reported_after_backward():
    W = _weight(4, seed=41)
    x = _randn(3, 4, seed=42, requires_grad=True)
    sol = fpsolve.solve(_tanh(W), torch.zeros(3, 4, dtype=F64), x, **TIGHT)
    assert sol.adjoint is None            # nothing has run yet
    sol.z.sum().backward()
    adj = sol.adjoint
    assert isinstance(adj, fpsolve.Solution)
    assert adj.converged.all() and adj.iterations.shape == (3,)
    assert (adj.residual <= 1e-10).all()


def test_implicit_options_default_to_the_forward_solves():
    """Implicit() takes tolerance, budget, solver and halting from the forward solve; options
    given to Implicit(...) override them."""
    A, b = _mixed_linear()
    z0 = torch.zeros(5, 4, dtype=F64)

    def adjoint(**kw):
        sol = fpsolve.solve(linear_map, z0, (A, b), solver="fixed_point", max_iter=1000, **kw)
        sol.z.sum().backward()
        return sol.adjoint

    loose = adjoint(rtol=1e-3)
    tight = adjoint(rtol=1e-3, backward=fpsolve.Implicit(rtol=1e-11))
    assert loose.converged.all() and tight.converged.all()
    assert (loose.iterations < tight.iterations).all()
    assert (tight.iterations > 1).all()
    # per-sample halting in the adjoint: the harder samples take more iterations
    assert loose.iterations[0] < loose.iterations[-1]
    batch = adjoint(rtol=1e-3, halting="batch")
    assert len(set(batch.iterations.tolist())) == 1
    fast = adjoint(rtol=1e-11, backward=fpsolve.Implicit(solver="anderson"))
    slow = adjoint(rtol=1e-11)
    assert fast.converged.all() and fast.iterations.max() < slow.iterations.max()


def test_double_backward_through_implicit_is_a_clear_error():
    W = _weight(3, seed=43)
    x = _randn(2, 3, seed=44, requires_grad=True)
    sol = fpsolve.solve(_tanh(W), torch.zeros(2, 3, dtype=F64), x, **TIGHT)
    with pytest.raises(RuntimeError, match="double backward.*Unroll"):
        torch.autograd.grad(sol.z.sum(), x, create_graph=True)


def test_double_backward_through_unroll_is_exact():
    W = _weight(2, q=0.5, seed=45)
    x = _randn(2, 2, seed=46, requires_grad=True)

    def fn(x, W):
        return fpsolve.solve(_tanh(W), torch.zeros(2, 2, dtype=F64), x, backward="unroll", **TIGHT).z

    assert torch.autograd.gradgradcheck(fn, (x, W))


# --------------------------------------------------------------------------------------------
# when a gradient exists at all (moved here from the stub tests of issue 3)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backward", ["implicit", "phantom", "unroll"])
def test_sol_z_requires_grad_exactly_when_a_gradient_is_needed(backward):
    z0 = torch.zeros(3, 2, dtype=F64)
    f = lambda z, x: 0.5 * z + x  # noqa: E731
    x = _randn(3, 2, seed=47)
    assert not fpsolve.solve(f, z0, x, backward=backward).z.requires_grad
    assert fpsolve.solve(f, z0, x.clone().requires_grad_(), backward=backward).z.requires_grad
    W = torch.eye(2, dtype=F64, requires_grad=True)
    assert fpsolve.solve(lambda z, x: 0.5 * z @ W + x, z0, x, backward=backward).z.requires_grad
    with torch.no_grad():
        assert not fpsolve.solve(f, z0, x.clone().requires_grad_(), backward=backward).z.requires_grad
    assert not fpsolve.solve(f, z0, x.clone().requires_grad_(), backward="none").z.requires_grad
    # a z0 that requires grad alone needs no gradient: the fixed point does not depend on it
    assert not fpsolve.solve(f, z0.clone().requires_grad_(), x, backward=backward).z.requires_grad
