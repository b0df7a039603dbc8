"""Norm control: bound the weights of a block's Linear/Conv layers so the block stays contractive.

If every nonlinearity on z's path is 1-Lipschitz (tanh, ReLU, GELU is not quite) and z enters
the block only through the bounded layers, then ‖∂f/∂z‖₂ ≤ the product of their bounds: below 1,
f is a contraction and has one fixed point, whatever the optimiser does to the raw weights.
Each helper registers `torch.nn.utils.parametrize` parametrisations on every layer's `weight`:

- `spectral_bound`: W → b · W / σ(W), σ the largest singular value (PyTorch's `spectral_norm`
  power iteration, or an exact SVD with `power_iterations=None`);
- `frobenius_bound`: W → b · W / ‖W‖_F, an exact bound (σ ≤ ‖W‖_F) that costs one norm.

b is fixed, or learned (`learned=True`): b = max_bound · sigmoid(s), s a parameter, so the
bound never leaves (0, max_bound). `DEQ` computes parametrisations once per forward.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Type

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from ._checks import as_bool, as_float, as_int

#: The layers whose `weight` is bounded by default.
LAYERS: Tuple[Type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Bound(nn.Module):
    """The last parametrisation of a bounded weight: W → b · W, b fixed or learned."""

    def __init__(self, bound: float, learned: bool, max_bound: float) -> None:
        super().__init__()
        self.max_bound = max_bound
        if learned:   # b = max_bound * sigmoid(s), starting at `bound`
            self.s = nn.Parameter(torch.tensor(math.log(bound / (max_bound - bound))))
        else:
            self.register_buffer("b", torch.tensor(float(bound)))

    def value(self) -> Tensor:
        """The current bound b (differentiable when learned)."""
        s = getattr(self, "s", None)
        return self.b if s is None else self.max_bound * torch.sigmoid(s)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.value().to(weight.dtype)


class _Normalize(nn.Module):
    """W → W / ‖W‖: Frobenius, or the exact largest singular value of W as a matrix [out, -1]."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, weight: Tensor) -> Tensor:
        if self.kind == "frobenius":
            norm = torch.linalg.vector_norm(weight)
        else:
            norm = torch.linalg.matrix_norm(weight.flatten(1), ord=2)
        return weight / norm.clamp_min(torch.finfo(weight.dtype).tiny)


def spectral_bound(block: nn.Module, bound: float = 0.9, *, learned: bool = False,
                   max_bound: float = 1.0, power_iterations: Optional[int] = 1,
                   layers: Tuple[Type[nn.Module], ...] = LAYERS) -> nn.Module:
    """Bound the spectral norm of every `layers` weight in `block` (itself included) by b.

    Registers the parametrisation W → b · W / σ(W) on each weight (in place), so the bound
    holds whatever the optimiser does to the raw weight (`layer.parametrizations.weight.original`).
    A conv weight is bounded as the matrix [out, in·taps]: the convolution's own norm can
    exceed that by up to √taps.

    Args:
        block: The module whose layers are bounded (itself included).
        bound: b, a finite number > 0 (the starting value when learned).
        learned: b = max_bound · sigmoid(s) with s a parameter, so b stays in (0, max_bound).
        max_bound: The ceiling of a learned b (a finite number > 0, above `bound`).
        power_iterations: k: σ from PyTorch's `spectral_norm` (k power-iteration steps per
            training forward; cheap, but an estimate from below, so σ(b W/σ) can exceed b a
            little while the weights move fast). None: σ by an exact SVD (a hard bound; costs
            an SVD of each weight per forward).
        layers: The layer types bounded (default Linear and Conv1d/2d/3d).

    Returns:
        `block` itself, with its layers parametrised.

    Raises:
        TypeError: `block` not an `nn.Module`, or `learned` not a bool.
        ValueError: `bound`/`max_bound` not finite and > 0, `bound >= max_bound` with
            learned=True, no layer of the `layers` types in `block`, or a layer whose weight
            is already parametrised (a bound applied twice).
        ValueError: also `power_iterations` neither None nor a positive integer.

    Example:
        ```python
        layer = fpsolve.spectral_bound(torch.nn.Linear(6, 6), 0.9, power_iterations=None)
        sigma = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)
        assert abs(float(sigma) - 0.9) < 1e-5   # exact with power_iterations=None
        print(fpsolve.lipschitz_bounds(layer))   # {'': 0.9}
        ```
    """
    bound, max_bound = _check(bound, learned, max_bound)
    if power_iterations is not None:
        try:
            power_iterations = as_int("power_iterations", power_iterations)
        except (TypeError, ValueError):
            raise ValueError(f"power_iterations must be a positive integer or None (exact); "
                             f"got {power_iterations!r}.") from None
    for _, layer in _layers(block, layers):
        if power_iterations is None:
            parametrize.register_parametrization(layer, "weight", _Normalize("spectral"))
        else:
            spectral_norm(layer, n_power_iterations=power_iterations)
        parametrize.register_parametrization(layer, "weight", Bound(bound, learned, max_bound))
    return block


