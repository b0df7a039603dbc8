"""Problems with known answers, shared by the test files.

Every map treats samples independently: per-sample data (matrices, offsets) travels in `x`,
never in a closure, because with halting="sample" f only receives the rows still active.
Tensors shared by every sample (a weight matrix) may be closed over.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from scipy import optimize

SOLVERS = ("fixed_point", "anderson", "broyden")

#: The fixed point of cos: the Dottie number.
COS_FIXED_POINT = 0.7390851332151607


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_contraction(B: int, n: int, q: float, *, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """B random n x n matrices, each with spectral norm exactly q."""
    A = torch.randn(B, n, n, dtype=torch.float64, generator=generator(seed))
    A = A * (q / torch.linalg.matrix_norm(A, ord=2))[:, None, None]
    return A.to(dtype)


def linear_map(z: torch.Tensor, x: Any) -> torch.Tensor:
    """z -> A z + b per sample, with x = (A [B, n, n], b [B, n])."""
    A, b = x
    return torch.bmm(A, z.unsqueeze(-1)).squeeze(-1) + b


def linear_answer(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The fixed point of z -> A z + b: (I - A) z = b, computed in float64."""
    n = A.shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    return torch.linalg.solve(eye - A.double(), b.double().unsqueeze(-1)).squeeze(-1)


def affine_answer(f_flat: Callable[[torch.Tensor], torch.Tensor], n: int) -> torch.Tensor:
    """Fixed point of an affine map of one flat vector [n] -> [n] (built column by column)."""
    zero = torch.zeros(n, dtype=torch.float64)
    c = f_flat(zero)
    M = torch.stack([f_flat(e) - c for e in torch.eye(n, dtype=torch.float64)], dim=1)
    return torch.linalg.solve(torch.eye(n, dtype=torch.float64) - M, c)


def tanh_weight(n: int, q: float = 0.8, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    """A weight matrix shared by every sample (may be closed over), spectral norm q."""
    return random_contraction(1, n, q, seed=seed)[0].to(dtype)


def tanh_answer_scipy(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per sample, the root of tanh(W z + x) - z found by scipy.optimize.root (float64)."""
    Wn = W.double().numpy()
    out = []
    for xi in x.double().numpy():
        g = lambda z: np.tanh(Wn @ z + xi) - z  # noqa: E731
        r = optimize.root(g, np.zeros_like(xi), tol=1e-12)
        assert np.abs(g(r.x)).max() < 1e-13, r.message
        out.append(r.x)
    return torch.tensor(np.array(out), dtype=torch.float64)


def mean_hw_map(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W]: z -> 0.5 * (per-channel spatial mean of z) + x. Fixed point: x + mean_hw(x)."""
    return 0.5 * z.mean(dim=(2, 3), keepdim=True) + x


def mean_hw_answer(x: torch.Tensor) -> torch.Tensor:
    return x.double() + x.double().mean(dim=(2, 3), keepdim=True)


@dataclass
class Problem:
    """A batch problem with its known answer and a contraction factor q (Lipschitz in l2)."""

    name: str
    f: Callable[..., Any]
    z0: torch.Tensor
    x: Any
    answer: torch.Tensor   # float64
    q: float


def linear_problem(B=4, n=5, q=0.9, dtype=torch.float64, seed=0) -> Problem:
    A = random_contraction(B, n, q, seed=seed)
    b = torch.randn(B, n, dtype=torch.float64, generator=generator(seed + 100))
    return Problem("linear", linear_map, torch.zeros(B, n, dtype=dtype), (A.to(dtype), b.to(dtype)),
                   linear_answer(A, b), q)


def cos_problem(B=3, dtype=torch.float64) -> Problem:
    # state of shape [B]; z -> cos(z) is a contraction on [0, 1] with factor sin(1)
    z0 = torch.linspace(0.0, 1.0, B, dtype=dtype)
    return Problem("cos", lambda z: torch.cos(z), z0, None,
                   torch.full((B,), COS_FIXED_POINT, dtype=torch.float64), math.sin(1.0))


def tanh_problem(B=4, n=6, q=0.8, dtype=torch.float64, seed=3) -> Problem:
    W = tanh_weight(n, q, seed=seed, dtype=dtype)
    x = torch.randn(B, n, dtype=torch.float64, generator=generator(seed + 7))
    return Problem("tanh", lambda z, x: torch.tanh(z @ W.T + x), torch.zeros(B, n, dtype=dtype),
                   x.to(dtype), tanh_answer_scipy(W, x), q)


def mean_hw_problem(B=3, C=2, H=4, W=5, dtype=torch.float64, seed=5) -> Problem:
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=generator(seed))
    return Problem("mean_hw", mean_hw_map, torch.zeros(B, C, H, W, dtype=dtype), x.to(dtype),
                   mean_hw_answer(x), 0.5)


PROBLEMS = {
    "linear": linear_problem,
    "cos": cos_problem,
    "tanh": tanh_problem,
    "mean_hw": mean_hw_problem,
}


def call(f: Callable[..., Any], z: Any, x: Any) -> Any:
    return f(z) if x is None else f(z, x)


def per_sample_norm(t: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    t = t.double()
    if t.ndim == 1:
        return t.abs()
    dims = tuple(range(1, t.ndim))
    if norm == "inf":
        return t.abs().amax(dim=dims)
    return torch.linalg.vector_norm(t, dim=dims)


def residual_at(f: Callable[..., Any], z: torch.Tensor, x: Any, norm: str = "l2") -> torch.Tensor:
    """||f(z) - z|| per sample, recomputed (float64 result)."""
    with torch.no_grad():
        fz = call(f, z, x)
    return per_sample_norm(fz.double() - z.double(), norm)


def distance(z: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Per-sample l2 distance to the answer."""
    return per_sample_norm(z.double() - answer.double())


class RowCounter:
    """Wrap f, recording the number of rows of every call."""

    def __init__(self, f: Callable[..., Any], with_x: bool = True) -> None:
        self.f, self.with_x, self.rows = f, with_x, []

    def _batch(self, z: Any) -> int:
        return (z[0] if isinstance(z, (tuple, list)) else z).shape[0]

    def __call__(self, z: Any, x: Optional[Any] = None) -> Any:
        self.rows.append(self._batch(z))
        return self.f(z, x) if self.with_x else self.f(z)
