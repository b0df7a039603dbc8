"""State and input structures: tuple/list states, x as tensor/tuple/list/dict, shapes, dtypes."""
from __future__ import annotations

import pytest
import torch

import fpsolve

from problems import (COS_FIXED_POINT, SOLVERS, RowCounter, affine_answer, distance, generator,
                      linear_map, linear_problem, mean_hw_problem, residual_at, tanh_answer_scipy,
                      tanh_problem, tanh_weight)

B = 4


def _pair_map(z, x):
    """A coupled affine map on a (z_H [B, 3], z_L [B, 2, 2]) pair, per-sample data in x."""
    zH, zL = z
    xH, xL = x["H"], x["L"]
    newH = 0.3 * zH + 0.2 * zL.flatten(1)[:, :3] + xH
    newL = 0.4 * zL - 0.1 * zH.sum(1)[:, None, None] + xL
    return (newH, newL)


def _pair_data(dtype=torch.float64):
    xH = torch.randn(B, 3, dtype=torch.float64, generator=generator(1))
    xL = torch.randn(B, 2, 2, dtype=torch.float64, generator=generator(2))
    answers = []
    for s in range(B):
        def flat(v, s=s):
            zH, zL = v[:3][None], v[3:].reshape(1, 2, 2)
            h, l = _pair_map((zH, zL), {"H": xH[s:s + 1], "L": xL[s:s + 1]})
            return torch.cat([h.flatten(), l.flatten()])
        answers.append(affine_answer(flat, 7))
    ans = torch.stack(answers)
    return {"H": xH.to(dtype), "L": xL.to(dtype)}, (ans[:, :3], ans[:, 3:].reshape(B, 2, 2))


@pytest.mark.parametrize("container", [tuple, list])
@pytest.mark.parametrize("solver", SOLVERS)
def test_pair_state_comes_back_in_the_same_structure(solver, container):
    x, (wantH, wantL) = _pair_data()
    z0 = container([torch.zeros(B, 3, dtype=torch.float64), torch.zeros(B, 2, 2, dtype=torch.float64)])
    seen = []

    def f(z, x):
        assert type(z) is container and len(z) == 2
        assert z[0].shape[1:] == (3,) and z[1].shape[1:] == (2, 2)
        seen.append(z[0].shape[0])
        return container(_pair_map(z, x))

    sol = fpsolve.solve(f, z0, x, solver=solver, rtol=1e-11, max_iter=300)
    assert type(sol.z) is container and len(sol.z) == 2
    assert sol.z[0].shape == (B, 3) and sol.z[1].shape == (B, 2, 2)
    assert sol.z[0].dtype == sol.z[1].dtype == torch.float64
    assert sol.converged.all()
    torch.testing.assert_close(sol.z[0], wantH, atol=1e-9, rtol=0)
    torch.testing.assert_close(sol.z[1], wantL, atol=1e-9, rtol=0)
    its = int(sol.iterations.sum())
    assert sum(seen) == sol.evaluations and its <= sol.evaluations <= its + 3 * B   # check_every 4
    # the residual is over both tensors of a sample
    fz = _pair_map(sol.z, x)
    r = torch.sqrt(((fz[0] - sol.z[0]) ** 2).sum(1) + ((fz[1] - sol.z[1]) ** 2).sum((1, 2)))
    torch.testing.assert_close(sol.residual, r, rtol=1e-6, atol=1e-15)


def test_pair_state_residual_covers_both_tensors():
    """Only the second tensor moves; the residual must still see it (not just z[0])."""
    z0 = (torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64))
    x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    f = lambda z, x: (z[0], 0.5 * z[1] + x)  # noqa: E731
    sol = fpsolve.solve(f, z0, x, solver="fixed_point", rtol=1e-10, max_iter=200)
    assert sol.converged.all()
    assert (sol.iterations > 10).all()
    torch.testing.assert_close(sol.z[1], (2 * x).expand(2, 5), atol=1e-8, rtol=0)
    torch.testing.assert_close(sol.z[0], z0[0])


def _x_in(kind, A, b):
    if kind == "tensor":
        return torch.cat([A.flatten(1), b], dim=1)
    if kind == "tuple":
        return (A, b)
    if kind == "list":
        return [A, b]
    if kind == "dict":
        return {"A": A, "b": b}
    if kind == "nested":
        return {"params": (A, [b])}
    raise AssertionError(kind)


