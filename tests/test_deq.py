"""`fpsolve.DEQ`, the nn.Module: parameters, modes, devices, dropout, state_dict, errors, the
Jacobian-norm regulariser, the spectral-norm recipe, agreement with torchdeq, and training.

(DistributedDataParallel has its own file, test_ddp.py: it spawns processes.)
"""
from __future__ import annotations

import io
import math
import pathlib
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import fpsolve

from problems import generator, random_contraction

pytestmark = pytest.mark.usefixtures("one_thread")


F64 = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class Block(nn.Module):
    """z -> tanh(W z + U x + c): the usual DEQ cell (W contractive at initialisation)."""

    def __init__(self, width=8, inputs=None, q=0.7, seed=0, dropout=0.0):
        super().__init__()
        inputs = width if inputs is None else inputs
        self.lin = nn.Linear(width, width)
        self.inj = nn.Linear(inputs, width, bias=False)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        with torch.no_grad():
            self.lin.weight.copy_(random_contraction(1, width, q, seed=seed)[0])

    def forward(self, z, x):
        return torch.tanh(self.drop(self.lin(z)) + self.inj(x))


def _x(B=4, n=8, seed=1, dtype=torch.float32, device="cpu"):
    return torch.randn(B, n, generator=generator(seed), dtype=F64).to(dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------

def test_parameters_are_the_blocks():
    block = Block()
    layer = fpsolve.DEQ(block)
    assert isinstance(layer, nn.Module)
    assert [id(p) for p in layer.parameters()] == [id(p) for p in block.parameters()]
    names = [n for n, _ in layer.named_parameters()]
    assert names == ["block." + n for n, _ in block.named_parameters()]
    assert "anderson" in repr(layer) and "implicit" in repr(layer)


def test_every_parameter_receives_a_gradient():
    layer = fpsolve.DEQ(Block(), rtol=1e-6, max_iter=100)
    z, sol = layer(_x())
    assert sol.converged.all()
    z.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_under_no_grad_nothing_is_recorded_and_the_value_is_the_same():
    layer = fpsolve.DEQ(Block(), rtol=1e-6, max_iter=100)
    x = _x()
    z, sol = layer(x)
    assert z.requires_grad
    with torch.no_grad():
        z_ng, sol_ng = layer(x)
    assert not z_ng.requires_grad
    assert sol_ng.converged.all()
    torch.testing.assert_close(z_ng, z.detach())
    with torch.inference_mode():
        z_inf, _ = layer(x)
    torch.testing.assert_close(z_inf, z.detach())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_device_and_dtype_follow_the_module_and_the_input(device, dtype):
    layer = fpsolve.DEQ(Block(), rtol=1e-5, max_iter=100).to(device=device, dtype=dtype)
    x = _x(dtype=dtype, device=device).requires_grad_()
    z, sol = layer(x)
    assert z.device.type == device and z.dtype == dtype
    assert sol.iterations.device.type == device and sol.status.device.type == device
    z.sum().backward()
    assert x.grad.device.type == device
    assert all(p.grad.device.type == device for p in layer.parameters())
    assert sol.adjoint.converged.all()


def test_no_device_is_hard_coded_in_the_library():
    """torchdeq writes `.cuda()` into library code; fpsolve must never name a device."""
    root = pathlib.Path(fpsolve.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for bad in (".cuda(", "'cuda'", '"cuda"', "'cuda:", '"cuda:'):
            assert bad not in text, f"{path.name} hard-codes a device: {bad}"


def test_z0_defaults_to_zeros_shaped_like_x_and_can_be_given():
    layer = fpsolve.DEQ(Block().double(), rtol=1e-10, max_iter=200, solver="fixed_point")
    x = _x(dtype=F64)
    z_default, sol = layer(x)
    z_given, _ = layer(x, z0=torch.zeros_like(x))
    torch.testing.assert_close(z_default, z_given, rtol=0, atol=0)
    z_warm, sol_warm = layer(x, z0=z_default.detach())     # a warm start halts at once
    assert int(sol_warm.iterations.max()) <= 2 < int(sol.iterations.min())


@pytest.mark.parametrize("x", [
    (torch.zeros(4, 8), torch.zeros(4, 8)),
    [torch.zeros(4, 8)],
    {"tokens": torch.zeros(4, 8)},
], ids=["tuple", "list", "dict"])
def test_clear_error_when_z0_cannot_be_inferred_from_a_container(x):
    layer = fpsolve.DEQ(lambda z, x: z)
    with pytest.raises(ValueError, match=r"z0.*torch\.zeros|pass z0"):
        layer(x)


def test_clear_error_when_the_block_returns_another_width_than_x():
    """z0 = zeros_like(x) is accepted by the block but it returns a wider state."""
    layer = fpsolve.DEQ(lambda z, x: torch.cat([torch.tanh(z), x], dim=1))
    with pytest.raises(ValueError, match="pass z0"):
        layer(torch.zeros(4, 3))


def test_clear_error_when_x_has_another_width_than_the_state():
    """The usual DEQ cell, state width 8, input width 3: zeros shaped like x cannot even enter
    the block (its Linear(8, 8) rejects a width-3 state). The API promises a clear error that
    says to pass z0, not the block's own shape error."""
    layer = fpsolve.DEQ(Block(width=8, inputs=3))
    z, sol = layer(torch.zeros(4, 3), z0=torch.zeros(4, 8))     # with z0 it works
    assert z.shape == (4, 8)
    with pytest.raises(ValueError, match="pass z0"):
        layer(torch.zeros(4, 3))


def test_unknown_options_are_errors_at_construction():
    with pytest.raises(ValueError, match="solver"):
        fpsolve.DEQ(Block(), solver="newton")
    with pytest.raises(ValueError, match="backward"):
        fpsolve.DEQ(Block(), backward="adjoint")
    with pytest.raises(TypeError):
        fpsolve.DEQ(Block(), tol=1e-3)       # not an option: never silently ignored
    with pytest.raises(TypeError, match="block"):
        fpsolve.DEQ(3)


# --------------------------------------------------------------------------------------------
# dropout, state_dict
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backward", ["implicit", "phantom", "unroll"])
def test_dropout_inside_the_block_runs_and_gives_finite_gradients(backward):
    """nn.Dropout draws a new mask at every pass, so in train mode f is stochastic and the
    solve may not settle (the caveat in docs/training.md). It must still run, report its
    status honestly, and give finite gradients; in eval mode it is the deterministic block."""
    torch.manual_seed(0)
    layer = fpsolve.DEQ(Block(dropout=0.2), backward=backward, rtol=1e-4, max_iter=30)
    x = _x(B=16)
    layer.train()
    z, sol = layer(x)
    assert torch.isfinite(z).all()
    assert set(sol.status.tolist()) <= {int(fpsolve.Status.CONVERGED), int(fpsolve.Status.MAX_ITER)}
    z.square().mean().backward()
    for p in layer.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    layer.eval()
    with torch.no_grad():
        z1, sol1 = layer(x)
        z2, _ = layer(x)
    assert sol1.converged.all()
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)


class MaskedBlock(nn.Module):
    """The docs/training.md recipe: x = (u, mask), the mask drawn once per forward outside f."""

    def __init__(self, width=8):
        super().__init__()
        self.lin = nn.Linear(width, width)
        with torch.no_grad():
            self.lin.weight.copy_(random_contraction(1, width, 0.7, seed=0)[0])

    def forward(self, z, x):
        u, mask = x
        return torch.tanh(mask * self.lin(z) + u)


def test_a_dropout_mask_passed_in_x_keeps_f_deterministic():
    """A mask drawn once per forward and passed in x travels with its rows under per-sample
    halting, so f is one deterministic map: the solve converges and the implicit gradient is
    exact for that mask."""
    torch.manual_seed(0)
    block = MaskedBlock().double()
    layer = fpsolve.DEQ(block, rtol=1e-10, max_iter=200)
    u = _x(B=16, dtype=F64).requires_grad_()
    mask = nn.functional.dropout(torch.ones_like(u), p=0.3, training=True)
    z, sol = layer((u, mask), z0=torch.zeros_like(u))
    assert sol.converged.all() and len(set(sol.iterations.tolist())) > 1
    (gu,) = torch.autograd.grad(z.sin().sum(), u)
    # the same mask with the whole batch solved together (halting="batch") gives the same
    z_b, _ = fpsolve.DEQ(block, rtol=1e-10, max_iter=200, halting="batch")((u, mask), z0=torch.zeros_like(u))
    (gu_b,) = torch.autograd.grad(z_b.sin().sum(), u)
    torch.testing.assert_close(gu, gu_b, rtol=1e-8, atol=1e-10)


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("spectral", [False, True])
def test_state_dict_round_trip(spectral):
    def make(seed):
        torch.manual_seed(seed)
        block = Block(seed=seed)
        if spectral:
            spectral_norm(block.lin)
        return fpsolve.DEQ(block, rtol=1e-8, max_iter=200)

    a, b = make(0), make(1)
    x = _x()
    a.train()
    a(x)                                  # a training forward moves spectral_norm's u, v
    state = _roundtrip(a.state_dict())
    assert set(state) == set(b.state_dict())
    assert all(k.startswith("block.") for k in state)
    b.load_state_dict(state)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(x)[0], a(x)[0], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# regularisers: the Jacobian penalty and spectral normalisation
# --------------------------------------------------------------------------------------------

def test_jacobian_penalty_estimates_the_frobenius_norm():
    """For a linear block the Jacobian is W everywhere: E ||vᵀ W||² = ||W||_F²."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 6, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(random_contraction(1, 6, 0.8, seed=3)[0])
    f = lambda z, x: lin(z) + x  # noqa: E731
    x = _x(B=3, n=6, dtype=F64)
    pen = fpsolve.jacobian_penalty(f, torch.zeros(3, 6, dtype=F64), x, samples=4000)
    want = lin.weight.detach().square().sum()
    assert pen.shape == (3,)
    torch.testing.assert_close(pen, want.expand(3), rtol=0.1, atol=0)
    with pytest.raises(ValueError, match="samples"):
        fpsolve.jacobian_penalty(f, torch.zeros(3, 6, dtype=F64), x, samples=0)


def test_deq_jacobian_penalty_is_differentiable_and_trains_the_jacobian_down():
    torch.manual_seed(0)
    block = Block(width=8, q=0.9)
    layer = fpsolve.DEQ(block, jacobian_penalty=2, rtol=1e-5, max_iter=60)
    x = _x(B=32)
    z, sol = layer(x)
    assert sol.jacobian_penalty.shape == (32,) and sol.jacobian_penalty.requires_grad
    with torch.no_grad():
        assert layer(x)[1].jacobian_penalty is None       # not computed when it cannot be used
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    start = float(sol.jacobian_penalty.detach().mean())
    for _ in range(30):
        _, sol = layer(x)
        opt.zero_grad()
        sol.jacobian_penalty.mean().backward()
        opt.step()
    assert float(sol.jacobian_penalty.detach().mean()) < 0.5 * start
    with pytest.raises(ValueError, match="jacobian_penalty"):
        fpsolve.DEQ(block, jacobian_penalty=-1)


class SpectralBlock(nn.Module):
    """The documented recipe: spectral_norm keeps ||W||_2 at 1; a gain below 1 makes the block a
    contraction (tanh is 1-Lipschitz), whatever the optimiser does to the raw weight."""

    def __init__(self, width=8, gain=0.9):
        super().__init__()
        self.lin = spectral_norm(nn.Linear(width, width))
        self.inj = nn.Linear(width, width)
        self.gain = gain

    def forward(self, z, x):
        return torch.tanh(self.gain * self.lin(z) + self.inj(x))


def test_spectral_norm_recipe_keeps_the_block_contractive_while_training():
    torch.manual_seed(0)
    block = SpectralBlock()
    layer = fpsolve.DEQ(block, rtol=1e-5, max_iter=80)
    x = _x(B=32)
    target = torch.randn(32, 8)
    opt = torch.optim.Adam(layer.parameters(), lr=0.2)       # large steps on the raw weight
    for _ in range(15):
        z, sol = layer(x)
        assert sol.converged.all()
        loss = (z - target).square().mean()
        opt.zero_grad()
        loss.backward()
        raw = block.lin.parametrizations.weight.original
        assert raw.grad is not None and raw.grad.abs().sum() > 0   # reaches the raw weight
        opt.step()
    with torch.no_grad():
        sigma = torch.linalg.matrix_norm(block.lin.weight, ord=2)
        raw_sigma = torch.linalg.matrix_norm(block.lin.parametrizations.weight.original, ord=2)
    assert sigma < 1.05 and raw_sigma > 1.2, (sigma, raw_sigma)


def test_spectral_norm_weight_is_computed_once_per_forward():
    """Under DEQ the parametrisation is cached: f is the same map at every pass."""
    block = SpectralBlock()
    calls = []
    block.lin.parametrizations.weight[0].register_forward_hook(lambda *a: calls.append(1))
    layer = fpsolve.DEQ(block, rtol=1e-6, max_iter=50, solver="fixed_point")
    z, sol = layer(_x())
    assert int(sol.iterations.max()) > 5
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------
# agreement with torchdeq, and training
# --------------------------------------------------------------------------------------------

def test_gradients_agree_with_torchdeq_ift():
    """A contractive block solved tightly by both: the implicit gradients must coincide."""
    torchdeq = pytest.importorskip("torchdeq")
    torch.manual_seed(0)
    block = Block(width=6, q=0.8).double()
    x = _x(B=5, n=6, dtype=F64).requires_grad_()
    target = torch.randn(5, 6, dtype=F64)
    params = [x] + list(block.parameters())

    layer = fpsolve.DEQ(block, solver="anderson", rtol=1e-12, max_iter=300)
    z, sol = layer(x)
    assert sol.converged.all()
    ours = torch.autograd.grad((z - target).square().sum(), params)

    deq = torchdeq.get_deq(core="sliced", ift=True, f_solver="fixed_point_iter", f_max_iter=500,
                           f_tol=1e-13, f_stop_mode="abs", b_solver="fixed_point_iter",
                           b_max_iter=500, b_tol=1e-13, b_stop_mode="abs")
    deq.train()
    z_out, _ = deq(lambda z: block(z, x), torch.zeros(5, 6, dtype=F64))
    theirs = torch.autograd.grad((z_out[-1] - target).square().sum(), params)
    torch.testing.assert_close(z.detach(), z_out[-1].detach(), rtol=1e-10, atol=1e-11)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


class Regressor(nn.Module):
    def __init__(self, backward):
        super().__init__()
        self.enc = nn.Linear(4, 16)
        self.deq = fpsolve.DEQ(Block(width=16, q=0.5), backward=backward, rtol=1e-4, max_iter=40)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        z, sol = self.deq(self.enc(x))
        return self.head(z).squeeze(-1), sol


@pytest.mark.parametrize("backward", ["implicit", fpsolve.Phantom(steps=3, damping=0.8)], ids=str)
def test_a_short_training_run_lowers_the_loss(backward):
    """Full-batch Adam on a small nonlinear regression (deterministic)."""
    torch.manual_seed(0)
    x = torch.randn(128, 4)
    y = torch.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2]
    model = Regressor(backward)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(80):
        pred, sol = model(x)
        loss = (pred - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert sol.converged.float().mean() > 0.9
    with torch.no_grad():
        final = float((model(x)[0] - y).square().mean())
    assert math.isfinite(final)
    assert final < 0.5 * losses[0], (losses[0], final)


def test_the_training_example_runs(tmp_path):
    """examples/train_deq.py, one epoch of one mode (the docs' figures come from its full run)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    import importlib.util
    path = pathlib.Path(__file__).parents[1] / "examples" / "train_deq.py"
    spec = importlib.util.spec_from_file_location("train_deq_example", path)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example          # (its dataclasses look their module up)
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(example)
        out = example.main(["--modes", "implicit", "--epochs", "1", "--figure", "", "--no-progress",
                            "--json", str(tmp_path / "h.json")])
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop(spec.name, None)
    h = out["implicit"]
    assert h.test_acc[-1] > 0.6 and h.fwd_iters[-1] > 1 and h.bwd_iters[-1] > 1
    assert h.adjoint_not_converged == 0 and (tmp_path / "h.json").exists()
