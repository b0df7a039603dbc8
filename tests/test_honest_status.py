"""Issue 10 ("honest status everywhere"), the parts outside the loop: diagnose's verdicts,
validation at construction, exception types through DEQ, the implicit adjoint on the active
rows only, and the smaller cases (dropout in the looped block, tuple states in
jacobian_penalty, torch.func transforms, inference-mode warm starts, BatchNorm).

Each test reproduces the issue's case and checks against a closed form where there is one.
"""
from __future__ import annotations

import math
import pathlib
import re

import numpy as np
import pytest
import torch
from torch import nn

import fpsolve
import fpsolve._implicit as backward_module
from fpsolve import Flag, diagnose
from fpsolve._checks import check_transforms
from fpsolve._checks import as_float, as_int, usable_start
from fpsolve._criteria import Residual
from fpsolve._diagnosis.plain import PlainSetup, plain_run

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def names(report):
    return [sorted(f.name for f in s) for s in report.flags]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# item 3: DIVERGENCE means non-finite values or growth without bound
# --------------------------------------------------------------------------------------------

def tanh2(z, x):
    return torch.tanh(2 * z + x)


def test_plain_run_does_not_call_a_bounded_map_divergent_from_a_tiny_start():
    """tanh(2z + x) from 0 with x = 1e-9 moves 1e9 times its first residual on its way to
    0.957, and stays bounded by 1: not a divergence. z -> 2z + x from the same start is one."""
    x = torch.tensor([[1e-6], [1e-9]], dtype=F64)
    setup = PlainSetup(80, 16, Residual(0.0, 1e-4, "l2"), True, torch.finfo(F64).eps)
    plain = plain_run(tanh2, torch.zeros_like(x), x, setup, gen())
    assert not plain.diverged.any() and not plain.grew.any() and plain.settled.all()
    grow = plain_run(lambda z, x: 2 * z + x, torch.zeros_like(x), x, setup, gen())
    assert grow.diverged.all()


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_diagnose_bounded_map_started_near_zero_is_not_divergence(solver):
    x = torch.tensor([[1e-6], [1e-9]])
    report = diagnose(tanh2, torch.zeros_like(x), x, solver=solver)
    status = report.solution.status
    for i in range(2):
        if status[i] != fpsolve.Status.DIVERGED:
            assert Flag.DIVERGENCE not in report.flags[i], names(report)
    assert not (status == fpsolve.Status.DIVERGED).any()   # the loop's own rule (item 3)
    assert not report.mask(Flag.DIVERGENCE).any(), names(report)


def test_genuine_blow_up_from_a_tiny_start_is_still_divergence():
    x = torch.tensor([[1e-9], [1e-6]], dtype=F64)
    report = diagnose(lambda z, x: 2 * z + x, torch.zeros_like(x), x, solver="fixed_point", max_iter=80)
    assert all(Flag.DIVERGENCE in s for s in report.flags), names(report)


# --------------------------------------------------------------------------------------------
# item 9: diagnose verdicts
# --------------------------------------------------------------------------------------------

