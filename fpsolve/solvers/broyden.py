"""Limited-memory "good" Broyden on g(z) = f(z) - z, with the inverse Jacobian kept low-rank.

Broyden, Math. Comp. 19 (1965); the limited-memory inverse form as used for DEQs by Bai et
al., "Deep Equilibrium Models", NeurIPS 2019. The inverse Jacobian estimate of g is
    H = -I + Σ_i u_i v_iᵀ,
which starts as -I (so the first step is plain iteration, z⁺ = f(z)) and gets one
Sherman-Morrison rank-one update per step. The memory is capped by `memory`, not by max_iter;
when it is full the estimate restarts from -I (overwriting the oldest pair instead can diverge
on linear problems). With memory >= 2n it is exact on an n-dimensional linear map within 2n
steps (Gay, SIAM J. Numer. Anal. 16 (1979)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor

from ._base import State, check_positive


@dataclass(frozen=True)
class Broyden:
    """Limited-memory Broyden with at most `memory` rank-one pairs (per sample).

    `min_denominator`: an update whose Sherman-Morrison denominator is this small relative to
    |Δz|·|H Δg| is skipped for that sample (keeps the estimate finite).
    """

    memory: int = 30
    min_denominator: float = 1e-10

    def __post_init__(self) -> None:
        check_positive("Broyden(memory=...)", self.memory, integer=True)
        check_positive("Broyden(min_denominator=...)", self.min_denominator)

    def init(self, z: Tensor, fz: Tensor, g: Tensor) -> State:
        b, n, m = z.shape[0], z[0].numel(), self.memory
        u = torch.zeros(b, m, n, dtype=z.dtype, device=z.device)
        v = torch.zeros(b, m, n, dtype=z.dtype, device=z.device)
        return (u, v, g.reshape(b, n), z.reshape(b, n))

    def step(self, state: State, z: Tensor, fz: Tensor, g: Tensor, k: int) -> Tuple[Tensor, State]:
        u_hist, v_hist, g_prev, z_prev = state
        b = z.shape[0]
        gf, zf = g.reshape(b, 1, -1), z.reshape(b, 1, -1)
        if k == 0:  # H = -I: the Newton step -H g is g, i.e. plain iteration
            return fz, (u_hist, v_hist, gf.view(b, -1), zf.view(b, -1))

        j = (k - 1) % self.memory
        if j == 0 and k > 1:  # memory full: restart from H = -I
            u_hist.zero_()
            v_hist.zero_()
        dz = zf - z_prev.unsqueeze(1)
        dg = gf - g_prev.unsqueeze(1)
        u_t, v_t = u_hist, v_hist.transpose(1, 2)
        # H Δg = -Δg + U (V Δg) and Δzᵀ H = -Δzᵀ + (Δzᵀ Uᵀ) V; slot j is still empty (zero).
        prods = torch.bmm(torch.cat((dg, gf), dim=1), v_t)                    # [b, 2, m]
        h_dg = torch.baddbmm(dg, prods[:, :1], u_hist, beta=-1.0)
        zt_h = torch.baddbmm(dz, torch.bmm(dz, u_t.transpose(1, 2)), v_hist, beta=-1.0)
        denom = torch.bmm(zt_h, dg.transpose(1, 2)).squeeze(2)                # [b, 1]
        numer = dz - h_dg
        scale = torch.linalg.vector_norm(dz, dim=2) * torch.linalg.vector_norm(h_dg, dim=2)
        ok = denom.abs() > self.min_denominator * scale
        new_u = numer / torch.where(ok, denom, torch.ones_like(denom)).unsqueeze(2)
        new_u.masked_fill_(~ok.unsqueeze(2), 0.0)
        u_hist[:, j] = new_u.squeeze(1)
        v_hist[:, j] = zt_h.squeeze(1)
        # Step -H g = g - U (V g), with the product against the new pair added in place.
        pg = prods[:, 1:]
        pg[:, :, j] = torch.bmm(zt_h, gf.transpose(1, 2)).view(b, 1)
        z_next = torch.baddbmm(fz.reshape(b, 1, -1), pg, u_hist, alpha=-1.0)
        return z_next.view_as(z), (u_hist, v_hist, gf.view(b, -1), zf.view(b, -1))