def frobenius_bound(block: nn.Module, bound: float = 0.9, *, learned: bool = False,
                    max_bound: float = 1.0, layers: Tuple[Type[nn.Module], ...] = LAYERS) -> nn.Module:
    """Bound every `layers` weight in `block` by W → b · W / ‖W‖_F, so that σ(W) ≤ b exactly.

    It costs one norm per weight, but all singular values share the budget (σ is often well
    below b). The parametrisation is registered in place on each weight.

    Args:
        block: The module whose layers are bounded (itself included).
        bound: b, a finite number > 0 (the starting value when learned).
        learned: b = max_bound · sigmoid(s) with s a parameter, so b stays in (0, max_bound).
        max_bound: The ceiling of a learned b (a finite number > 0, above `bound`).
        layers: The layer types bounded (default Linear and Conv1d/2d/3d).

    Returns:
        `block` itself, with its layers parametrised.

    Raises:
        TypeError: `block` not an `nn.Module`, or `learned` not a bool.
        ValueError: `bound`/`max_bound` not finite and > 0, `bound >= max_bound` with
            learned=True, no layer of the `layers` types in `block`, or a layer whose weight
            is already parametrised (a bound applied twice).

    Example:
        ```python
        block = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
        fpsolve.frobenius_bound(block, 0.5)
        for lin in (block[0], block[2]):
            assert float(torch.linalg.matrix_norm(lin.weight.detach(), ord=2)) <= 0.5 + 1e-6
        ```
    """
    bound, max_bound = _check(bound, learned, max_bound)
    for _, layer in _layers(block, layers):
        parametrize.register_parametrization(layer, "weight", _Normalize("frobenius"))
        parametrize.register_parametrization(layer, "weight", Bound(bound, learned, max_bound))
    return block


def lipschitz_bounds(block: nn.Module) -> Dict[str, float]:
    """The current bound b of every bounded layer in `block`, by name (for a logger).

    Layers bounded by `spectral_bound` or `frobenius_bound`; with learned=True the values
    move as training goes.

    Args:
        block: The module (its own bound is listed under the name "").

    Returns:
        `{module name: b}` as floats; empty when nothing in `block` is bounded.

    Example:
        ```python
        block = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3))
        fpsolve.spectral_bound(block, 0.5, learned=True, max_bound=1.0)
        assert fpsolve.lipschitz_bounds(block) == {"0": 0.5, "2": 0.5}   # learned: moves in training
        ```
    """
    out = {}
    for name, layer in block.named_modules():
        if parametrize.is_parametrized(layer, "weight"):
            last = layer.parametrizations.weight[-1]
            if isinstance(last, Bound):
                out[name] = float(last.value().detach())
    return out


def _check(bound: float, learned: bool, max_bound: float) -> Tuple[float, float]:
    """(bound, max_bound) as plain floats > 0 (numpy scalars accepted); a clear error otherwise."""
    bound = as_float("bound", bound, strict=True)
    max_bound = as_float("max_bound", max_bound, strict=True)
    learned = as_bool("learned", learned)
    if learned and not bound < max_bound:
        raise ValueError(
            f"with learned=True the bound is max_bound * sigmoid(s), so the starting bound must be "
            f"below max_bound; got bound={bound!r}, max_bound={max_bound!r}.")
    return bound, max_bound


def _layers(block: nn.Module, layers: Tuple[Type[nn.Module], ...]) -> list:
    if not isinstance(block, nn.Module):
        raise TypeError(f"block must be an nn.Module; got {type(block).__name__}.")
    found = [(n, m) for n, m in block.named_modules() if isinstance(m, layers)]
    if not found:
        raise ValueError(
            f"block has no layer of the types {[t.__name__ for t in layers]}: nothing to bound "
            f"(pass layers=... to choose the types).")
    for name, layer in found:
        if parametrize.is_parametrized(layer, "weight"):
            raise ValueError(
                f"layer {name or type(layer).__name__!r} already has a parametrisation on its weight "
                f"(a bound applied twice, or spectral_norm by hand); remove it first.")
    return found


__all__ = ["spectral_bound", "frobenius_bound", "lipschitz_bounds", "Bound"]