def isometry(n=32, seed=0):
    """An orthogonal Q = U R Uᵀ with rotation angles in [0.3, 3]: no eigenvalue 1, so z -> Qz + x
    has one fixed point, and plain iteration circles around it at a constant residual."""
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=gen(seed)))
    R = torch.zeros(n, n, dtype=F64)
    for i, a in enumerate(torch.linspace(0.3, 3.0, n // 2, dtype=F64).tolist()):
        R[2 * i:2 * i + 2, 2 * i:2 * i + 2] = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=F64)
    return U @ R @ U.T


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_isometry_is_oscillation_not_slow_contraction(solver):
    Q = isometry()
    assert torch.allclose(Q @ Q.T, torch.eye(32, dtype=F64), atol=1e-12)
    x = torch.randn(4, 32, dtype=F64, generator=gen(1))
    report = diagnose(lambda z, x: z @ Q.T + x, torch.zeros_like(x), x, solver=solver, restarts=0)
    flat = report.plain_trace[-1] / report.plain_trace[0]
    assert torch.allclose(flat, torch.ones(4, dtype=F64), atol=1e-9)     # the residual never falls
    for s in report.flags:
        assert Flag.OSCILLATION in s, names(report)
        assert not s & {Flag.SLOW_CONTRACTION, Flag.STAGNATION, Flag.DIVERGENCE, Flag.BUDGET_TOO_SMALL}


@pytest.mark.parametrize("max_iter", [1, 2, 3, 4, 5, 6, 7, 8])
def test_a_budget_too_small_to_judge_says_so(max_iter):
    """A contraction at 0.3 needs about 8 iterations for rtol 1e-4: with fewer, the sample is
    not STAGNATION (noisy f) nor SLOW_CONTRACTION (f contracts fast), but BUDGET_TOO_SMALL."""
    W = torch.randn(8, 8, dtype=F64, generator=gen(2))
    W = 0.3 * W / torch.linalg.matrix_norm(W, ord=2)
    x = torch.randn(3, 8, dtype=F64, generator=gen(3))
    report = diagnose(lambda z, x: torch.tanh(z @ W.T + x), torch.zeros_like(x), x, max_iter=max_iter, restarts=0)
    for i, s in enumerate(report.flags):
        assert not s & {Flag.STAGNATION, Flag.SLOW_CONTRACTION}, names(report)
        if report.solution.converged[i]:
            assert not s, names(report)
        else:
            assert s == {Flag.BUDGET_TOO_SMALL}, names(report)
            assert "budget too small" in report.sample_notes[i]
            assert not report.healthy[i]
            assert report.sample_notes[i] in str(report)
    roomy = diagnose(lambda z, x: torch.tanh(z @ W.T + x), torch.zeros_like(x), x, max_iter=30, restarts=0)
    assert all(not s for s in roomy.flags) and roomy.sample_notes == ["", "", ""]


def test_budget_note_counts_the_iterations_still_needed():
    """z -> 0.5 z + x from 0: the residual is |x| 0.5^t, so reaching rtol 1e-8 needs ~27."""
    x = torch.ones(2, 1, dtype=F64)
    report = diagnose(lambda z, x: 0.5 * z + x, torch.zeros_like(x), x, solver="fixed_point",
                      rtol=1e-8, max_iter=10, restarts=0)
    assert all(s == {Flag.BUDGET_TOO_SMALL} for s in report.flags), names(report)
    more = int(re.search(r"about (\d+) more", report.sample_notes[0]).group(1))
    assert 15 <= more <= 19                   # log2(|r_10| / tol) with tol ~ 2e-8, r_10 ~ 1e-3
    assert "×0.5 per iteration" in report.sample_notes[0]


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_restart_landing_on_a_repelling_fixed_point_is_not_path_dependence(solver):
    """Logistic map at r = 2.5: 0 repels (f'(0) = 2.5), 1 - 1/r = 0.6 attracts every other
    start. The restart from the origin lands exactly on 0: not a second attractor."""
    r = torch.full((3, 1), 2.5, dtype=F64)
    z0 = torch.tensor([[0.3], [0.7], [0.5]], dtype=F64)
    report = diagnose(lambda z, r: r * z * (1 - z), z0, r, solver=solver, restarts=2)
    assert torch.allclose(report.solution.z, torch.full_like(z0, 0.6), atol=1e-4)
    assert not report.mask(Flag.PATH_DEPENDENCE).any(), names(report)
    # two attracting fixed points (double well, c -/+ 1) are still path dependence
    c = torch.tensor([[1.2], [-0.8]], dtype=F64)
    well = diagnose(lambda z, c: z - 0.5 * ((z - c) ** 3 - (z - c)), c + 1.2 * c.sign(), c, solver=solver)
    assert well.mask(Flag.PATH_DEPENDENCE).all(), names(well)


class BNBlock(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width)
        self.drop = fpsolve.SharedDropout(0.2)

    def forward(self, z, x):
        return torch.tanh(0.3 * self.drop(self.bn(self.lin(z))) + x)


@pytest.mark.parametrize("wrap", ["module", "lambda", "method"])
@pytest.mark.parametrize("train", [True, False])
def test_diagnose_leaves_module_state_as_it_found_it(wrap, train):
    torch.manual_seed(0)
    block = BNBlock().train(train)
    block.bn.running_mean.add_(0.5)
    block.lin.eval()                              # a mixed training flag must survive too
    before = {k: v.clone() for k, v in block.state_dict().items()}
    flags = {name: m.training for name, m in block.named_modules()}
    f = {"module": block, "lambda": lambda z, x: block(z, x), "method": block.forward}[wrap]
    x = torch.randn(6, 8)
    diagnose(f, torch.zeros_like(x), x, halting="batch")
    after = block.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert {name: m.training for name, m in block.named_modules()} == flags
    assert block.drop.mask is None


def test_summary_lists_healthy_samples_as_indices_and_notes_once():
    class Opaque(torch.autograd.Function):   # no forward-mode rule: the fallback note
        @staticmethod
        def forward(ctx, z):
            return 0.5 * torch.sin(z)

        @staticmethod
        def backward(ctx, g):  # pragma: no cover
            raise NotImplementedError
    x = torch.randn(3, 2, dtype=F64, generator=gen(4))
    # halting="batch" runs the spectrum and the sensitivity as two Arnoldi groups: one note each
    report = diagnose(lambda z, x: Opaque.apply(z) + x, torch.zeros_like(x), x, halting="batch")
    assert len(report.notes) == len(set(report.notes)) == 1
    text = str(report)
    assert text.count("central differences") == 1
    assert "healthy samples (unique, attracting fixed point), by index: [0, 1, 2]" in text
    assert "healthy (unique, attracting fixed point): 0" not in text


# --------------------------------------------------------------------------------------------
# item 5: validation at construction; numpy scalars are the numbers they are
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, exc, match", [
    (lambda: fpsolve.Implicit(rtol=float("inf")), ValueError, r"Implicit\(rtol"),
    (lambda: fpsolve.Implicit(rtol=float("nan")), ValueError, r"Implicit\(rtol"),
    (lambda: fpsolve.Implicit(atol=-1.0), ValueError, r"Implicit\(atol"),
    (lambda: fpsolve.Implicit(rtol=0, atol=0), ValueError, "both 0"),
    (lambda: fpsolve.Implicit(solver="foo"), ValueError, "solver='foo'"),
    (lambda: fpsolve.Implicit(max_iter=0), ValueError, r"Implicit\(max_iter"),
    (lambda: fpsolve.Implicit(max_iter=2.5), TypeError, r"Implicit\(max_iter"),
    (lambda: fpsolve.Phantom(damping=0.0), ValueError, r"Phantom\(damping"),
    (lambda: fpsolve.Phantom(steps=True), TypeError, r"Phantom\(steps"),
    (lambda: fpsolve.Unroll(steps=0), ValueError, r"Unroll\(steps"),
    (lambda: fpsolve.DEQ(nn.Linear(2, 2), rtol=-1), ValueError, "rtol"),
    (lambda: fpsolve.DEQ(nn.Linear(2, 2), rtol=float("nan")), ValueError, "rtol"),
    (lambda: fpsolve.DEQ(nn.Linear(2, 2), max_iter=0), ValueError, "max_iter"),
    (lambda: fpsolve.DEQ(nn.Linear(2, 2), max_iter=2.5), TypeError, "max_iter"),
    (lambda: fpsolve.DEQ(nn.Linear(2, 2), atol=0, rtol=0), ValueError, "both 0"),
    (lambda: fpsolve.DEQ(nn.Linear(2, 2), record="yes"), TypeError, "record"),
    (lambda: fpsolve.DEQ(nn.Linear(2, 2), jacobian_penalty=-1), ValueError, "jacobian_penalty"),
    (lambda: fpsolve.LoopedTransformerBlock(8, 2, residual_scale=float("nan")), ValueError, "residual_scale"),
    (lambda: fpsolve.LoopedTransformerBlock(8, 2, dropout=1.0), ValueError, "dropout"),
    (lambda: fpsolve.LoopedTransformerBlock(8, 2, dropout=float("nan")), ValueError, "dropout"),
    (lambda: fpsolve.LoopedTransformerBlock(8, 2, mlp_ratio=0), ValueError, "mlp_ratio"),
    (lambda: fpsolve.SharedDropout(p=float("nan")), ValueError, "p"),
])
def test_bad_options_are_rejected_when_the_object_is_made(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_numpy_scalars_are_accepted_as_the_numbers_they_are():
    assert as_int("max_iter", np.int64(20)) == 20 and type(as_int("max_iter", np.int32(3))) is int
    assert as_float("rtol", np.float32(0.5)) == 0.5 and type(as_float("rtol", np.float64(1e-3))) is float
    bw = fpsolve.Implicit(max_iter=np.int64(40), rtol=np.float64(1e-6))
    assert bw.max_iter == 40 and type(bw.max_iter) is int
    assert fpsolve.Phantom(steps=np.int16(2)).steps == 2
    layer = fpsolve.DEQ(lambda z, x: 0.5 * z + x, max_iter=np.int64(20), rtol=np.float32(1e-4),
                        record=np.bool_(True), backward=bw)
    assert layer.options["max_iter"] == 20 and type(layer.options["max_iter"]) is int
    x = torch.ones(2, 3, dtype=F64, requires_grad=True)
    z, sol = layer(x)
    assert sol.converged.all() and sol.trace is not None
    z.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 2.0))      # z* = 2x
    block = fpsolve.LoopedTransformerBlock(np.int64(8), np.int64(2), residual_scale=np.float32(0.2))
    assert block.residual_scale == pytest.approx(0.2)


