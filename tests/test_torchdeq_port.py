"""Porting a torchdeq model (issue 20, item 6): the Jacobian penalty on torchdeq's scale, an
evaluation budget, loading a torchdeq checkpoint, and the facts docs/torchdeq.md states
(Broyden's evaluation count, the phantom gradient's returned value)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fpsolve

torchdeq = pytest.importorskip("torchdeq")
from torchdeq.loss import jac_reg  # noqa: E402
from torchdeq.solver import get_solver  # noqa: E402


class Cell(nn.Module):
    """f(z, x) = tanh(W z + x) with ||W||_2 = q."""

    def __init__(self, width: int, q: float = 0.5, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width, dtype=dtype)
        with torch.no_grad():
            self.lin.weight *= q / torch.linalg.matrix_norm(self.lin.weight, ord=2)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z) + x)


# ---- 1. jacobian_penalty(normalize=True) is torchdeq's jac_reg ---------------------------------

@pytest.mark.parametrize("shape", [(4, 6), (3, 2, 3, 3)])
def test_normalized_penalty_is_jac_reg_with_the_same_probes(one_thread, shape):
    """Same seed, same probes (float32: both draw randn of z's shape): the batch mean of the
    normalised estimate is jac_reg's value, and its gradient to the parameters too."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 3, padding=1) if len(shape) == 4 else nn.Linear(6, 6)
    f = lambda z, x: torch.tanh(conv(z) + x)  # noqa: E731
    z, x = torch.randn(shape), torch.randn(shape)

    torch.manual_seed(7)
    ours = fpsolve.jacobian_penalty(f, z, x, samples=3, normalize=True)
    torch.manual_seed(7)
    zz = z.clone().requires_grad_()
    theirs = jac_reg(f(zz, x), zz, vecs=3)
    torch.testing.assert_close(ours.mean(), theirs.reshape(()), rtol=1e-5, atol=0)
    g_ours = torch.autograd.grad(ours.mean(), list(conv.parameters()))
    g_theirs = torch.autograd.grad(theirs, list(conv.parameters()))
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)

    # the unnormalised default is n times larger, n = the state size per sample
    torch.manual_seed(7)
    raw = fpsolve.jacobian_penalty(f, z, x, samples=3)
    n = z[0].numel()
    torch.testing.assert_close(raw, ours * n, rtol=1e-5, atol=0)


def test_normalized_penalty_expectation_is_frobenius_over_state_size(one_thread):
    """Many probes: E = ||J||_F^2 / n per sample (exact Jacobian by autograd), a tuple state's
    n counting every part."""
    torch.manual_seed(1)
    A = torch.randn(5, 5, dtype=torch.float64) * 0.3
    B = torch.randn(2, 5, dtype=torch.float64) * 0.3
    f = lambda z: (torch.tanh(z[0] @ A.T + z[1] @ B), z[1] * 0.5)  # noqa: E731
    z = (torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))
    est = fpsolve.jacobian_penalty(f, z, samples=4000, normalize=True)
    exact = []
    for i in range(3):
        flat = lambda v: torch.cat([t.reshape(-1) for t in f((v[:5][None], v[5:][None]))])  # noqa: E731
        J = torch.autograd.functional.jacobian(flat, torch.cat([z[0][i], z[1][i]]))
        exact.append(J.pow(2).sum() / 7)
    torch.testing.assert_close(est, torch.stack(exact), rtol=0.06, atol=0)


def test_deq_jacobian_normalize_option(one_thread):
    torch.manual_seed(2)
    cell = Cell(6)
    x = torch.randn(5, 6)
    raw = fpsolve.DEQ(cell, jacobian_penalty=2)
    norm = fpsolve.DEQ(cell, jacobian_penalty=2, jacobian_normalize=True)
    torch.manual_seed(3)
    _, s_raw = raw(x)
    torch.manual_seed(3)
    _, s_norm = norm(x)
    torch.testing.assert_close(s_norm.jacobian_penalty * 6, s_raw.jacobian_penalty, rtol=1e-5, atol=0)
    assert "jacobian_normalize=True" in repr(norm) and "jacobian_normalize" not in repr(raw)
    with pytest.raises(TypeError, match="jacobian_normalize"):
        fpsolve.DEQ(cell, jacobian_penalty=1, jacobian_normalize="yes")
    with pytest.raises(TypeError, match="normalize"):
        fpsolve.jacobian_penalty(cell, torch.zeros(2, 6), torch.zeros(2, 6), normalize=1)


# ---- 6. DEQ(eval_max_iter=...) ---------------------------------------------------------------

def test_eval_max_iter_is_the_budget_in_eval_mode_only(one_thread):
    torch.manual_seed(4)
    cell = Cell(6, q=0.9)
    x = torch.randn(3, 6)
    layer = fpsolve.DEQ(cell, solver="fixed_point", atol=1e-12, rtol=0.0, max_iter=7, eval_max_iter=3)
    _, sol = layer(x)
    assert sol.iterations.tolist() == [7, 7, 7]
    layer.eval()
    with torch.no_grad():
        _, sol = layer(x)
    assert sol.iterations.tolist() == [3, 3, 3]
    layer.train()
    _, sol = layer(x)
    assert sol.iterations.tolist() == [7, 7, 7]
    assert layer.eval_settings.max_iter == 3 and layer.settings.max_iter == 7
    assert layer.options["max_iter"] == 7 and "eval_max_iter=3" in repr(layer)
    # default: the same budget in both modes
    plain = fpsolve.DEQ(cell, max_iter=7)
    assert plain.eval_settings is plain.settings and "eval_max_iter" not in repr(plain)


