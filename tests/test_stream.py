"""fpsolve.stream / solve_stream: per sample equal to solve alone, fixed shapes, exact counts."""
from __future__ import annotations

import math

import pytest
import torch

import fpsolve
from fpsolve import Status

from problems import SOLVERS

N, n = 41, 6


def _problem(dtype=torch.float64, seed=0, nan_row=None):
    """z -> tanh(c_i W z + x_i): per-sample contraction c_i in [0.3, 1.3] (some never settle)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=torch.float64)
    W = (W + W.T) / 2
    W = (W / torch.linalg.eigvalsh(W).abs().max()).to(dtype)
    c = (torch.rand(N, 1, generator=g, dtype=torch.float64) + 0.3).to(dtype)
    x = torch.randn(N, n, generator=g, dtype=torch.float64).to(dtype)
    if nan_row is not None:
        x[nan_row, 2] = float("nan")
    f = lambda z, xc: torch.tanh(xc[1] * (z @ W) + xc[0])  # noqa: E731
    return f, x, c


def _batches(x, c, size=5):
    return [(x[i:i + size], c[i:i + size]) for i in range(0, x.shape[0], size)]


def _alone(f, x, c, **kw):
    """Each sample solved on its own by solve (the reference)."""
    sols = [fpsolve.solve(f, torch.zeros(1, n, dtype=x.dtype), (x[i:i + 1], c[i:i + 1]), **kw) for i in range(x.shape[0])]
    return (torch.cat([s.z for s in sols]), torch.cat([s.iterations for s in sols]),
            torch.cat([s.status for s in sols]), torch.cat([s.residual for s in sols]))


ZERO = lambda xc: torch.zeros(xc[0].shape[0], n, dtype=xc[0].dtype)  # noqa: E731


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("check_every", [1, 3])
def test_each_sample_equals_its_solve_alone(solver, check_every):
    f, x, c = _problem(nan_row=7)
    kw = dict(solver=solver, rtol=1e-8, max_iter=40)
    z, its, status, res = _alone(f, x, c, **kw)
    sol = fpsolve.solve_stream(f, _batches(x, c), slots=8, z0=ZERO, check_every=check_every, **kw)
    assert torch.equal(sol.status, status)
    assert torch.equal(sol.iterations, its)
    torch.testing.assert_close(sol.z, z, rtol=1e-7, atol=1e-9)
    ok = status != Status.DIVERGED
    torch.testing.assert_close(sol.residual[ok], res[ok], rtol=1e-6, atol=1e-12)
    assert set(status.tolist()) >= {Status.CONVERGED, Status.DIVERGED}
    assert sol.status[7] == Status.DIVERGED and torch.isfinite(sol.z).all()


@pytest.mark.parametrize("check_every", [1, 2, 5, 16])
def test_counts_are_exact_whatever_check_every(check_every):
    f, x, c = _problem()
    base = fpsolve.solve_stream(f, _batches(x, c), slots=8, z0=ZERO, solver="fixed_point", rtol=1e-6,
                                max_iter=30, check_every=1)
    sol = fpsolve.solve_stream(f, _batches(x, c), slots=8, z0=ZERO, solver="fixed_point", rtol=1e-6,
                               max_iter=30, check_every=check_every)
    assert torch.equal(sol.iterations, base.iterations)
    assert torch.equal(sol.status, base.status)
    assert torch.equal(sol.z, base.z)
    assert sol.evaluations >= base.evaluations     # only compute is wasted


def test_f_always_sees_the_same_shapes_tail_included():
    f, x, c = _problem()
    seen = set()

    def spy(z, xc):
        seen.add((tuple(z.shape), tuple(xc[0].shape), tuple(xc[1].shape)))
        return f(z, xc)

    out = list(fpsolve.stream(spy, _batches(x, c, size=3), slots=8, z0=ZERO, solver="anderson", rtol=1e-6))
    assert seen == {((8, n), (8, n), (8, 1))}
    assert sorted(r.index for r in out) == list(range(N))


def test_fewer_inputs_than_slots_and_an_empty_stream():
    f, x, c = _problem()
    sol = fpsolve.solve_stream(f, [(x[:3], c[:3])], slots=16, z0=ZERO, solver="fixed_point", rtol=1e-8, max_iter=40)
    z, its, status, _ = _alone(f, x[:3], c[:3], solver="fixed_point", rtol=1e-8, max_iter=40)
    assert torch.equal(sol.iterations, its)
    assert list(fpsolve.stream(f, [], z0=ZERO)) == []


def test_stream_results_and_input_structures():
    f = lambda z, x: 0.5 * z + x["a"]  # noqa: E731
    xs = torch.randn(10, 3, dtype=torch.float64)
    out = list(fpsolve.stream(f, [{"a": xs[:4]}, {"a": xs[4:]}], slots=3, z0=torch.zeros(1, 3, dtype=torch.float64),
                              solver="fixed_point", rtol=1e-10, max_iter=100))
    assert sorted(r.index for r in out) == list(range(10))
    for r in out:
        assert isinstance(r, fpsolve.StreamResult) and isinstance(r.status, Status)
        assert r.z.shape == (3,) and isinstance(r.iterations, int) and isinstance(r.residual, float)
        torch.testing.assert_close(r.z, 2 * xs[r.index], rtol=1e-8, atol=1e-9)


def test_tuple_state_and_z0_none_and_a_dataloader():
    xs = torch.randn(20, 4, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs), batch_size=6)

    def f(z, x):
        return (0.5 * z[0] + x[0], 0.25 * z[1] + z[0])
    z0 = lambda x: (torch.zeros_like(x[0]), torch.zeros_like(x[0]))  # noqa: E731
    sol = fpsolve.solve_stream(f, loader, slots=4, z0=z0, solver="fixed_point", rtol=1e-10, max_iter=200)
    torch.testing.assert_close(sol.z[0], 2 * xs, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(sol.z[1], 2 * xs * 4 / 3, rtol=1e-8, atol=1e-9)
    # z0=None: zeros shaped like each input row
    sol = fpsolve.solve_stream(lambda z, x: 0.5 * z + x, [xs], slots=5, solver="fixed_point", rtol=1e-10, max_iter=200)
    torch.testing.assert_close(sol.z, 2 * xs, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_stream_equals_solve(dtype):
    f, x, c = _problem(dtype=dtype)
    kw = dict(solver="fixed_point", rtol=1e-2, max_iter=30)
    ref = fpsolve.solve(f, torch.zeros(N, n, dtype=dtype), (x, c), **kw)
    sol = fpsolve.solve_stream(f, _batches(x, c), slots=N, z0=lambda xc: torch.zeros(xc[0].shape[0], n, dtype=dtype), **kw)
    assert sol.z.dtype == dtype
    assert torch.equal(sol.iterations, ref.iterations) and torch.equal(sol.status, ref.status)


def test_criteria_in_a_stream():
    x = torch.tensor([[0.4], [0.45], [0.3]], dtype=torch.float64)
    readout = lambda z: torch.stack((z, torch.full_like(z, 0.5)), dim=-1)  # noqa: E731
    crit = fpsolve.Stable(readout, patience=2)
    ref = fpsolve.solve(lambda z, x: 0.5 * z + x, torch.zeros(3, 1, dtype=torch.float64), x,
                        solver="fixed_point", criterion=crit)
    sol = fpsolve.solve_stream(lambda z, x: 0.5 * z + x, [x[:1], x[1:]], slots=2, solver="fixed_point",
                               criterion=crit, check_every=3)
    assert torch.equal(sol.iterations, ref.iterations)
    assert sol.status.tolist() == [Status.HALTED] * 3


def test_bad_arguments_are_clear_errors():
    f = lambda z, x: 0.5 * z + x  # noqa: E731
    xs = torch.randn(6, 3)
    with pytest.raises(ValueError, match="slots"):
        list(fpsolve.stream(f, [xs], slots=0))
    with pytest.raises(ValueError, match="check_every"):
        list(fpsolve.stream(f, [xs], check_every=0))
    with pytest.raises(ValueError, match="same shape"):
        list(fpsolve.stream(f, [xs, torch.randn(4, 5)], slots=2, max_iter=3))
    with pytest.raises(ValueError, match="f returned"):
        list(fpsolve.stream(lambda z, x: z[:, :1], [xs], slots=2))
    with pytest.raises(TypeError, match="iterable"):
        list(fpsolve.stream(f, xs))
    with pytest.raises(ValueError, match="z0"):
        list(fpsolve.stream(lambda z, x: z, [(xs, xs)]))
    with pytest.raises(TypeError, match="unknown"):
        fpsolve.solve_stream(f, [xs], halting="batch")
    with pytest.raises(TypeError, match="tensor"):
        list(fpsolve.stream(lambda z, x: z, [(xs, ["a"] * 6)], z0=torch.zeros(1, 3)))

    class NoRows:   # a custom solver without per-row support
        def init(self, z, fz, g):
            return ()

        def step(self, state, z, fz, g, k):
            return fz, state
    with pytest.raises(TypeError, match="per_row"):
        list(fpsolve.stream(f, [xs], solver=NoRows()))


def test_a_compiled_f_never_recompiles_over_the_whole_stream():
    """Refills and the tail included: f sees one shape, so dynamo compiles once."""
    torch._dynamo.reset()
    W = torch.randn(8, 8) * 0.1
    f = torch.compile(lambda z, x: torch.tanh(z @ W + x))          # inductor (CPU here)
    xs = torch.randn(37, 8)
    batches = [xs[:10], xs[10:30], xs[30:]]
    with torch._dynamo.config.patch(error_on_recompile=True):
        sol = fpsolve.solve_stream(f, batches, slots=8, solver="fixed_point", rtol=1e-5, check_every=2)
        sol2 = fpsolve.solve_stream(f, batches, slots=8, solver="anderson", rtol=1e-5, check_every=3)
    assert sol.converged.all() and sol2.converged.all()
    eager = fpsolve.solve_stream(lambda z, x: torch.tanh(z @ W + x), batches, slots=8, solver="fixed_point",
                                 rtol=1e-5, check_every=2)
    assert torch.equal(sol.iterations, eager.iterations)


@pytest.mark.parametrize("solver", ["anderson", "fixed_point"])   # per-pass and per-window norms
def test_compiled_bookkeeping_gives_the_same_results(solver):
    """compile=True compiles the device-side bookkeeping: same answers as eager."""
    f, x, c = _problem(nan_row=3)
    kw = dict(slots=8, z0=ZERO, solver=solver, rtol=1e-8, max_iter=40, check_every=3)
    eager = fpsolve.solve_stream(f, _batches(x, c), **kw)
    comp = fpsolve.solve_stream(f, _batches(x, c), compile=True, **kw)
    assert torch.equal(eager.iterations, comp.iterations) and torch.equal(eager.status, comp.status)
    torch.testing.assert_close(comp.z, eager.z, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="compile"):
        fpsolve.solve_stream(f, _batches(x, c), compile="yes", **kw)


@pytest.mark.parametrize("check_every", [1, 2, 3, 5])
def test_a_best_iterate_from_an_earlier_window_is_returned_exactly(check_every):
    """Logistic maps r z (1 - z) with r in [3.6, 4] never settle: each sample ends MAX_ITER at
    its smallest residual over all passes (earliest on ties), often windows before the end,
    so its iterate must have been saved out of the alternating ring before being overwritten.
    Checked against plain iteration in numpy-free float64 and against solve on each sample."""
    g = torch.Generator().manual_seed(3)
    r = 3.6 + 0.4 * torch.rand(23, 1, generator=g, dtype=torch.float64)
    z0 = 0.05 + 0.9 * torch.rand(23, 1, generator=g, dtype=torch.float64)
    f = lambda z, r: r * z * (1 - z)  # noqa: E731
    budget = 17
    # the reference: every iterate and residual of plain iteration, pass by pass
    zs, rs, z = [], [], z0
    for _ in range(budget):
        fz = f(z, r)
        zs.append(z)
        rs.append((fz - z).abs().squeeze(1))
        z = fz
    rs = torch.stack(rs)
    best = torch.argmin(rs, dim=0)                          # (earliest on ties)
    want_z = torch.stack(zs)[best, torch.arange(23)]
    sol = fpsolve.solve_stream(f, [r[:7], r[7:]], slots=4, z0=lambda rr: z0[_rows_of(rr, r)],
                               solver="fixed_point", rtol=1e-12, max_iter=budget, check_every=check_every)
    assert (sol.status == Status.MAX_ITER).all() and (sol.iterations == budget).all()
    assert torch.equal(sol.z, want_z), (sol.z - want_z).abs().max()
    assert torch.equal(sol.residual, rs[best, torch.arange(23)])
    for i in range(23):
        alone = fpsolve.solve(f, z0[i:i + 1], r[i:i + 1], solver="fixed_point", rtol=1e-12, max_iter=budget,
                              check_every=check_every)
        assert torch.equal(alone.z, sol.z[i:i + 1]) and int(alone.iterations) == budget


def _rows_of(rows, table):
    """The positions in `table` of the given rows (a test helper for a per-sample z0)."""
    return torch.cat([torch.nonzero((table == v).all(1)).flatten()[:1] for v in rows])


@pytest.mark.parametrize("check_every", [1, 2, 3, 5])
def test_solve_gathers_each_answer_from_the_pass_that_holds_it(check_every):
    """solve(halting="sample") on logistic maps r in [2.5, 4]: some rows converge (and leave f's
    batch at various looks), the chaotic ones end MAX_ITER at their best iterate. Every row's
    answer equals plain iteration's, pass for pass, in float64."""
    g = torch.Generator().manual_seed(5)
    B, budget, rtol = 37, 40, 1e-6
    r = 2.5 + 1.5 * torch.rand(B, 1, generator=g, dtype=torch.float64)
    z0 = 0.05 + 0.9 * torch.rand(B, 1, generator=g, dtype=torch.float64)
    f = lambda z, r: r * z * (1 - z)  # noqa: E731
    zs, rs, met, z = [], [], [], z0
    for _ in range(budget):
        fz = f(z, r)
        zs.append(z)
        rs.append((fz - z).abs().squeeze(1))
        met.append(rs[-1] <= rtol * fz.abs().squeeze(1))
        z = fz
    rs, met, zs = torch.stack(rs), torch.stack(met), torch.stack(zs)
    stop = torch.where(met.any(0), met.float().argmax(0), budget)   # first pass that met the rule
    rows = torch.arange(B)
    upto = torch.arange(budget)[:, None] <= stop.clamp(max=budget - 1)
    best = torch.where(upto, rs, math.inf).argmin(0)
    pick = torch.where(stop < budget, stop, best)
    sol = fpsolve.solve(f, z0, r, solver="fixed_point", rtol=rtol, max_iter=budget, check_every=check_every)
    converged = stop < budget
    assert 0 < int(converged.sum()) < B                             # both kinds are present
    assert torch.equal(sol.status == Status.CONVERGED, converged)
    assert torch.equal(sol.iterations, torch.where(converged, stop + 1, budget))
    assert torch.equal(sol.z, zs[pick, rows]), (sol.z - zs[pick, rows]).abs().max()
    assert torch.equal(sol.residual, rs[pick, rows])


def test_an_accelerator_look_brings_its_numbers_over_in_one_copy():
    """The non-CPU path of a look (one concatenated transfer, then split) gives back the same
    arrays, bool masks included; it is run here on CPU tensors (no accelerator on CI)."""
    from fpsolve._rules import host_arrays, joined_to_host
    for dtype in (torch.float32, torch.float64):
        R = torch.rand(4, 7, dtype=dtype)
        F = torch.rand(4, 7, dtype=dtype) + 1
        met = R < 0.5
        lim = torch.full((7,), 3.0, dtype=dtype)
        got = joined_to_host(R, F, met, lim)
        want = host_arrays(R, F, met, lim)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape and (g == w).all()