# --------------------------------------------------------------------------------------------
# item 6: DEQ keeps the block's exception type
# --------------------------------------------------------------------------------------------

class MyError(Exception):
    pass


class Raising(nn.Module):
    def __init__(self, err):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.err = err

    def forward(self, z, x):
        raise self.err


@pytest.mark.parametrize("err", [KeyError("token"), MyError("mine"), IndexError("index 9"), RuntimeError("CUDA out of memory")])
def test_deq_lets_the_blocks_own_exception_through(err):
    layer = fpsolve.DEQ(Raising(err))
    with pytest.raises(type(err)) as info:
        layer(torch.zeros(2, 4))
    assert info.value is err
    if hasattr(err, "add_note"):
        assert any("first call" in n for n in info.value.__notes__)


def test_deq_explains_a_shape_mismatch_as_pass_z0():
    class Wide(nn.Module):           # state of width 8, input of width 3
        def __init__(self):
            super().__init__()
            self.lin, self.inp = nn.Linear(8, 8), nn.Linear(3, 8)

        def forward(self, z, x):
            return torch.tanh(self.lin(z) + self.inp(x))
    with pytest.raises(ValueError, match="pass z0") as info:      # matmul shape error
        fpsolve.DEQ(Wide())(torch.zeros(2, 3))
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(ValueError, match="pass z0"):              # returns another shape
        fpsolve.DEQ(lambda z, x: torch.cat([z, z], dim=1))(torch.zeros(2, 3))
    z, sol = fpsolve.DEQ(Wide())(torch.zeros(2, 3), z0=torch.zeros(2, 8))
    assert z.shape == (2, 8)