def test_eval_max_iter_is_validated_like_max_iter():
    f = lambda z, x: 0.5 * z + x  # noqa: E731
    with pytest.raises(ValueError, match="eval_max_iter=2: min_iter=3"):
        fpsolve.DEQ(f, min_iter=3, eval_max_iter=2)
    with pytest.raises(ValueError, match="eval_max_iter must be an integer >= 1"):
        fpsolve.DEQ(f, eval_max_iter=0)
    with pytest.raises(TypeError, match="eval_max_iter"):
        fpsolve.DEQ(f, eval_max_iter=2.5)


# ---- 5. loading a torchdeq checkpoint ---------------------------------------------------------

class Block(nn.Module):
    """A block with a submodule, a buffer (BatchNorm's running statistics) and parameters."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.cell = Cell(width, q=0.5)
        self.norm = nn.LayerNorm(width)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.cell(z, x))


class TorchDEQModel(nn.Module):
    """As torchdeq's model zoo writes one: the block `func`, a stateless `get_deq` layer."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, width)
        self.func = Block(width)
        self.deq = torchdeq.get_deq(f_solver="anderson", f_max_iter=80, f_tol=1e-7, f_stop_mode="abs")
        self.head = nn.Linear(width, 2)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        x = self.encoder(u)
        z, _ = self.deq(lambda z: self.func(z, x), torch.zeros_like(x))
        return self.head(z[-1])


class PortedModel(nn.Module):
    """The port: the same attributes, the block also handed to fpsolve.DEQ (registered twice)."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, width)
        self.func = Block(width)
        self.deq = fpsolve.DEQ(self.func, atol=1e-7, rtol=0.0, max_iter=80)
        self.head = nn.Linear(width, 2)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        z, _ = self.deq(self.encoder(u))
        return self.head(z)


def test_a_torchdeq_checkpoint_loads_strictly_into_the_port(one_thread, tmp_path):
    torch.manual_seed(5)
    theirs = TorchDEQModel().eval()
    torch.save(theirs.state_dict(), tmp_path / "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt")

    torch.manual_seed(6)
    ours = PortedModel().eval()
    n_block = len(ours.func.state_dict())
    assert len(checkpoint) + n_block == len(ours.state_dict())     # the block's keys, twice
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*deq\.block\."):
        ours.load_state_dict(checkpoint)
    result = ours.load_state_dict(fpsolve.DEQ.adapt_state_dict(ours, checkpoint))
    assert not result.missing_keys and not result.unexpected_keys
    assert len(checkpoint) == len(theirs.state_dict())             # the checkpoint is left as it was
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    u = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(ours(u), theirs(u), rtol=0, atol=1e-5)

    # the other way: a checkpoint of the port loads into the torchdeq model (unexpected keys
    # are the port's second copy), and a port's own checkpoint round-trips with adapt too
    mine = ours.state_dict()
    back = TorchDEQModel()
    back.load_state_dict({k: v for k, v in mine.items() if not k.startswith("deq.")})
    again = PortedModel()
    again.load_state_dict(fpsolve.DEQ.adapt_state_dict(again, mine))
    only_deq = {k: v for k, v in mine.items() if not k.startswith("func.")}   # saved with the DEQ's copy only
    again = PortedModel()
    again.load_state_dict(fpsolve.DEQ.adapt_state_dict(again, only_deq))
    assert torch.equal(again.func.cell.lin.weight, theirs.func.cell.lin.weight)


def test_adapt_state_dict_leaves_other_problems_to_strict_loading():
    model = PortedModel()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("deq.")}
    del sd["head.bias"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as err:
        model.load_state_dict(fpsolve.DEQ.adapt_state_dict(model, sd))
    text = str(err.value)
    assert "head.bias" in text and "extra.weight" in text and "deq.block" not in text
    # a DEQ over a function, or a block registered once: nothing to fill
    lone = nn.Module()
    lone.deq = fpsolve.DEQ(lambda z, x: 0.5 * z + x)
    lone.other = fpsolve.DEQ(nn.Linear(2, 2))
    sd = {"other.block.weight": torch.zeros(2, 2), "other.block.bias": torch.zeros(2)}
    assert fpsolve.DEQ.adapt_state_dict(lone, sd) == sd


# ---- 3. and 2.: facts the page states ------------------------------------------------------

@pytest.mark.parametrize(("name", "extra"), [("broyden", 1), ("anderson", 0), ("fixed_point_iter", 0)])
def test_torchdeq_solver_evaluations(one_thread, name, extra):
    """torchdeq's Broyden evaluates f once before its loop: f_max_iter + 1 calls."""
    torch.manual_seed(0)
    cell = Cell(6, q=0.95, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    for max_iter in (5, 12):
        calls = []
        f = lambda z: calls.append(1) or cell(z, x)  # noqa: E731
        with torch.no_grad():
            get_solver(name)(f, torch.zeros(3, 6, dtype=torch.float64), max_iter=max_iter, tol=1e-30,
                             stop_mode="abs")
        assert len(calls) == max_iter + extra
