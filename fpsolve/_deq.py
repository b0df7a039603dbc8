"""`DEQ`: an nn.Module that solves its block's fixed point; and a Jacobian-norm penalty."""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._backward import make_backward
from ._solution import Solution
from ._solve import HALTINGS, NORMS, _check_choice, make_solver, solve
from ._tree import StateLayout
from .blocks import SharedDropout


def jacobian_penalty(f: Callable[..., Any], z: Tensor, x: Any = None, samples: int = 1) -> Tensor:
    """Hutchinson estimate of ||∂f/∂z||_F² per sample at z, differentiable (for the loss).

    E_v ||vᵀ J||² with v ~ N(0, I) equals ||J||_F²; `samples` probes are averaged. Penalising
    it keeps the block contractive during training (Bai et al., "Stabilizing Equilibrium
    Models by Jacobian Regularization", ICML 2021). z: the solution (a tensor [B, ...]).
    """
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1; got {samples!r}.")
    zs = z.detach().requires_grad_()
    with torch.enable_grad():
        out = f(zs, x) if x is not None else f(zs)
        total = zs.new_zeros(zs.shape[0])
        dims = tuple(range(1, zs.ndim))
        for _ in range(samples):
            v = torch.randn_like(out)
            (vjp,) = torch.autograd.grad(out, zs, v, create_graph=True, retain_graph=True)
            total = total + vjp.pow(2).sum(dim=dims)
    return total / samples


class DEQ(nn.Module):
    """A deep-equilibrium layer: `z, sol = layer(x, z0=None)` solves z = block(z, x).

    `block`'s parameters are this module's parameters. Options are those of `fpsolve.solve`.
    With `jacobian_penalty=k` (k probes), `sol.jacobian_penalty` holds the per-sample
    Hutchinson estimate of ||∂f/∂z||_F² at the solution, to add to the loss in training.
    """

    #: The last forward's Solution, detached (safe to keep and to deepcopy); its `adjoint` is
    #: set when that forward's implicit backward runs. `layer.last_solution.stats()` after
    #: `loss.backward()` is one row for a logger.
    last_solution: Optional[Solution] = None

    def __init__(
        self,
        block: Union[nn.Module, Callable[..., Any]],
        *,
        solver: Any = "anderson",
        backward: Any = "implicit",
        atol: float = 0.0,
        rtol: float = 1e-4,
        max_iter: int = 30,
        halting: str = "sample",
        norm: str = "l2",
        record: bool = False,
        jacobian_penalty: int = 0,
    ) -> None:
        super().__init__()
        if not callable(block):
            raise TypeError(f"block must be an nn.Module or a function f(z, x); got {type(block).__name__}.")
        self.block = block
        make_solver(solver)           # validate now, not at the first forward
        make_backward(backward)
        _check_choice("halting", halting, HALTINGS)
        _check_choice("norm", norm, NORMS)
        if isinstance(jacobian_penalty, bool) or not isinstance(jacobian_penalty, int) or jacobian_penalty < 0:
            raise ValueError(f"jacobian_penalty must be an integer >= 0 (probes); got {jacobian_penalty!r}.")
        self.options = dict(solver=solver, backward=backward, atol=atol, rtol=rtol,
                            max_iter=max_iter, halting=halting, norm=norm, record=record)
        self.jacobian_penalty = jacobian_penalty

    def forward(self, x: Any, z0: Any = None) -> Tuple[Any, Solution]:
        for m in self.modules():          # SharedDropout: one mask per forward, every pass
            if isinstance(m, SharedDropout):
                m.reset()
        inferred = z0 is None
        if inferred:
            if not isinstance(x, Tensor):
                raise ValueError(
                    f"DEQ: x is a {type(x).__name__}, so the state's shape cannot be inferred; "
                    f"pass z0 (e.g. layer(x, z0=torch.zeros(B, width)))."
                )
            z0 = torch.zeros_like(x)
        try:
            # Parametrizations (spectral_norm, ...) are computed once per forward, so f is the
            # same map at every pass (and cheaper); the graph still reaches the originals.
            with parametrize.cached():
                sol = solve(self.block, z0, x, **self.options)
        except Exception as err:
            # With z0 inferred, a block that fails on its first call (or returns another shape)
            # with zeros shaped like x almost always means the state has another width.
            if inferred and getattr(err, "_fpsolve_at_start", False):
                raise ValueError(
                    f"DEQ: z0 defaulted to zeros shaped like x {tuple(x.shape)}, and the block "
                    f"failed on it or returned another shape; pass z0 shaped like the state "
                    f"(layer(x, z0=...)). The block said: {err}"
                ) from err
            raise
        if self.jacobian_penalty and torch.is_grad_enabled():
            state = StateLayout(sol.z)
            if state.container is not None:
                raise ValueError("DEQ(jacobian_penalty=...) supports a single-tensor state.")
            sol.jacobian_penalty = jacobian_penalty(self.block, sol.z, x, self.jacobian_penalty)
        self.last_solution = sol.detached()
        return sol.z, sol

    def extra_repr(self) -> str:
        o = self.options
        return (f"solver={o['solver']!r}, backward={o['backward']!r}, rtol={o['rtol']}, "
                f"max_iter={o['max_iter']}, halting={o['halting']!r}")
