"""Anderson acceleration (type II), batched over samples with fixed-shape history buffers.

Walker & Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal. 49
(2011), in the difference form: with ΔG the last m differences of residuals g = f(z) - z and
ΔZ those of iterates, solve the regularised least-squares problem
    γ = argmin ||g - ΔG γ||² + λ Σ_j ||Δg_j||² γ_j²     (a ridge relative to each column)
and step  z⁺ = z + β g - (ΔZ + β ΔG) γ.
The Gram matrix ΔGᵀΔG is updated one row per step (one bmm against the new column), and the
small systems of all active samples are solved in one batched call over the filled slots.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._base import State, check_positive, flat, write_slot


@dataclass(frozen=True)
class Anderson:
    """Anderson acceleration mixing the last `m` iterates.

    `beta`: mixing (damping) factor; `regularization`: λ, relative to each history column's
    squared norm (default 1e-5 in float32, 1e-10 in float64). A sample whose small system
    cannot be solved gets a plain damped step; the others are unaffected.
    """

    m: int = 5
    beta: float = 1.0
    regularization: Optional[float] = None

    def __post_init__(self) -> None:
        check_positive("Anderson(m=...)", self.m, integer=True)
        check_positive("Anderson(beta=...)", self.beta, at_most=2.0)
        if self.regularization is not None:
            check_positive("Anderson(regularization=...)", self.regularization)

    def _lambda(self, dtype: torch.dtype) -> float:
        if self.regularization is not None:
            return self.regularization
        return 1e-10 if dtype == torch.float64 else 1e-5

    def init(self, z: Tensor, fz: Tensor, g: Tensor) -> State:
        b, n, m = z.shape[0], z[0].numel(), self.m
        dg_hist = z.new_empty(b, m, n)   # slots [:filled] are valid; the rest is never read
        dz_hist = z.new_empty(b, m, n)   # columns Δz + β Δg
        system = z.new_zeros(b, m, m)    # ΔGᵀΔG with its ridge on the diagonal
        return (dg_hist, dz_hist, system, flat(g), flat(self._anchor(z, fz)))

    def _anchor(self, z: Tensor, fz: Tensor) -> Tensor:
        """The vector whose differences form the ΔZ + βΔG columns: f(z) itself when β = 1."""
        return fz if self.beta == 1.0 else z

    def step(self, state: State, z: Tensor, fz: Tensor, g: Tensor, k: int) -> Tuple[Tensor, State]:
        dg_hist, dz_hist, system, g_prev, a_prev = state
        gf, af = flat(g), flat(self._anchor(z, fz))
        base = fz if self.beta == 1.0 else z.add(g, alpha=self.beta)
        if k == 0:  # no history yet: a plain (damped) step
            return base, (dg_hist, dz_hist, system, gf, af)

        m = min(k, self.m)           # filled slots
        j = (k - 1) % self.m         # the slot this step writes
        recording = torch.is_grad_enabled() and g.requires_grad   # Unroll: no in-place on saved tensors
        if recording:
            dg = gf - g_prev
            col = af - a_prev if self.beta == 1.0 else (af - a_prev) + self.beta * dg
            dg_hist = write_slot(dg_hist, (slice(None), j), dg)
            dz_hist = write_slot(dz_hist, (slice(None), j), col)
        else:
            dg = torch.sub(gf, g_prev, out=dg_hist[:, j])
            col = torch.sub(af, a_prev, out=dz_hist[:, j])       # Δf (β = 1) or Δz
            if self.beta != 1.0:
                col.add_(dg, alpha=self.beta)
        # New Gram row (column j against all) and the right-hand side ΔGᵀg. (bmm with the
        # thin operand first is several times faster than with the history first.)
        hist_t = dg_hist[:, :m].transpose(1, 2)
        row = torch.bmm(dg.unsqueeze(1), hist_t).squeeze(1)
        rhs = torch.bmm(gf.unsqueeze(1), hist_t).transpose(1, 2)
        # The ridge is relative to each column's own squared norm (Levenberg-Marquardt
        # scaling): the diagonally scaled system has eigenvalues in [λ, m + λ], so it stays
        # well conditioned, and only the new column's diagonal entry changes.
        row[:, j] *= 1.0 + self._lambda(z.dtype)   # (autograd-safe: bmm saves only its inputs)
        system = write_slot(system, (slice(None), j, slice(0, m)), row)
        system = write_slot(system, (slice(None), slice(0, m), j), row)
        # ([b, m, 1] right-hand side: the solution comes back contiguous, which bmm needs to
        # stay on its fast path on CPU.) A sample whose system is singular (a zero column:
        # its residual did not change) gets non-finite coefficients, zeroed: a plain step.
        gamma = torch.linalg.solve_ex(system[:, :m, :m], rhs)[0]
        gamma = gamma.nan_to_num(0.0, 0.0, 0.0) if recording else gamma.nan_to_num_(0.0, 0.0, 0.0)
        z_next = torch.baddbmm(flat(base).unsqueeze(1), gamma.transpose(1, 2), dz_hist[:, :m], alpha=-1.0)
        z_next = z_next.view(base.shape)
        return z_next, (dg_hist, dz_hist, system, gf, af)
