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

The line search is a backtracking (Armijo) search on the residual norm along the quasi-Newton
step p from the last accepted point z_a (Kelley, "Solving Nonlinear Equations with Newton's
Method", SIAM 2003, ch. 1.6): a trial z_a + t·p is accepted when ||g|| <= (1 - α t)·||g(z_a)||;
otherwise the next trial halves t, i.e. it is the midpoint of z_a and the rejected trial. A
rejected trial leaves the estimate unchanged; each trial is one evaluation of f.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._base import State, check_positive, remember, write_slot

#: Armijo's sufficient-decrease constant on the residual norm.
ARMIJO = 1e-4
#: The most halvings of one step; the trial at t = 2^-MAX_BACKTRACKS is accepted whatever it gives.
MAX_BACKTRACKS = 5
#: The nonmonotone window: a trial is measured against the largest residual of the last
#: WINDOW accepted points, so the occasional rise that Broyden recovers from is let through.
WINDOW = 10


@dataclass(frozen=True)
class Broyden:
    """Limited-memory Broyden with at most `memory` rank-one pairs (per sample).

    `min_denominator`: an update whose Sherman-Morrison denominator is this small relative to
    |Δz|·|H Δg| is skipped for that sample (keeps the estimate finite). `line_search`: a
    sample whose step does not lower its residual enough backtracks along it (halving the
    step, at most 5 times; each trial costs one evaluation of f); False gives the textbook
    iteration. Memory: 2·memory state-sized vectors per sample plus 2 (g and z of the last
    accepted point); the measured peak of a step is in docs/solving.md.
    """

    memory: int = 15
    min_denominator: float = 1e-10
    line_search: bool = True

    per_row = True   # (a class attribute, not a field) step() accepts a per-row k tensor

    def __post_init__(self) -> None:
        check_positive("Broyden(memory=...)", self.memory, integer=True)
        check_positive("Broyden(min_denominator=...)", self.min_denominator)
        if not isinstance(self.line_search, bool):
            raise ValueError(f"Broyden(line_search=...) must be True or False; got {self.line_search!r}.")

    def init(self, z: Tensor, fz: Tensor, g: Tensor) -> State:
        b, n = z.shape[0], z[0].numel()
        u = z.new_empty(b, self.memory, n)   # slots [:count] are valid; the rest is never read
        v = z.new_empty(b, self.memory, n)
        # Then the pair count (int), per sample the residual norm at the last accepted point
        # and the step length of the current trial, and whether u, v were zeroed (per row).
        return (u, v, g.reshape(b, n), z.reshape(b, n), 0, z.new_zeros(b, WINDOW), z.new_ones(b), False)

    def compact(self, state: State, keep: Tensor) -> State:
        """Drop halted rows, copying only the filled pairs."""
        u, v, g_prev, z_prev, count, *rest = state
        u2, v2 = u.new_empty(keep.shape[0], *u.shape[1:]), v.new_empty(keep.shape[0], *v.shape[1:])
        if count:
            u2[:, :count] = u[:, :count].index_select(0, keep)
            v2[:, :count] = v[:, :count].index_select(0, keep)
        rest = [t.index_select(0, keep) if isinstance(t, Tensor) else t for t in rest]
        return (u2, v2, g_prev.index_select(0, keep), z_prev.index_select(0, keep), count, *rest)

    def step(self, state: State, z: Tensor, fz: Tensor, g: Tensor, k: int | Tensor) -> Tuple[Tensor, State]:
        if isinstance(k, Tensor):
            return self._step_rows(state, z, fz, g, k)
        u_hist, v_hist, g_prev, z_prev, count, r_prev, t, _ = state
        b = z.shape[0]
        gf, zf = g.reshape(b, 1, -1), z.reshape(b, 1, -1)
        r = torch.linalg.vector_norm(gf.detach(), dim=2).squeeze(1) if self.line_search else None
        if k == 0:  # H = -I: the Newton step -H g is g, i.e. plain iteration
            if r is not None:
                r_prev = r.unsqueeze(1).expand(b, WINDOW)
            return fz, (u_hist, v_hist, gf.view(b, -1), zf.view(b, -1), 0, r_prev, t, False)
        if count == self.memory:  # memory full: restart from H = -I
            count = 0
        reject = self._reject(r, r_prev, t) if self.line_search else None
        dz = zf - z_prev.unsqueeze(1)
        dg = gf - g_prev.unsqueeze(1)
        # With the line search, a rejected sample steps again from its accepted point z_a
        # (with g_a), the estimate updated by the trial all the same (a true secant pair).
        rej = None if reject is None else reject.view(b, 1, 1)
        g_from = gf if rej is None else torch.where(rej, g_prev.unsqueeze(1), gf)
        u, v = u_hist[:, :count], v_hist[:, :count]
        # In a plain solve the new pair is written straight into its slot (out=); when autograd
        # records the step (Unroll), the history is copied instead (write_slot).
        recording = torch.is_grad_enabled() and g.requires_grad
        v_slot = None if recording else v_hist[:, count:count + 1]
        if count:
            # (Δg·v_i, g·v_i), then both combinations of the u_i in one pass over U.
            prods = torch.bmm(torch.cat((dg, g_from), dim=1), v.transpose(1, 2))   # [b, 2, c]
            comb = torch.bmm(prods, u)                                         # [b, 2, n]
            h_dg = comb[:, :1] - dg                                            # H Δg
            zt_h = torch.sub(torch.bmm(torch.bmm(dz, u.transpose(1, 2)), v), dz, out=v_slot)  # Δzᵀ H
        else:
            h_dg = -dg
            zt_h = torch.neg(dz, out=v_slot)
        new_u = self._new_u(dz, dg, h_dg, zt_h, None if recording else u_hist[:, count:count + 1])
        if recording:
            u_hist = write_slot(u_hist, (slice(None), count), new_u.squeeze(1))
            v_hist = write_slot(v_hist, (slice(None), count), zt_h.squeeze(1))
        # Step -H⁺g = g - Σ u_i (v_i·g), the new pair included: z⁺ = f(z) - Σ u_i (v_i·g).
        gv = torch.bmm(zt_h, g_from.transpose(1, 2))
        if rej is None:
            base = fz.reshape(new_u.shape) if not count else fz.reshape(new_u.shape) - comb[:, 1:]
            z_next = torch.addcmul(base, gv, new_u, value=-1.0)
            return z_next.view_as(fz), (u_hist, v_hist, gf.view(b, -1), zf.view(b, -1), count + 1, r, t, False)
        # z⁺ = z_a + t·p (a rejected sample: its accepted point, t halved) or z + p.
        p = g_from if not count else g_from - comb[:, 1:]
        p = torch.addcmul(p, gv, new_u, value=-1.0)
        t = torch.where(reject, 0.5 * t, 1.0)
        z_from = torch.where(rej, z_prev.unsqueeze(1), zf)
        z_next = torch.addcmul(z_from, t.view(b, 1, 1), p)
        state = (u_hist, v_hist, g_from.view(b, -1), z_from.view(b, -1), count + 1,
                 remember(r_prev, r, reject), t, False)
        return z_next.view_as(fz), state

    @staticmethod
    def _reject(r: Tensor, r_prev: Tensor, t: Tensor) -> Tensor:
        """Armijo's test failed (nan fails it) and the step may still be halved."""
        return ~(r <= (1.0 - ARMIJO * t) * r_prev.amax(1)) & (t > 2.0 ** -MAX_BACKTRACKS)


    def _new_u(self, dz: Tensor, dg: Tensor, h_dg: Tensor, zt_h: Tensor, out: Optional[Tensor],
               skip: Optional[Tensor] = None) -> Tensor:
        """u = (Δz - HΔg) / (Δzᵀ H Δg), or 0 (no update) where the denominator is too small
        or `skip` says so."""
        denom = torch.bmm(zt_h, dg.transpose(1, 2))                            # Δzᵀ H Δg
        numer = dz - h_dg
        scale = torch.linalg.vector_norm(dz, dim=2, keepdim=True) * torch.linalg.vector_norm(h_dg, dim=2, keepdim=True)
        # (floored at the smallest normal number: a subnormal denominator has no finite inverse)
        ok = denom.abs() > (self.min_denominator * scale).clamp_min_(torch.finfo(denom.dtype).tiny)
        if skip is not None:
            ok = ok & ~skip.view(-1, 1, 1)
        inv = torch.where(ok, denom.reciprocal(), 0.0)                          # skipped update: u = 0
        return torch.mul(numer, inv, out=out)

    def _step_rows(self, state: State, z: Tensor, fz: Tensor, g: Tensor, k: Tensor) -> Tuple[Tensor, State]:
        """One step with a per-row count k [b] (rows with k == 0 start afresh): fixed shapes,
        no host sync. Row i writes pair (k_i - 1) mod memory and reads the pairs before it,
        which is exactly the restart rule of the shared count."""
        u_hist, v_hist, g_prev, z_prev, _, r_prev, t, zeroed = state
        if not zeroed:   # (once) pairs not yet written must hold finite numbers: they meet 0·x
            u_hist.zero_()
            v_hist.zero_()
        b, mem = z.shape[0], self.memory
        rows = torch.arange(b, device=z.device)
        gf, zf = g.reshape(b, 1, -1), z.reshape(b, 1, -1)
        fresh = k == 0
        r = torch.linalg.vector_norm(gf, dim=2).squeeze(1)
        reject = self._reject(r, r_prev, t) & ~fresh if self.line_search else torch.zeros_like(fresh)
        c = torch.remainder(k - 1, mem)
        keep = ~fresh.view(b, 1, 1)
        dz = torch.where(keep, zf - z_prev.unsqueeze(1), 0.0).nan_to_num_(0.0, 0.0, 0.0)
        dg = torch.where(keep, gf - g_prev.unsqueeze(1), 0.0).nan_to_num_(0.0, 0.0, 0.0)
        valid = (torch.arange(mem, device=z.device) < c.unsqueeze(1)) & ~fresh.unsqueeze(1)
        valid = valid.unsqueeze(1).to(z.dtype)                                 # [b, 1, mem]
        rej = reject.view(b, 1, 1)
        g_from = torch.where(rej, g_prev.unsqueeze(1), gf)   # as in step(): see there
        prods = torch.bmm(torch.cat((dg, g_from), dim=1), v_hist.transpose(1, 2)) * valid
        comb = torch.bmm(prods, u_hist)
        h_dg = comb[:, :1] - dg
        zt_h = (torch.bmm(torch.bmm(dz, u_hist.transpose(1, 2)) * valid, v_hist) - dz).nan_to_num_(0.0, 0.0, 0.0)
        new_u = self._new_u(dz, dg, h_dg, zt_h, None, skip=fresh).nan_to_num_(0.0, 0.0, 0.0)
        u_hist.index_put_((rows, c), new_u.squeeze(1))
        v_hist.index_put_((rows, c), zt_h.squeeze(1))
        gv = torch.bmm(zt_h, g_from.transpose(1, 2))
        if self.line_search:
            p = torch.addcmul(g_from - comb[:, 1:], gv, new_u, value=-1.0)
            t = torch.where(reject, 0.5 * t, 1.0)
            z_from = torch.where(rej, z_prev.unsqueeze(1), zf)
            z_next = torch.addcmul(z_from, t.view(b, 1, 1), p)
        else:   # (the textbook formula, as in step())
            z_from, z_next = zf, torch.addcmul(fz.reshape(b, 1, -1) - comb[:, 1:], gv, new_u, value=-1.0)
        state = (u_hist, v_hist, g_from.view(b, -1), z_from.view(b, -1), 0,
                 torch.where(fresh.unsqueeze(1), r.unsqueeze(1), remember(r_prev, r, reject)), t, True)
        return z_next.view_as(fz), state