# --------------------------------------------------------------------------------------------
# item 10: the per-sample implicit adjoint works on the active rows only
# --------------------------------------------------------------------------------------------

class Counted:
    """f(z, x) = tanh(s ⊙ (z Wᵀ) + x[:, :-1]), s = x[:, -1] per sample (its own contraction);
    records the rows of every call."""

    def __init__(self, W):
        self.W, self.rows = W, []

    def __call__(self, z, x):
        self.rows.append(z.shape[0])
        return torch.tanh(x[:, -1:] * (z @ self.W.T) + x[:, :-1])


def _problem(B=24, D=6, seed=5):
    W = torch.randn(D, D, dtype=F64, generator=gen(seed))
    W = (W / torch.linalg.matrix_norm(W, ord=2)).requires_grad_()
    x = torch.cat([torch.randn(B, D, dtype=F64, generator=gen(seed + 1)),
                   torch.linspace(0.05, 0.95, B, dtype=F64)[:, None]], dim=1).requires_grad_()
    weights = torch.randn(B, D, dtype=F64, generator=gen(seed + 2))
    return W, x, weights


def _implicit_grads(f, W, x, weights, **kw):
    sol = fpsolve.solve(f, torch.zeros(x.shape[0], W.shape[0], dtype=F64), x, solver="fixed_point",
                        rtol=1e-11, max_iter=500, backward=fpsolve.Implicit(rtol=1e-11, max_iter=1000), **kw)
    calls = len(f.rows)
    grads = torch.autograd.grad((sol.z * weights).sum(), (x, W))
    return grads, f.rows[calls:], sol


