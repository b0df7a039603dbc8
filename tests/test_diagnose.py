"""fpsolve.diagnose: every flag on a map whose behaviour is known in closed form.

Per-sample parameters travel in x (with per-sample halting f only sees the active rows).
Each test says which flags a map must get and which it must not: a flag that fires on the
wrong map is as much a failure as one that stays silent on the right one.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

import fpsolve
from fpsolve import Flag, diagnose

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from diagnose_gallery import logistic, rotation, scaled  # noqa: E402

F = Flag


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These maps are tiny: one thread avoids OpenMP spin-waits on a busy machine (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def names(report: fpsolve.Report) -> list:
    return [sorted(f.name for f in s) for s in report.flags]


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def contraction(n: int, q: float, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """An n x n matrix with spectral norm q (shared by all samples, so it may be closed over)."""
    W = torch.randn(n, n, dtype=torch.float64, generator=generator(seed))
    return (q * W / torch.linalg.matrix_norm(W, ord=2)).to(dtype)


# --- closed-form maps -------------------------------------------------------------------

# logistic, rotation and scaled are the gallery's (examples/diagnose_gallery.py).


def double_well(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """z -> z - ((z - c)^3 - (z - c)) / 2: attracting fixed points c - 1 and c + 1, repelling c."""
    u = z - c
    return z - 0.5 * (u ** 3 - u)


# --- healthy maps -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", ["anderson", "fixed_point"])
def test_healthy_maps_get_no_flag(dtype, solver):
    W = contraction(8, 0.6, dtype=dtype)
    x = torch.randn(5, 8, dtype=dtype, generator=generator(1))
    report = diagnose(lambda z, x: torch.tanh(z @ W.T + x), torch.zeros_like(x), x, solver=solver)
    assert all(not s for s in report.flags), names(report)
    assert report.period.tolist() == [0] * 5
    assert (report.spectral_radius < 0.6 + 1e-4).all() and (report.spectral_radius > 0).all()
    assert report.healthy.all() and report.solution.converged.all()


@pytest.mark.parametrize("shape", ["scalar", "image", "tuple"])
def test_healthy_across_batch_shapes(shape):
    g = generator(2)
    if shape == "scalar":        # state [B]: z -> cos(z) (Dottie number), |f'| = 0.67
        report = diagnose(lambda z: torch.cos(z), torch.zeros(4, dtype=torch.float64))
        assert report.spectral_radius.sub(math.sin(0.7390851332151607)).abs().max() < 1e-3
    elif shape == "image":       # state [B, C, H, W]
        x = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=g)
        report = diagnose(lambda z, x: 0.5 * torch.tanh(z.mean(dim=(2, 3), keepdim=True) + z) + x,
                          torch.zeros_like(x), x)
    else:                        # state (a [B, 3], b [B, 2, 2])
        x = torch.randn(4, 3, dtype=torch.float64, generator=g)

        def f(z, x):
            a, b = z
            return (0.5 * torch.tanh(b.flatten(1)[:, :3]) + x,
                    0.3 * a[:, :1, None] * torch.ones(1, 2, 2, dtype=a.dtype))
        report = diagnose(f, (torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 2, 2, dtype=torch.float64)), x)
    assert all(not s for s in report.flags), names(report)


def test_healthy_with_batch_halting_and_inf_norm():
    W = contraction(6, 0.5)
    x = torch.randn(4, 6, dtype=torch.float64, generator=generator(3))
    for options in (dict(halting="batch"), dict(norm="inf"), dict(solver="broyden", atol=1e-9, rtol=0.0)):
        report = diagnose(lambda z, x: torch.tanh(z @ W.T + x), torch.zeros_like(x), x, **options)
        assert all(not s for s in report.flags), (options, names(report))


# --- OSCILLATION ------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_logistic_periods(solver):
    r = torch.tensor([[2.5], [3.2], [3.5], [3.83]], dtype=torch.float64)
    report = diagnose(logistic, torch.full((4, 1), 0.3, dtype=torch.float64), r, solver=solver,
                      restarts=0, max_iter=200)
    assert report.period.tolist() == [0, 2, 4, 3]
    osc = report.mask(F.OSCILLATION).tolist()
    assert osc == [False, True, True, True]
    for s in report.flags[1:]:
        assert not s & {F.DIVERGENCE, F.STAGNATION, F.SLOW_CONTRACTION, F.FALSE_HALT}
    assert not report.flags[0]
    if solver == "anderson":   # Anderson finds the repelling root 1 - 1/r, |f'| = |2 - r| > 1
        assert report.mask(F.UNSTABLE_FIXED_POINT).tolist() == [False, True, True, True]
        assert report.spectral_radius[1:].sub(r[1:, 0] - 2).abs().max() < 1e-3


def test_rotations_rational_and_irrational():
    angles = [2 * math.pi / 5, 2 * math.pi / 7, math.pi * (math.sqrt(5) - 1)]
    theta = torch.tensor(angles, dtype=torch.float64).view(-1, 1)
    c = torch.tensor([[1.0, 2.0]], dtype=torch.float64).repeat(3, 1)
    report = diagnose(rotation, torch.zeros(3, 2, dtype=torch.float64), (c, theta), restarts=0)
    assert report.period.tolist() == [5, 7, 0]
    assert report.mask(F.OSCILLATION).all()            # the irrational one circles, no period
    assert report.spectral_radius.sub(1).abs().max() < 1e-9
    # Anderson solves the linear map exactly: the centre is a root, but plain iteration circles
    assert report.mask(F.UNSTABLE_FIXED_POINT).all()
    assert not report.mask(F.DIVERGENCE).any() and not report.mask(F.FALSE_HALT).any()
    eig = report.eigenvalues[0]
    eig = eig[eig.abs() > 0.5]
    assert torch.allclose(eig.abs(), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(eig.angle().abs().sort().values, torch.full((2,), 2 * math.pi / 5, dtype=torch.float64))


def test_rotation_with_plain_iteration_is_not_a_halt():
    theta = torch.full((2, 1), math.pi * (math.sqrt(5) - 1), dtype=torch.float64)
    c = torch.ones(2, 2, dtype=torch.float64)
    report = diagnose(rotation, torch.zeros(2, 2, dtype=torch.float64), (c, theta), solver="fixed_point")
    assert report.mask(F.OSCILLATION).all() and (report.period == 0).all()
    assert not report.solution.converged.any()
    assert not report.mask(F.STAGNATION).any()


# --- DIVERGENCE -------------------------------------------------------------------------

def test_divergence_growing_and_non_finite():
    x = torch.randn(3, 4, dtype=torch.float64, generator=generator(4))
    grow = diagnose(lambda z, x: 2 * z + x, torch.zeros_like(x), x, solver="fixed_point")
    assert all(s == {F.DIVERGENCE} for s in grow.flags), names(grow)
    blow = diagnose(lambda z: torch.exp(z), torch.full((3, 2), 3.0, dtype=torch.float64), solver="fixed_point")
    assert all(s == {F.DIVERGENCE} for s in blow.flags), names(blow)
    # unbounded linear drift with a residual that never grows: no fixed point at all
    drift = diagnose(lambda z, x: z + x, torch.zeros_like(x), x, solver="fixed_point", rtol=1e-6)
    assert all(s == {F.DIVERGENCE} for s in drift.flags), names(drift)


def test_accelerated_solver_on_a_repelling_root_is_unstable_not_divergent():
    A = torch.diag(torch.tensor([1.5, 0.3, -0.2, 0.5], dtype=torch.float64))
    x = torch.randn(3, 4, dtype=torch.float64, generator=generator(5))
    for solver in ("anderson", "broyden"):
        report = diagnose(lambda z, x: z @ A.T + x, torch.zeros_like(x), x, solver=solver)
        assert all(s == {F.UNSTABLE_FIXED_POINT} for s in report.flags), (solver, names(report))
        assert report.spectral_radius.sub(1.5).abs().max() < 1e-6
    plain = diagnose(lambda z, x: z @ A.T + x, torch.zeros_like(x), x, solver="fixed_point")
    assert all(s == {F.DIVERGENCE} for s in plain.flags), names(plain)


# --- STAGNATION, SLOW_CONTRACTION, FALSE_HALT ---------------------------------------------

@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_stagnation_on_a_noise_floor(solver):
    noise = generator(6)

    def f(z, x):   # contracts at 0.5, but every evaluation adds noise of size 1e-3 (dropout-like)
        return 0.5 * z + x + 1e-3 * torch.randn(z.shape, generator=noise, dtype=z.dtype)
    x = torch.randn(3, 4, dtype=torch.float64, generator=generator(7))
    report = diagnose(f, torch.zeros_like(x), x, solver=solver, rtol=1e-8, restarts=0)
    assert all(s == {F.STAGNATION} for s in report.flags), names(report)
    assert report.spectral_radius.sub(0.5).abs().max() < 1e-6


def test_slow_contraction():
    x = torch.randn(3, 4, dtype=torch.float64, generator=generator(8))
    spent = diagnose(lambda z, x: 0.99 * z + x, torch.zeros_like(x), x, solver="fixed_point",
                     rtol=1e-8, max_iter=100, restarts=0)
    assert all(s == {F.SLOW_CONTRACTION} for s in spent.flags), names(spent)
    # converges, but only near the end of its budget (0.8^t falls to 1e-6 at t ~ 62)
    nearly = diagnose(lambda z, x: 0.8 * z + x, torch.zeros_like(x), x, solver="fixed_point", rtol=1e-6, max_iter=70)
    assert nearly.solution.converged.all()
    assert all(s == {F.SLOW_CONTRACTION} for s in nearly.flags), names(nearly)
    roomy = diagnose(lambda z, x: 0.8 * z + x, torch.zeros_like(x), x, solver="fixed_point", rtol=1e-6, max_iter=200)
    assert all(not s for s in roomy.flags), names(roomy)


def test_false_halt_and_its_distance_estimate():
    q = 0.999
    x = torch.randn(3, 4, dtype=torch.float64, generator=generator(9))
    report = diagnose(lambda z, x: q * z + x, torch.zeros_like(x), x, solver="fixed_point", rtol=1e-2, max_iter=1000)
    assert report.solution.converged.all()
    assert all(s == {F.FALSE_HALT} for s in report.flags), names(report)
    true = torch.linalg.vector_norm(report.solution.z - x / (1 - q), dim=1)
    assert torch.allclose(report.distance, true, rtol=1e-6)        # exact for a linear map
    assert (report.distance > 10 * report.tolerance).all()
    # the same map solved to a tolerance it can honour is healthy
    tight = diagnose(lambda z, x: q * z + x, torch.zeros_like(x), x, rtol=1e-8)
    assert all(not s for s in tight.flags), names(tight)


def test_distance_estimate_on_a_nonlinear_map_matches_a_reference():
    g = generator(16)
    n, B = 24, 8
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    W = Q @ torch.diag(torch.linspace(-0.98, 0.98, n, dtype=torch.float64)) @ Q.T   # slow modes
    x = 0.3 * torch.randn(B, n, dtype=torch.float64, generator=g)

    def f(z, x):
        return torch.tanh(z @ W.T + x)
    reference = fpsolve.solve(f, torch.zeros_like(x), x, rtol=1e-14, atol=1e-14, max_iter=2000, backward="none").z
    report = diagnose(f, torch.zeros_like(x), x, rtol=1e-4, restarts=0)          # krylov=8 < n
    ratio = report.distance / torch.linalg.vector_norm(report.solution.z - reference, dim=1)
    assert ((ratio > 0.99) & (ratio < 1.05)).all(), ratio


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_unnormalised_prenorm_loop_never_passes_as_healthy(solver):
    # z -> u + a MLP(LN(u)), u = z + x: no fixed point; the state's norm grows like t while
    # the steps keep their size, so the relative step falls like 1/t and halts every input
    # at about the same depth.
    W1 = torch.randn(16, 32, generator=generator(10)) / 4
    W2 = torch.randn(32, 16, generator=generator(11)) / 6

    def block(z, x):
        u = z + x
        return u + 0.2 * torch.tanh(torch.nn.functional.layer_norm(u, (16,)) @ W1) @ W2
    x = torch.randn(6, 16, generator=generator(12))
    loose = diagnose(block, torch.zeros_like(x), x, solver=solver, rtol=0.05, max_iter=100, restarts=0)
    assert loose.solution.converged.all()
    assert all(s & {F.FALSE_HALT, F.DIVERGENCE} for s in loose.flags), names(loose)
    tight = diagnose(block, torch.zeros_like(x), x, solver=solver, rtol=1e-5, max_iter=100, restarts=0)
    assert all(s & {F.FALSE_HALT, F.DIVERGENCE} for s in tight.flags), names(tight)


def test_looped_transformer_block_flags_follow_state_normalisation():
    x = torch.randn(3, 6, 16, generator=generator(13))
    torch.manual_seed(0)
    good = fpsolve.LoopedTransformerBlock(16, heads=2).eval()
    torch.manual_seed(0)
    bad = fpsolve.LoopedTransformerBlock(16, heads=2, normalize_state=False).eval()
    ok = diagnose(good, torch.zeros_like(x), x, solver="fixed_point", rtol=1e-3, restarts=0)
    assert all(not s for s in ok.flags), names(ok)
    drifting = diagnose(bad, torch.zeros_like(x), x, solver="fixed_point", rtol=0.05, restarts=0)
    assert all(s & {F.FALSE_HALT, F.DIVERGENCE} for s in drifting.flags), names(drifting)


# --- UNSTABLE, PATH_DEPENDENCE, INPUT_INSENSITIVE, INCONSISTENT ----------------------------

def test_path_dependence_with_two_attractors():
    c = torch.tensor([[1.2], [-0.8], [0.5]], dtype=torch.float64)
    z0 = c + 1.2 * c.sign()             # main solve: c ± 1; the origin lies in the other basin
    report = diagnose(double_well, z0, c)
    assert report.solution.converged.all()
    assert all(F.PATH_DEPENDENCE in s for s in report.flags), names(report)
    assert not report.mask(F.UNSTABLE_FIXED_POINT).any()
    assert torch.allclose(report.restart_distance, torch.full((3,), 2.0, dtype=torch.float64), atol=1e-3)
    assert all(not s for s in diagnose(double_well, z0, c, restarts=0).flags)
    # a single attractor: restarts from anywhere agree
    single = diagnose(lambda z, c: 0.5 * torch.tanh(z) + c, z0, c, restarts=3)
    assert all(not s for s in single.flags), names(single)


def test_input_insensitive_collapse():
    W = contraction(6, 0.5)
    x = torch.randn(4, 6, dtype=torch.float64, generator=generator(14))
    collapsed = diagnose(lambda z, x: torch.tanh(z @ W.T + 1.0 + 1e-6 * x), torch.zeros_like(x), x)
    assert all(s == {F.INPUT_INSENSITIVE} for s in collapsed.flags), names(collapsed)
    assert (collapsed.sensitivity < 1e-4).all()
    alive = diagnose(lambda z, x: torch.tanh(z @ W.T + 1.0 + x), torch.zeros_like(x), x)
    assert all(not s for s in alive.flags) and (alive.sensitivity > 0.05).all()
    # linear in x: a relative change of x moves z* by the same relative amount
    linear = diagnose(lambda z, x: 0.5 * z + x, torch.zeros_like(x), x)
    assert torch.allclose(linear.sensitivity, torch.ones(4, dtype=torch.float64), rtol=1e-6)
    assert diagnose(lambda z: 0.5 * z + 1.0, torch.zeros_like(x)).sensitivity.isnan().all()


def test_inconsistent_from_the_users_check():
    b = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 5.0], [2.0, 4.0, 0.0]], dtype=torch.float64)
    label = torch.tensor([0, 2, 2, 0])                 # samples 1 and 3 settle on the wrong answer

    def check(z, x):
        return z.argmax(dim=1) == x[1]
    report = diagnose(lambda z, x: 0.5 * z + x[0], torch.zeros_like(b), (b, label), check=check)
    assert report.mask(F.INCONSISTENT).tolist() == [False, True, False, True]
    assert all(s <= {F.INCONSISTENT} for s in report.flags)
    with pytest.raises(ValueError, match="one bool per sample"):
        diagnose(lambda z, x: 0.5 * z + x[0], torch.zeros_like(b), (b, label), check=lambda z, x: True)


# --- per-sample independence, spectrum, report ------------------------------------------

def test_each_sample_gets_its_own_flags():
    a = torch.tensor([[0.5], [-1.0], [2.0], [0.3], [0.99]], dtype=torch.float64)
    b = torch.tensor([[1.0], [1.0], [1.0], [-2.0], [1.0]], dtype=torch.float64)
    z0 = torch.zeros(5, 1, dtype=torch.float64)
    mixed = diagnose(scaled, z0, (a, b), solver="fixed_point", rtol=1e-8, max_iter=60)
    expected = [set(), {F.OSCILLATION}, {F.DIVERGENCE}, set(), {F.SLOW_CONTRACTION}]
    assert [set(s) for s in mixed.flags] == expected, names(mixed)
    assert mixed.period.tolist() == [0, 2, 0, 0, 0]
    for i in range(5):   # the same sample alone gets the same verdict
        alone = diagnose(scaled, z0[i:i + 1], (a[i:i + 1], b[i:i + 1]), solver="fixed_point", rtol=1e-8, max_iter=60)
        assert alone.flags[0] == mixed.flags[i]
        assert int(alone.period[0]) == int(mixed.period[i])
        assert float(alone.spectral_radius[0]) == pytest.approx(float(mixed.spectral_radius[i]), rel=1e-9)


def test_spectral_radius_of_linear_maps_with_complex_spectra():
    n, B = 6, 3
    A = torch.randn(B, n, n, dtype=torch.float64, generator=generator(15))
    A = 0.7 * A / torch.linalg.eigvals(A).abs().amax(dim=1).view(-1, 1, 1)   # radius 0.7, complex pairs
    report = diagnose(lambda z, x: torch.bmm(x, z.unsqueeze(2)).squeeze(2) + 1.0,
                      torch.zeros(B, n, dtype=torch.float64), A, restarts=0)
    assert torch.allclose(report.spectral_radius, torch.full((B,), 0.7, dtype=torch.float64), atol=1e-8)


def test_spectral_radius_agrees_with_arpack_on_a_nonlinear_map():
    from scipy.sparse.linalg import LinearOperator, eigs
    n, B = 30, 3
    A = 1.4 * torch.randn(B, n, n, dtype=torch.float64, generator=generator(17)) / math.sqrt(n)
    x = torch.randn(B, n, dtype=torch.float64, generator=generator(18))

    def f(z, x):
        A_, b = x
        return torch.tanh(torch.bmm(A_, z.unsqueeze(2)).squeeze(2) + b)
    report = diagnose(f, torch.zeros(B, n, dtype=torch.float64), (A, x), krylov=n, restarts=0)
    for i in range(B):   # ARPACK on each sample's Jacobian, through Jacobian-vector products
        z = report.solution.z[i:i + 1]
        xi = (A[i:i + 1], x[i:i + 1])

        def matvec(v):
            t = torch.as_tensor(v.reshape(1, n), dtype=torch.float64)
            return torch.func.jvp(lambda zz: f(zz, xi), (z,), (t,))[1].numpy().ravel()
        lam = eigs(LinearOperator((n, n), matvec=matvec, dtype=float), k=1, which="LM", return_eigenvectors=False)
        assert float(report.spectral_radius[i]) == pytest.approx(abs(lam[0]), rel=1e-8)


def test_forward_mode_fallback_to_differences():
    class Opaque(torch.autograd.Function):   # no forward-mode rule
        @staticmethod
        def forward(ctx, z):
            return 0.5 * torch.sin(z) + 1.0

        @staticmethod
        def backward(ctx, g):  # pragma: no cover
            raise NotImplementedError
    report = diagnose(lambda z: Opaque.apply(z), torch.zeros(3, 2, dtype=torch.float64))
    assert report.jacobian == "differences" and any("central differences" in n for n in report.notes)
    true = 0.5 * torch.cos(report.solution.z).abs().amax(dim=1)
    assert torch.allclose(report.spectral_radius, true, atol=1e-6)
    assert all(not s for s in report.flags)


def test_never_raises_on_a_badly_behaved_map():
    def f(z, x):   # nan for some samples, overflow for others, fine for the rest
        return torch.where(x > 0, 0.5 * z + x, torch.where(x < -1, torch.exp(50 * z + 50), z * float("nan")))
    x = torch.tensor([[1.0], [-0.5], [-2.0], [2.0]], dtype=torch.float64)
    report = diagnose(f, torch.ones_like(x), x)
    assert report.flags[0] == frozenset() and report.flags[3] == frozenset()
    assert F.DIVERGENCE in report.flags[1] and F.DIVERGENCE in report.flags[2]
    # the broken samples do not stop the analysis of the others
    assert torch.allclose(report.spectral_radius[[0, 3]], torch.full((2,), 0.5, dtype=torch.float64))
    assert torch.isfinite(report.distance[[0, 3]]).all() and not report.notes


def test_report_text_is_worst_first_and_explains_each_flag():
    a = torch.tensor([[0.5], [2.0], [-1.0]], dtype=torch.float64)
    b = torch.ones(3, 1, dtype=torch.float64)
    report = diagnose(scaled, torch.zeros(3, 1, dtype=torch.float64), (a, b), solver="fixed_point")
    text = str(report)
    assert "2 of 3 samples flagged" in text
    lines = text.splitlines()
    div = next(i for i, l in enumerate(lines) if l.strip().startswith("sample 1: DIVERGENCE"))
    osc = next(i for i, l in enumerate(lines) if l.strip().startswith("sample 2: OSCILLATION (period 2)"))
    assert div < osc                                   # the worst first
    assert F.DIVERGENCE.message in text and F.OSCILLATION.message in text
    assert F.FALSE_HALT.message not in text           # only the flags that occurred are explained
    assert "healthy samples (unique, attracting fixed point), by index: [0]" in text
    for flag in Flag:   # every flag says what to try
        assert "; try " in flag.message


def test_plot_and_cost_accounting():
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    a = torch.tensor([[0.5], [-1.0]], dtype=torch.float64)
    report = diagnose(scaled, torch.zeros(2, 1, dtype=torch.float64), (a, torch.ones(2, 1, dtype=torch.float64)))
    fig = report.plot()
    assert len(fig.axes) == 3
    import matplotlib.pyplot as plt
    plt.close(fig)
    ev = report.evaluations
    assert ev["solve"] == report.solution.evaluations and ev["restarts"] > 0 and ev["jvp"] > 0
    none = diagnose(scaled, torch.zeros(2, 1, dtype=torch.float64), (a, torch.ones(2, 1, dtype=torch.float64)),
                    restarts=0)
    assert none.evaluations["restarts"] == 0 and torch.isnan(none.restart_distance).all()


def test_arguments_are_validated_and_empty_batches_work():
    z = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="restarts"):
        diagnose(lambda z: z, z, restarts=-1)
    with pytest.raises(TypeError, match="solve does not take"):
        diagnose(lambda z: z, z, tolerance=1e-3)
    with pytest.raises(ValueError, match="jacobian"):
        diagnose(lambda z: z, z, jacobian="exact")
    with pytest.raises(ValueError, match="max_iter"):
        diagnose(lambda z: z, z, max_iter=0)
    empty = diagnose(lambda z: 0.5 * z, torch.zeros(0, 3))
    assert empty.flags == [] and empty.period.numel() == 0


# --- a criterion other than the residual rule (issue 19, item 8) --------------------------

def first_of_two(z: torch.Tensor) -> torch.Tensor:
    """A read-out of two classes from the first entry (its answer: the sign of z - 0.5)."""
    return torch.stack((z[:, 0], 1 - z[:, 0]), dim=1)


def test_a_criterion_halt_away_from_a_fixed_point_is_never_healthy():
    x = torch.tensor([[0.2], [-0.2]], dtype=torch.float64)
    z0 = torch.zeros(2, 1, dtype=torch.float64)
    report = diagnose(lambda z, x: 0.9 * z + x, z0, x, solver="fixed_point",
                      criterion=fpsolve.Stable(first_of_two, patience=2))
    assert (report.solution.status == fpsolve.Status.HALTED).all()
    assert (report.solution.residual > 10 * report.tolerance).all()       # far from z* = 10 x
    assert not report.healthy.any() and all(F.FALSE_HALT in s for s in report.flags), names(report)
    assert all("halted by the criterion" in n for n in report.sample_notes), report.sample_notes
    assert "healthy samples" not in str(report)
    # halted by the same criterion once at the fixed point: healthy
    at = diagnose(lambda z, x: 0.5 * z + x, z0, x, criterion=fpsolve.Stable(first_of_two, patience=8))
    assert (at.solution.status == fpsolve.Status.HALTED).all()
    assert all(not s for s in at.flags) and at.sample_notes == ["", ""], (names(at), at.sample_notes)


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_a_criterion_that_never_fires_at_a_fixed_point_is_not_a_budget_problem(solver):
    x = torch.tensor([[0.0, 0.0], [1.0, -2.0]], dtype=torch.float64)   # sample 0 starts at z* = 0
    never = fpsolve.HaltHead(lambda z: torch.full((z.shape[0],), -100.0, dtype=z.dtype))
    report = diagnose(lambda z, x: 0.5 * z + x, torch.zeros_like(x), x, solver=solver, criterion=never,
                      max_iter=60)
    assert (report.solution.status == fpsolve.Status.MAX_ITER).all()
    assert (report.solution.residual <= report.tolerance).all()           # the residual rule holds
    assert all(not s for s in report.flags), names(report)
    assert all("did not halt" in n and "budget" not in n for n in report.sample_notes), report.sample_notes


def test_an_explicit_residual_criterion_sets_the_tolerance_and_norm_judged():
    x = torch.randn(3, 4, dtype=torch.float64, generator=generator(19))
    rule = fpsolve.Residual(rtol=1e-12, norm="inf")
    report = diagnose(lambda z, x: 0.5 * z + x, torch.zeros_like(x), x, criterion=rule)
    assert report.options["rtol"] == 1e-12 and report.options["norm"] == "inf" and report.options["atol"] == 0.0
    fz = 0.5 * report.solution.z + x
    assert torch.allclose(report.tolerance, 1e-12 * fz.abs().amax(dim=1), rtol=1e-12)   # the inf norm
    assert all(not s for s in report.flags), names(report)
    # FALSE_HALT is judged against the criterion's tolerance: loose inf-norm rule, slow map
    q = 0.999
    loose = diagnose(lambda z, x: q * z + x, torch.zeros_like(x), x, solver="fixed_point", max_iter=1000,
                     criterion=fpsolve.Residual(rtol=1e-2, norm="inf"), restarts=0)
    assert loose.solution.converged.all() and loose.options["norm"] == "inf"
    assert all(s == {F.FALSE_HALT} for s in loose.flags), names(loose)
    fz = q * loose.solution.z + x
    assert torch.allclose(loose.tolerance, 1e-2 * fz.abs().amax(dim=1), rtol=1e-12)
    true = (loose.solution.z - x / (1 - q)).abs().amax(dim=1)
    assert torch.allclose(loose.distance, true, rtol=1e-6)                  # measured in the inf norm


# --- restarts find a second attractor a few solution-norms away (issue 19, item 10) ---------

@pytest.mark.parametrize("n", [1, 16])
@pytest.mark.parametrize("side", [1.0, -1.0])
def test_path_dependence_of_tanh_3z_from_either_basin(n, side):
    """tanh(3z) (elementwise) has attracting fixed points ±0.995 per entry and a repelling 0.
    In 1-D a restart one solution-norm from z* towards 0 lands exactly on 0 (rightly not
    counted); the restarts must still reach the other attractor."""
    z0 = torch.full((1, n), 0.2 * side, dtype=torch.float64)
    report = diagnose(lambda z: torch.tanh(3 * z), z0, solver="fixed_point", restarts=8)
    assert report.solution.converged.all()
    assert torch.allclose(report.solution.z, torch.full_like(z0, 0.9950547536867305 * side), atol=1e-3)
    assert report.flags[0] == {F.PATH_DEPENDENCE}, names(report)
    assert float(report.restart_distance[0]) > 0.1
    default = diagnose(lambda z: torch.tanh(3 * z), z0, solver="fixed_point")   # restarts=2
    assert default.flags[0] == {F.PATH_DEPENDENCE}, names(default)


# --- the package's seams (issue 18, part 5) ------------------------------------------------

def test_counts_accept_numpy_integers_with_one_message():
    np = pytest.importorskip("numpy")
    x = torch.randn(2, 3, dtype=torch.float64, generator=generator(20))
    report = diagnose(lambda z, x: 0.5 * z + x, torch.zeros_like(x), x, restarts=np.int64(1),
                      max_period=np.int32(4), krylov=np.int64(2), plain_iter=np.int64(10))
    assert all(not s for s in report.flags), names(report)
    z = torch.zeros(2, 2)
    for name in ("max_period", "krylov", "plain_iter"):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
            diagnose(lambda z: z, z, **{name: 0})
        with pytest.raises(TypeError, match=f"{name} must be an integer >= 1"):
            diagnose(lambda z: z, z, **{name: 2.0})
    with pytest.raises(ValueError, match="restarts must be an integer >= 0"):
        diagnose(lambda z: z, z, restarts=-1)


def test_plot_reads_the_report_only():
    """No import circle: the figures import the report module, never the analysis."""
    import ast
    import inspect
    from fpsolve._diagnosis import plot, report
    for module in (plot, report):
        tree = ast.parse(inspect.getsource(module))
        local = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
        assert local <= ({"report"} if module is plot else {"plot"}), (module.__name__, local)
