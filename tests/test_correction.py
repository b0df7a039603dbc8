"""Fixed-point correction: `Correction(passes, steps, damping)` and `sol.path`.

The kept states are the solve's own iterates (checked against plain iteration, against f's
own inputs, and across halting modes); their gradients are torchdeq's on the same block and
the same states (float64), and gradcheck-exact where a phantom segment as long as the path
reproduces the path's own derivative (a map affine in z, started at 0).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fpsolve

torchdeq = pytest.importorskip("torchdeq")
D = torch.float64


class Block(nn.Module):
    """f(z, x) = tanh(W z + U x + b), ||W||_2 = 0.5: a contraction with monotone residuals."""

    def __init__(self, width: int = 6, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(width, width, generator=g, dtype=D)
        self.W = nn.Parameter(0.5 * w / torch.linalg.matrix_norm(w, 2))
        self.U = nn.Parameter(torch.randn(width, width, generator=g, dtype=D) / width ** 0.5)
        self.b = nn.Parameter(0.1 * torch.randn(width, generator=g, dtype=D))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def _x(B: int = 5, width: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, width, generator=torch.Generator().manual_seed(seed), dtype=D)


def _iterates(block: nn.Module, x: torch.Tensor, n: int) -> list:
    """z_1 = 0, z_{p+1} = f(z_p): the iterate at pass p of plain iteration."""
    z, out = torch.zeros_like(x), []
    with torch.no_grad():
        for _ in range(n):
            out.append(z)
            z = block(z, x)
    return out


@pytest.mark.parametrize("halting", ["batch", "sample"])
@pytest.mark.parametrize("steps,damping", [(1, 1.0), (3, 0.7)])
def test_gradients_equal_torchdeq_on_the_same_states(halting: str, steps: int, damping: float) -> None:
    torch.manual_seed(0)
    block, x = Block(), _x().requires_grad_()
    # torchdeq: states after 3 and 8 solver steps, each with `steps` phantom steps of damping tau
    deq = torchdeq.get_deq(core="indexing", f_solver="fixed_point_iter", f_max_iter=20, f_tol=1e-14,
                           indexing=[3, 8], grad=steps, tau=damping, ift=False)
    deq.train()
    outs, _ = deq(lambda z: block(z, x), torch.zeros_like(x))
    ref_states = outs[:2]              # (the third is the final state)
    # fpsolve: the same states are the iterates at passes 4 and 9 (f applied 3 and 8 times)
    sol = fpsolve.solve(block, torch.zeros_like(x), x, solver="fixed_point", rtol=1e-14, max_iter=20,
                        halting=halting, backward="phantom",
                        correction=fpsolve.Correction(passes=(4, 9), steps=steps, damping=damping))
    assert len(sol.path) == 2
    params = [x, block.W, block.U, block.b]
    plain = _iterates(block, x.detach(), 9)
    for ours, theirs, p in zip(sol.path, ref_states, (4, 9)):
        torch.testing.assert_close(ours.detach(), plain[p - 1], rtol=0, atol=1e-15)
        v = torch.randn_like(ours)
        g_ours = torch.autograd.grad(ours, params, v, retain_graph=True)
        g_ref = torch.autograd.grad(theirs, params, v, retain_graph=True)
        for a, b in zip(g_ours, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert max(float(a.abs().max()) for a in g_ours) > 1e-3   # (not trivially zero)


def test_gradcheck_where_the_phantom_segment_is_the_path() -> None:
    """f(z, x) = A z + tanh(U x) is affine in z: k = p - 1 phantom steps from the iterate at
    pass p (started at 0) have exactly the derivative of that iterate, which gradcheck checks
    against finite differences of the solve itself (x and U)."""
    g = torch.Generator().manual_seed(3)
    A = 0.4 * torch.randn(4, 4, generator=g, dtype=D) / 2
    U0 = torch.randn(4, 3, generator=g, dtype=D)

    def run(x: torch.Tensor, U: torch.Tensor, halting: str) -> torch.Tensor:
        f = lambda z, xx: z @ A.T + torch.tanh(xx @ U.T)  # noqa: E731
        sol = fpsolve.solve(f, torch.zeros(x.shape[0], 4, dtype=D), x, solver="fixed_point",
                            rtol=1e-14, max_iter=12, halting=halting, backward="phantom",
                            correction=fpsolve.Correction(passes=(3, 5), steps=4))
        return sol.path[1]   # pass 5: A-polynomial of degree 3 in tanh(U x); 4 steps from it

    x = torch.randn(3, 3, generator=g, dtype=D, requires_grad=True)
    U = U0.clone().requires_grad_()
    for halting in ("batch", "sample"):
        assert torch.autograd.gradcheck(lambda a, b: run(a, b, halting), (x, U))


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_states_are_the_iterates_f_was_applied_to(solver: str) -> None:
    """halting="batch": sol.path[i] is the very tensor f received at that pass (a reference)."""
    block, x = Block(), _x(B=4)
    seen = []

    def f(z: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        seen.append(z)
        return block(z, xx)

    with torch.no_grad():
        sol = fpsolve.solve(f, torch.zeros_like(x), x, solver=solver, rtol=1e-12, max_iter=15,
                            halting="batch", correction=fpsolve.Correction(passes=(1, 2, 6)))
    for z, p in zip(sol.path, (1, 2, 6)):
        assert torch.equal(z, seen[p - 1])
        assert z.data_ptr() == seen[p - 1].data_ptr()   # kept by reference, not copied


def test_per_sample_halting_keeps_the_final_iterate_of_stopped_rows() -> None:
    """halting="sample": rows still running at pass p give their iterate there (the same as
    under halting="batch"); rows that stopped before p give their returned iterate."""
    block = Block()
    x = _x(B=6)
    z0 = torch.zeros_like(x)
    # rows 0-2 start at their fixed point (they stop at pass 1); the rest run on
    with torch.no_grad():
        star = fpsolve.solve(block, z0, x, rtol=1e-13, max_iter=80).z
    z0[:3] = star[:3]
    corr = fpsolve.Correction(passes=(1, 3, 8))
    with torch.no_grad():
        s = fpsolve.solve(block, z0, x, solver="anderson", rtol=1e-6, max_iter=30, halting="sample",
                          check_every=2, correction=corr)
        b = fpsolve.solve(block, z0, x, solver="anderson", rtol=1e-6, max_iter=30, halting="batch",
                          correction=corr)
    assert bool((s.iterations[:3] == 1).all()) and bool((s.iterations[3:] >= 3).all())
    assert bool((s.iterations < 8).any()) and bool((s.iterations >= 8).any())   # a mix at pass 8
    for zs, zb, p in zip(s.path, b.path, corr.passes):
        ran = s.iterations >= p
        torch.testing.assert_close(zs[ran], zb[ran], rtol=0, atol=1e-12)
        assert torch.equal(zs[~ran], s.z[~ran])
    assert torch.equal(s.path[0], z0)


def test_no_pass_of_a_halted_batch_is_invented() -> None:
    """A pass the loop never reached gives the returned iterate."""
    block, x = Block(), _x()
    with torch.no_grad():
        sol = fpsolve.solve(block, torch.zeros_like(x), x, rtol=1e-3, max_iter=40, halting="batch",
                            correction=fpsolve.Correction(passes=(2, 39)))
    assert int(sol.iterations.max()) < 39
    assert torch.equal(sol.path[1], sol.z)


def test_tuple_state_and_deq_module() -> None:
    """DEQ(correction=...): sol.path in the state's structure, differentiable, usable in a loss;
    last_solution keeps a detached copy."""
    block = Block(width=4)

    def f(z, x):
        a, c = z
        return block(a, x), 0.5 * torch.tanh(a + c)

    x = _x(B=3, width=4)
    layer = fpsolve.DEQ(f, solver="anderson", rtol=1e-8, max_iter=40,
                        correction=fpsolve.Correction(passes=(2, 5), steps=2, damping=0.5))
    z, sol = layer(x, z0=(torch.zeros_like(x), torch.zeros_like(x)))
    assert len(sol.path) == 2 and all(isinstance(p, tuple) and len(p) == 2 for p in sol.path)
    loss = z[0].square().sum() + sum(0.8 ** (2 - i) * p[0].square().sum() for i, p in enumerate(sol.path))
    loss.backward()
    assert block.W.grad is not None and torch.isfinite(block.W.grad).all()
    assert all(not t.requires_grad for p in layer.last_solution.path for t in p)


def test_without_grad_the_path_is_detached_and_correction_does_not_change_the_solve() -> None:
    block, x = Block(), _x()
    plain = fpsolve.solve(block, torch.zeros_like(x), x, rtol=1e-8)
    corr = fpsolve.solve(block, torch.zeros_like(x), x, rtol=1e-8, backward="none",
                         correction=fpsolve.Correction(passes=(3,)))
    assert plain.path is None
    assert torch.equal(plain.z.detach(), corr.z) and torch.equal(plain.iterations, corr.iterations)
    assert not corr.path[0].requires_grad


def test_diverged_rows_get_no_gradient() -> None:
    W = torch.tensor([[0.5]], dtype=D, requires_grad=True)

    def f(z, x):   # row 1 blows up (x = 3 makes the map expanding)
        return z * x * 3 + (z @ W.T) * 0 + torch.tanh(z @ W.T) + 1

    x = torch.tensor([[0.1], [3.0]], dtype=D)
    sol = fpsolve.solve(f, torch.zeros(2, 1, dtype=D), x, solver="fixed_point", max_iter=60,
                        backward="phantom", correction=fpsolve.Correction(passes=(2,)))
    assert int(sol.status[1]) == int(fpsolve.Status.DIVERGED)
    (g,) = torch.autograd.grad(sol.path[0][1].sum(), W, allow_unused=True, materialize_grads=True)
    assert float(g.abs().sum()) == 0.0


@pytest.mark.parametrize("bad,err,word", [
    (dict(passes=()), ValueError, "non-empty"),
    (dict(passes=(3, 2)), ValueError, "increasing"),
    (dict(passes=(2, 2)), ValueError, "increasing"),
    (dict(passes=5), TypeError, "sequence"),
    (dict(passes=(0,)), ValueError, "passes"),
    (dict(passes=(1.5,)), TypeError, "passes"),
    (dict(passes=(2,), steps=0), ValueError, "steps"),
    (dict(passes=(2,), damping=0.0), ValueError, "damping"),
])
def test_bad_options_are_clear_errors(bad: dict, err: type, word: str) -> None:
    with pytest.raises(err, match=word):
        fpsolve.Correction(**bad)


def test_pass_past_the_budget_and_wrong_type_are_errors() -> None:
    block, x = Block(), _x()
    with pytest.raises(ValueError, match="max_iter"):
        fpsolve.solve(block, torch.zeros_like(x), x, max_iter=10, correction=fpsolve.Correction(passes=(11,)))
    with pytest.raises(ValueError, match="max_iter"):
        fpsolve.DEQ(block, max_iter=10, correction=fpsolve.Correction(passes=(11,)))
    with pytest.raises(TypeError, match="correction"):
        fpsolve.solve(block, torch.zeros_like(x), x, correction=(2, 4))


def test_the_training_example_runs_with_correction(tmp_path) -> None:
    """examples/train_deq.py --correction: one epoch, each mode without and with correction."""
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    import importlib.util
    import pathlib
    import sys
    path = pathlib.Path(__file__).parents[1] / "examples" / "train_deq.py"
    spec = importlib.util.spec_from_file_location("train_deq_example_corr", path)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example          # (its dataclasses look their module up)
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(example)
        out = example.main(["--modes", "phantom", "--epochs", "1", "--figure", "", "--no-progress",
                            "--correction", "--correction-passes", "2,4"])
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop(spec.name, None)
    assert set(out) == {"phantom", "phantom+correction"}
    h = out["phantom+correction"]
    assert h.test_acc[-1] > 0.6 and h.fwd_iters[-1] > 1
    assert h.loss[-1] > out["phantom"].loss[-1]   # (the loss carries the extra correction terms)