def test_adjoint_products_shrink_with_the_active_rows_and_gradients_are_identical(monkeypatch):
    W, x, weights = _problem()
    f = Counted(W)
    fast, backward_rows, sol = _implicit_grads(f, W, x, weights)
    assert sol.adjoint.converged.all() and len(set(sol.adjoint.iterations.tolist())) > 3
    # graphs were rebuilt on fewer and fewer rows (one evaluation of f each)
    assert backward_rows and all(b <= 0.75 * a for a, b in zip([24] + backward_rows, backward_rows))
    monkeypatch.setattr(backward_module, "REBUILD_FRACTION", 0.0)        # always the whole batch
    whole, rows_whole, _ = _implicit_grads(Counted(W), W, x, weights)
    assert rows_whole == []
    for a, b in zip(fast, whole):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    # and the closed form: dz*/dθ from the linear system at z*, here via Unroll's reference
    unrolled = torch.autograd.grad((fpsolve.solve(Counted(W), torch.zeros(24, 6, dtype=F64), x, solver="fixed_point",
                                                   rtol=1e-13, max_iter=800, backward="unroll").z * weights).sum(), (x, W))
    for a, b in zip(fast, unrolled):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_gradcheck_with_adjoint_rows_halting_at_different_passes():
    W, x, _ = _problem(B=5, D=3, seed=7)
    Wd = W.detach().clone().requires_grad_()

    def fn(x, W):
        return fpsolve.solve(Counted(W), torch.zeros(5, 3, dtype=F64), x, solver="anderson",
                             rtol=1e-12, max_iter=400, backward=fpsolve.Implicit(rtol=1e-12, max_iter=800)).z
    assert torch.autograd.gradcheck(fn, (x.detach().clone().requires_grad_(), Wd))


