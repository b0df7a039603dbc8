"""Limited-memory "good" Broyden on g(z) = f(z) - z, with the inverse Jacobian kept low-rank.

Broyden, Math. Comp. 19 (1965); the limited-memory inverse form as used for DEQs by Bai et
al., "Deep Equilibrium Models", NeurIPS 2019. The inverse Jacobian estimate of g is
    H = -I + Σ_i u_i v_iᵀ,
which starts as -I (so the first step is plain iteration, z⁺ = f(z)) and gets one
Sherman-Morrison rank-one update per step. The memory is capped by `memory`, not by max_iter;
when it is full the estimate restarts from -I (overwriting the oldest pair instead can diverge
on linear problems). With memory >= 2n it is exact on an n-dimensional linear map within 2n
steps (Gay, SIAM J. Numer. Anal. 16 (1979)). Only the filled pairs are ever read or copied,
so the cost of a step grows with the pairs stored, not with `memory`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor

from ._base import State, check_positive, write_slot


@dataclass(frozen=True)
class Broyden:
    """Limited-memory Broyden with at most `memory` rank-one pairs (per sample).

    `min_denominator`: an update whose Sherman-Morrison denominator is this small relative to
    |Δz|·|H Δg| is skipped for that sample (keeps the estimate finite).
    """

    memory: int = 15
    min_denominator: float = 1e-10

    def __post_init__(self) -> None:
        check_positive("Broyden(memory=...)", self.memory, integer=True)
        check_positive("Broyden(min_denominator=...)", self.min_denominator)

    def init(self, z: Tensor, fz: Tensor, g: Tensor) -> State:
        b, n = z.shape[0], z[0].numel()
        u = z.new_empty(b, self.memory, n)   # slots [:count] are valid; the rest is never read
        v = z.new_empty(b, self.memory, n)
        return (u, v, g.reshape(b, n), z.reshape(b, n), 0)

    def compact(self, state: State, keep: Tensor) -> State:
        """Drop halted rows, copying only the filled pairs."""
        u, v, g_prev, z_prev, count = state
        u2, v2 = u.new_empty(keep.shape[0], *u.shape[1:]), v.new_empty(keep.shape[0], *v.shape[1:])
        if count:
            u2[:, :count] = u[:, :count].index_select(0, keep)
            v2[:, :count] = v[:, :count].index_select(0, keep)
        return (u2, v2, g_prev.index_select(0, keep), z_prev.index_select(0, keep), count)

    def step(self, state: State, z: Tensor, fz: Tensor, g: Tensor, k: int) -> Tuple[Tensor, State]:
        u_hist, v_hist, g_prev, z_prev, count = state
        b = z.shape[0]
        gf, zf = g.reshape(b, 1, -1), z.reshape(b, 1, -1)
        if k == 0:  # H = -I: the Newton step -H g is g, i.e. plain iteration
            return fz, (u_hist, v_hist, gf.view(b, -1), zf.view(b, -1), 0)
        if count == self.memory:  # memory full: restart from H = -I
            count = 0
        dz = zf - z_prev.unsqueeze(1)
        dg = gf - g_prev.unsqueeze(1)
        u, v = u_hist[:, :count], v_hist[:, :count]
        # In a plain solve the new pair is written straight into its slot (out=); when autograd
        # records the step (Unroll), the history is copied instead (write_slot).
        recording = torch.is_grad_enabled() and g.requires_grad
        v_slot = None if recording else v_hist[:, count:count + 1]
        if count:
            # (Δg·v_i, g·v_i), then both combinations of the u_i in one pass over U.
            prods = torch.bmm(torch.cat((dg, gf), dim=1), v.transpose(1, 2))   # [b, 2, c]
            comb = torch.bmm(prods, u)                                         # [b, 2, n]
            h_dg = comb[:, :1] - dg                                            # H Δg
            zt_h = torch.sub(torch.bmm(torch.bmm(dz, u.transpose(1, 2)), v), dz, out=v_slot)  # Δzᵀ H
        else:
            h_dg = -dg
            zt_h = torch.neg(dz, out=v_slot)
        denom = torch.bmm(zt_h, dg.transpose(1, 2))                            # Δzᵀ H Δg
        numer = dz - h_dg
        scale = torch.linalg.vector_norm(dz, dim=2, keepdim=True) * torch.linalg.vector_norm(h_dg, dim=2, keepdim=True)
        # (floored at the smallest normal number: a subnormal denominator has no finite inverse)
        ok = denom.abs() > (self.min_denominator * scale).clamp_min_(torch.finfo(denom.dtype).tiny)
        inv = torch.where(ok, denom.reciprocal(), 0.0)                          # skipped update: u = 0
        if recording:
            new_u = numer * inv
            u_hist = write_slot(u_hist, (slice(None), count), new_u.squeeze(1))
            v_hist = write_slot(v_hist, (slice(None), count), zt_h.squeeze(1))
        else:
            new_u = torch.mul(numer, inv, out=u_hist[:, count:count + 1])
        # Step -H⁺g = g - Σ u_i (v_i·g), the new pair included: z⁺ = f(z) - Σ u_i (v_i·g).
        gv = torch.bmm(zt_h, gf.transpose(1, 2))
        base = fz.reshape(new_u.shape) if not count else fz.reshape(new_u.shape) - comb[:, 1:]
        z_next = torch.addcmul(base, gv, new_u, value=-1.0).view_as(fz)
        return z_next, (u_hist, v_hist, gf.view(b, -1), zf.view(b, -1), count + 1)