def _x_out(kind, x, n):
    if kind == "tensor":
        return x[:, : n * n].reshape(-1, n, n), x[:, n * n:]
    if kind in ("tuple", "list"):
        assert type(x) is (tuple if kind == "tuple" else list)
        return x[0], x[1]
    if kind == "dict":
        assert isinstance(x, dict) and set(x) == {"A", "b"}
        return x["A"], x["b"]
    if kind == "nested":
        return x["params"][0], x["params"][1][0]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["tensor", "tuple", "list", "dict", "nested"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_x_as_tensor_tuple_list_dict(solver, kind):
    """Per-sample data in any container is compacted with the state (rows stay aligned)."""
    n = 4
    # different contraction factors per sample, so rows halt at different times
    a = torch.tensor([0.1, 0.9, 0.5, 0.97, 0.3], dtype=torch.float64)
    A = a[:, None, None] * torch.linalg.qr(torch.randn(5, n, n, dtype=torch.float64, generator=generator(3)))[0]
    b = torch.randn(5, n, dtype=torch.float64, generator=generator(4))
    want = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - A, b.unsqueeze(-1)).squeeze(-1)

    def f(z, x):
        A_, b_ = _x_out(kind, x, n)
        assert A_.shape[0] == b_.shape[0] == z.shape[0]
        return linear_map(z, (A_, b_))

    f = RowCounter(f)
    sol = fpsolve.solve(f, torch.zeros(5, n, dtype=torch.float64), _x_in(kind, A, b), solver=solver,
                        rtol=1e-11, max_iter=1000)
    assert sol.converged.all()
    torch.testing.assert_close(sol.z, want, atol=1e-8, rtol=1e-8)
    if solver == "fixed_point":
        assert min(f.rows) < 5, "rows should have been dropped as samples halted"


@pytest.mark.parametrize("solver", SOLVERS)
def test_vector_state_of_shape_B(solver):
    z0 = torch.zeros(5, dtype=torch.float64)
    seen_shapes = set()

    def f(z):
        seen_shapes.add(z.ndim)
        return torch.cos(z)

    sol = fpsolve.solve(f, z0, solver=solver, rtol=1e-12, max_iter=200)
    assert seen_shapes == {1}, "f must receive the state in its own shape [b]"
    assert sol.z.shape == (5,) and sol.residual.shape == (5,)
    torch.testing.assert_close(sol.z, torch.full((5,), COS_FIXED_POINT, dtype=torch.float64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_image_state_receives_its_own_shape(solver):
    p = mean_hw_problem(B=3, C=2, H=3, W=4)
    shapes = set()

    def f(z, x):
        shapes.add(tuple(z.shape[1:]))
        return p.f(z, x)

    sol = fpsolve.solve(f, p.z0, p.x, solver=solver, rtol=1e-11)
    assert shapes == {(2, 3, 4)}
    assert sol.z.shape == (3, 2, 3, 4)
    torch.testing.assert_close(sol.z, p.answer, atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", SOLVERS)
def test_dtype_follows_the_input(solver, dtype):
    p = tanh_problem(B=3, n=4, dtype=dtype)
    dtypes = set()

    def f(z, x):
        dtypes.add(z.dtype)
        return p.f(z, x)

    sol = fpsolve.solve(f, p.z0, p.x, solver=solver, rtol=1e-5 if dtype == torch.float32 else 1e-10)
    assert dtypes == {dtype}
    assert sol.z.dtype == dtype and sol.residual.dtype == dtype
    assert sol.converged.all()
    assert distance(sol.z, p.answer).max() < (1e-4 if dtype == torch.float32 else 1e-8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_low_precision_state(solver, dtype):
    """float16/bfloat16 states: f sees the input dtype, residuals are float32, z comes back as given."""
    p = tanh_problem(B=4, n=6, dtype=torch.float64)
    Wl = tanh_weight(6, 0.8, seed=3).to(dtype)
    x = p.x.to(dtype)
    dtypes = set()

    def f(z, x):
        dtypes.add(z.dtype)
        return torch.tanh(z @ Wl.T + x)

    sol = fpsolve.solve(f, torch.zeros(4, 6, dtype=dtype), x, solver=solver, rtol=1e-2, max_iter=100)
    assert dtypes == {dtype}
    assert sol.z.dtype == dtype
    assert sol.residual.dtype == torch.float32
    assert sol.converged.all(), sol
    assert torch.isfinite(sol.z).all()
    # against the float64 answer of the same (rounded) problem
    want = tanh_answer_scipy(Wl.double(), x.double())
    err = distance(sol.z, want) / want.norm(dim=1)
    assert err.max() < 5e-2, err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision_pair_state(dtype):
    z0 = (torch.zeros(3, 2, dtype=dtype), torch.zeros(3, 2, 2, dtype=dtype))
    x = torch.tensor([[1.0], [2.0], [-1.0]], dtype=dtype)
    f = lambda z, x: (0.5 * z[0] + x, 0.5 * z[1] + x[:, :, None])  # noqa: E731
    sol = fpsolve.solve(f, z0, x, rtol=1e-2)
    assert type(sol.z) is tuple
    assert sol.z[0].dtype == sol.z[1].dtype == dtype
    assert sol.converged.all()
    torch.testing.assert_close(sol.z[0].float(), (2 * x.float()).expand(3, 2), atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("solver", SOLVERS)
def test_f_without_x(solver):
    p = linear_problem(B=1, n=3, q=0.7)
    A, b = p.x
    sol = fpsolve.solve(lambda z: linear_map(z, (A, b)), p.z0, solver=solver, rtol=1e-11, max_iter=500)
    assert sol.converged.all()
    torch.testing.assert_close(sol.z, p.answer, atol=1e-9, rtol=0)


def test_residual_recomputes_for_every_structure():
    p = linear_problem(B=3, n=4)
    sol = fpsolve.solve(p.f, p.z0, p.x, rtol=1e-8)
    torch.testing.assert_close(sol.residual, residual_at(p.f, sol.z, p.x), rtol=1e-6, atol=1e-15)