def test_adjoint_falls_back_to_the_whole_batch_when_f_fails_on_a_subset(monkeypatch):
    W, x, weights = _problem()
    strict = {"on": False}

    class Picky(Counted):
        def __call__(self, z, x):
            if strict["on"] and z.shape[0] != x.shape[0]:   # (never: x is selected with z)
                raise AssertionError
            if strict["on"] and z.shape[0] < 24:
                raise KeyError("this f only takes the whole batch")
            return super().__call__(z, x)
    f = Picky(W)
    sol = fpsolve.solve(f, torch.zeros(24, 6, dtype=F64), x, solver="fixed_point", rtol=1e-11, max_iter=500,
                        backward=fpsolve.Implicit(rtol=1e-11, max_iter=1000))
    strict["on"] = True
    got = torch.autograd.grad((sol.z * weights).sum(), (x, W))
    monkeypatch.setattr(backward_module, "REBUILD_FRACTION", 0.0)
    want, _, _ = _implicit_grads(Counted(W), W, x, weights)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_adjoint_with_f_closed_over_per_batch_tensors_falls_back():
    """c [B, D] closed over: every forward row halts together (rows c_i = ±h are mirror images),
    the adjoint rows do not; on a subset f + c cannot broadcast, so the whole-batch graph is kept."""
    D = 4
    W = torch.randn(D, D, dtype=F64, generator=gen(8))
    W = 0.6 * W / torch.linalg.matrix_norm(W, ord=2)
    h = torch.randn(1, D, dtype=F64, generator=gen(9))
    c = torch.cat([h, -h, h, -h, h, -h]).requires_grad_()

    def f(z):
        return torch.tanh(z @ W.T + c)
    sol = fpsolve.solve(f, torch.zeros(6, D, dtype=F64), solver="fixed_point", rtol=1e-12, max_iter=300,
                        backward=fpsolve.Implicit(rtol=1e-12, max_iter=600))
    assert len(set(sol.iterations.tolist())) == 1
    weights = torch.randn(6, D, dtype=F64, generator=gen(10)) * torch.tensor([1.0, 1e-6, 1e3, 1.0, 1e-3, 0.0], dtype=F64)[:, None]
    (g,) = torch.autograd.grad((sol.z * weights).sum(), c)
    assert len(set(sol.adjoint.iterations.tolist())) > 1
    zs = sol.z.detach()            # closed form: g = u (1 - z*²), u (I - diag(1 - z*²) W) = weights per row
    d = 1 - zs ** 2
    u = torch.stack([torch.linalg.solve((torch.eye(D, dtype=F64) - d[i][:, None] * W).T, weights[i]) for i in range(6)])
    torch.testing.assert_close(g, u * d, rtol=1e-9, atol=1e-9)


def test_adjoint_keeps_the_whole_batch_when_f_changes_between_calls():
    """A map that drifts a little at every call (like a spectral_norm hook's power iteration in
    train mode): the rows-only graph would be another map, so it is refused and the adjoint
    converges through the original graph."""
    W, x, weights = _problem()
    calls = {"n": 0}

    def f(z, x):
        calls["n"] += 1
        return torch.tanh(x[:, -1:] * (z @ W.T) * (1 + 1e-6 * calls["n"]) + x[:, :-1])
    sol = fpsolve.solve(f, torch.zeros(24, 6, dtype=F64), x, solver="fixed_point", rtol=1e-10, max_iter=500,
                        backward=fpsolve.Implicit(rtol=1e-10, max_iter=1000))
    before = calls["n"]
    (sol.z * weights).sum().backward()
    assert calls["n"] - before == 1            # one attempt, refused, never retried
    assert sol.adjoint.converged.all()


# --------------------------------------------------------------------------------------------
# item 11: the smaller cases
# --------------------------------------------------------------------------------------------

