"""Anderson acceleration (type II), batched over samples with fixed-shape history buffers.

Walker & Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal. 49
(2011), in the difference form: with ΔG the last m differences of residuals g = f(z) - z and
ΔZ those of iterates, solve the regularised least-squares problem
    γ = argmin ||g - ΔG γ||² + λ s ||γ||²       (s = largest ||Δg_j||², so λ is relative)
and step  z⁺ = z + β g - (ΔZ + β ΔG) γ.
The Gram matrix ΔGᵀΔG is updated one row per step (one bmm against the new column), and the
m×m systems of all active samples are solved in one batched call. Unfilled history slots are
zero: their regularised diagonal makes their coefficient exactly zero, so the shapes never
change and there is no Python branching on how full the history is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._base import State, check_positive


@dataclass(frozen=True)
class Anderson:
    """Anderson acceleration mixing the last `m` iterates.

    `beta`: mixing (damping) factor; `regularization`: λ, relative to the largest squared
    history norm (default 1e-5 in float32, 1e-10 in float64); `max_coefficient`: a step whose
    mixing coefficients exceed this (or are not finite) falls back to a plain damped step for
    that sample only.
    """

    m: int = 5
    beta: float = 1.0
    regularization: Optional[float] = None
    max_coefficient: float = 1e4

    def __post_init__(self) -> None:
        check_positive("Anderson(m=...)", self.m, integer=True)
        check_positive("Anderson(beta=...)", self.beta, at_most=2.0)
        if self.regularization is not None:
            check_positive("Anderson(regularization=...)", self.regularization)
        check_positive("Anderson(max_coefficient=...)", self.max_coefficient)

    def _lambda(self, dtype: torch.dtype) -> float:
        if self.regularization is not None:
            return self.regularization
        return 1e-10 if dtype == torch.float64 else 1e-5

    def init(self, z: Tensor, fz: Tensor, g: Tensor) -> State:
        b, n, m = z.shape[0], z[0].numel(), self.m
        zeros = torch.zeros
        dg_hist = zeros(b, m, n, dtype=z.dtype, device=z.device)
        dz_hist = zeros(b, m, n, dtype=z.dtype, device=z.device)   # columns Δz + β Δg
        gram = zeros(b, m, m, dtype=z.dtype, device=z.device)
        return (dg_hist, dz_hist, gram, g.reshape(b, n), z.reshape(b, n))

    def step(self, state: State, z: Tensor, fz: Tensor, g: Tensor, k: int) -> Tuple[Tensor, State]:
        dg_hist, dz_hist, gram, g_prev, z_prev = state
        b = z.shape[0]
        gf, zf = g.reshape(b, -1), z.reshape(b, -1)
        base = fz if self.beta == 1.0 else z.add(g, alpha=self.beta)
        if k == 0:  # no history yet: a plain (damped) step
            return base, (dg_hist, dz_hist, gram, gf, zf)

        j = (k - 1) % self.m
        dg = gf - g_prev
        dg_hist[:, j] = dg
        dz_hist[:, j] = torch.add(zf - z_prev, dg, alpha=self.beta)
        # New Gram row (column j against all) and the right-hand side ΔGᵀg, in one bmm.
        rows = torch.bmm(torch.stack((dg, gf), dim=1), dg_hist.transpose(1, 2))
        gram[:, j] = rows[:, 0]
        gram[:, :, j] = rows[:, 0]
        scale = gram.diagonal(dim1=1, dim2=2).amax(dim=1)
        ridge = scale.mul_(self._lambda(z.dtype)).add_(torch.finfo(z.dtype).tiny)
        system = gram + ridge[:, None, None] * torch.eye(self.m, dtype=z.dtype, device=z.device)
        gamma = torch.linalg.solve_ex(system, rows[:, 1])[0]
        # Safeguard: an ill-conditioned or non-finite solve becomes a plain step for that sample.
        bad = ~(gamma.abs().amax(dim=1) <= self.max_coefficient)
        gamma = gamma.masked_fill_(bad[:, None], 0.0)
        z_next = torch.baddbmm(base.reshape(b, 1, -1), gamma.unsqueeze(1), dz_hist, alpha=-1.0)
        return z_next.view_as(z), (dg_hist, dz_hist, gram, gf, zf)