def test_looped_block_with_dropout_converges_in_train_mode():
    torch.manual_seed(0)
    block = fpsolve.LoopedTransformerBlock(16, heads=2, dropout=0.1).train()
    layer = fpsolve.DEQ(block, rtol=1e-4, max_iter=60)
    x = torch.randn(4, 5, 16)
    z, sol = layer(x)
    assert (sol.status == fpsolve.Status.CONVERGED).all(), sol.status
    z.square().mean().backward()
    grads = [p.grad for p in block.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the mask is drawn again at the next forward (another map), and eval mode has no dropout
    mask = block.drop_attn.mask.clone()
    layer(x)
    assert not torch.equal(mask, block.drop_attn.mask)
    block.eval()
    with torch.no_grad():
        torch.testing.assert_close(block(z, x), block(z, x))


def test_jacobian_penalty_on_a_tuple_state_is_the_frobenius_norm():
    A = torch.randn(3, 3, dtype=F64, generator=gen(11))
    Bm = torch.randn(2, 3, dtype=F64, generator=gen(12))
    C = torch.randn(2, 2, dtype=F64, generator=gen(13))

    def f(z, x):          # (a, b) -> (a Aᵀ + x, a Bᵀ + b Cᵀ): J = [[A, 0], [B, C]]
        a, b = z
        return a @ A.T + x, a @ Bm.T + b @ C.T
    z = (torch.zeros(4, 3, dtype=F64), torch.zeros(4, 2, dtype=F64))
    torch.manual_seed(0)
    est = fpsolve.jacobian_penalty(f, z, torch.zeros(4, 3, dtype=F64), samples=4000)
    exact = A.square().sum() + Bm.square().sum() + C.square().sum()
    assert est.shape == (4,)
    torch.testing.assert_close(est, exact.expand(4), rtol=0.08, atol=0.0)
    # and through DEQ, differentiable
    W = (0.3 * torch.eye(2, dtype=F64)).requires_grad_()
    layer = fpsolve.DEQ(lambda z, x: (torch.tanh(z[0] @ W + x), 0.5 * z[1]), jacobian_penalty=2)
    zz, sol = layer(torch.ones(3, 2, dtype=F64), z0=(torch.zeros(3, 2, dtype=F64), torch.ones(3, 1, dtype=F64)))
    assert sol.jacobian_penalty.shape == (3,) and sol.jacobian_penalty.requires_grad
    sol.jacobian_penalty.sum().backward()
    assert W.grad is not None and torch.isfinite(W.grad).all()


def test_torch_func_transforms_give_clear_errors_or_work():
    W = 0.5 * torch.eye(3)
    x = torch.randn(4, 3)

    def loss(x, backward):
        return fpsolve.solve(lambda z, x: torch.tanh(z @ W + x), torch.zeros_like(x), x, backward=backward).z.sum()
    with pytest.raises(RuntimeError, match="torch.autograd.grad"):
        torch.func.grad(loss)(x, "implicit")
    g = torch.func.grad(loss)(x, "unroll")                    # these record ordinary graphs
    xr = x.clone().requires_grad_()
    want = torch.autograd.grad(loss(xr, "implicit"), xr)[0]
    torch.testing.assert_close(g, want, rtol=1e-2, atol=2e-3)   # (unrolled Anderson at rtol 1e-4, float32)
    assert torch.isfinite(torch.func.grad(loss)(x.detach(), "phantom")).all()
    layer = fpsolve.DEQ(lambda z, x: torch.tanh(z @ W + x))
    with pytest.raises(RuntimeError, match="vmap.*dimension 0"):
        torch.func.vmap(lambda xx: layer(xx)[0])(x.detach().unsqueeze(1))
    with pytest.raises(RuntimeError, match="vmap"):   # what solve() calls first (see the report)
        torch.func.vmap(lambda xx: check_transforms("none") or xx)(x.detach())
    check_transforms("implicit")                        # outside any transform: nothing


def test_warm_start_from_inference_mode_in_a_training_forward():
    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, z, x):
            return torch.tanh(0.5 * self.lin(z)) + x
    layer = fpsolve.DEQ(Cell(), rtol=1e-5)
    x = torch.randn(3, 4)
    with torch.inference_mode():
        warm, _ = layer(x)
    assert warm.is_inference()
    z, sol = layer(x, z0=warm)                     # a training forward from it
    z.sum().backward()
    assert sol.converged.all() and all(p.grad is not None for p in layer.parameters())
    # the helper the loop's entry uses: a copy only when needed
    plain = torch.zeros(2)
    assert usable_start(plain) is plain
    cloned = usable_start(warm)
    assert not cloned.is_inference() and torch.equal(cloned, warm)
    pair = usable_start((warm, plain))
    assert isinstance(pair, tuple) and not pair[0].is_inference() and pair[1] is plain
    with torch.no_grad():
        ok = fpsolve.solve(layer.block, usable_start(warm), x).z
    torch.testing.assert_close(ok, warm, rtol=1e-4, atol=1e-4)


def test_the_batchnorm_recipe_in_the_training_docs_runs():
    """docs/training.md's BatchNorm block, as shown: running statistics move once per forward."""
    text = (pathlib.Path(__file__).parents[1] / "docs" / "training.md").read_text()
    section = text.split("### BatchNorm inside the block", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "docs/training.md", "exec"), scope)
    assert scope["tracked"] == [1, 2]
