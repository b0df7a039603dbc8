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

from ._base import State, check_positive, is_ascending, keep_rows, remember, write_slot

#: Armijo's sufficient-decrease constant on the residual norm.
ARMIJO = 1e-4
#: The most halvings of one step; the trial at t = 2^-MAX_BACKTRACKS is accepted whatever it gives.
MAX_BACKTRACKS = 5
#: The nonmonotone window: a trial is measured against the largest residual of the last
#: WINDOW accepted points, so the occasional rise that Broyden recovers from is let through.
WINDOW = 10


@dataclass(frozen=True)
class Broyden:
    """Limited-memory "good" Broyden with at most `memory` rank-one pairs (per sample).

    A quasi-Newton method on g(z) = f(z) - z: the inverse Jacobian estimate starts at -I (the
    first step is plain iteration) and gets one rank-one update per step; when `memory` pairs
    are stored it restarts from -I. `solver="broyden"` builds `Broyden()`. Memory (measured, benchmarks/memory_solvers.py): 2·memory state-sized vectors
    per sample, plus 2 (g and z of the last accepted point) and about 5 of step temporaries
    at the peak: 36.6 state-sized buffers at memory = 15 (either line_search);
    halted rows are dropped in place (never two copies of the pairs).

    Args:
        memory: The most rank-one pairs kept per sample (an integer >= 1).
        min_denominator: An update whose Sherman-Morrison denominator is this small relative
            to |Δz|·|H Δg| is skipped for that sample (keeps the estimate finite).
        line_search: A sample whose step does not lower its residual enough backtracks
            along it (halving the step, at most 5 times; each trial costs one evaluation of
            f); False gives the textbook iteration.

    Raises:
        ValueError: `memory` not a positive integer, `min_denominator` not positive, or
            `line_search` not a bool.

    Example:
        ```python
        A = torch.tensor([[0.9, 0.3], [-0.3, 0.9]], dtype=torch.float64)   # a slow rotation
        x = torch.ones(2, 2, dtype=torch.float64)
        sol = fpsolve.solve(lambda z, x: z @ A.T + x, torch.zeros_like(x), x,
                            solver=fpsolve.Broyden(memory=8), rtol=1e-10)
        exact = torch.linalg.solve(torch.eye(2, dtype=torch.float64) - A, x.T).T
        assert torch.allclose(sol.z, exact) and int(sol.iterations.max()) <= 8
        ```
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
        """Empty pair buffers for the rows of z (the estimate starts at H = -I).

        Args:
            z: The first iterate of the active rows, `[b, ...]`.
            fz: f(z), shaped like z.
            g: The residual f(z) - z.

        Returns:
            The pair buffers, the pair count and the line search's per-row bookkeeping.
        """
        b, n = z.shape[0], z[0].numel()
        u = z.new_empty(b, self.memory, n)   # slots [:count] are valid; the rest is never read
        v = z.new_empty(b, self.memory, n)
        # Then the pair count (int), per sample the residual norms at the last accepted points
        # and the step length of the current trial; last, the mode: "calm" (no sample
        # backtracking: g_prev, z_prev are the loop's tensors), "guarded" (own copies, updated
        # in place), or True once per-row stepping has zeroed u and v (it reads every pair).
        return (u, v, g.reshape(b, n), z.reshape(b, n), 0, z.new_zeros(b, WINDOW), z.new_ones(b), False)

    def compact(self, state: State, keep: Tensor) -> State:
        """Drop halted rows, moving only the filled pairs, in place.

        Args:
            state: The solver state of the active rows.
            keep: int64 `[b_kept]`: the rows to keep, as indices into the state.

        Returns:
            The state of the kept rows, in the order of `keep`.
        """
        u, v, g_prev, z_prev, count, *rest = state
        n = keep.shape[0]
        ok = is_ascending(keep) and not torch.is_grad_enabled() and not (u.requires_grad or v.requires_grad)
        if ok:
            if count:
                keep_rows(u[:, :count], keep, True)
                keep_rows(v[:, :count], keep, True)
            u2, v2 = u.narrow(0, 0, n), v.narrow(0, 0, n)
        else:
            u2, v2 = u.new_empty(n, *u.shape[1:]), v.new_empty(n, *v.shape[1:])
            if count:
                u2[:, :count] = u[:, :count].index_select(0, keep)
                v2[:, :count] = v[:, :count].index_select(0, keep)
        owned = ok and rest[-1] == "guarded"   # (otherwise views of the loop's g and z)
        rest = [t.index_select(0, keep) if isinstance(t, Tensor) else t for t in rest]
        return (u2, v2, keep_rows(g_prev, keep, owned), keep_rows(z_prev, keep, owned), count, *rest)

    def step(self, state: State, z: Tensor, fz: Tensor, g: Tensor, k: int | Tensor) -> Tuple[Tensor, State]:
        """One quasi-Newton step z - H g per row (a backtracking trial where the line search rejects).

        Args:
            state: The state from `init` or the previous `step`, rows matching z.
            z: The current iterate `[b, ...]`.
            fz: f(z), shaped like z.
            g: The residual f(z) - z.
            k: Evaluations already made for these rows, minus one (0 at the first step); or
                an int64 tensor `[b]` of per-row counts (`fpsolve.stream`), 0 marking a row
                that holds a new sample.

        Returns:
            The next iterate and the updated pairs.
        """
        if isinstance(k, Tensor):
            return self._step_rows(state, z, fz, g, k)
        u_hist, v_hist, g_prev, z_prev, count, r_prev, t, mode = state
        b = z.shape[0]
        gf, zf = g.reshape(b, 1, -1), z.reshape(b, 1, -1)
        r = torch.linalg.vector_norm(gf.detach(), dim=2).squeeze(1) if self.line_search else None
        # In a plain solve the new pair is written straight into its slot (out=) and the
        # temporaries are reused in place; when autograd records the step (Unroll), nothing
        # saved for backward is overwritten (write_slot copies the history instead).
        recording = torch.is_grad_enabled() and g.requires_grad
        if k == 0:  # H = -I: the Newton step -H g is g, i.e. plain iteration
            if r is not None:
                r_prev = r.unsqueeze(1).expand(b, WINDOW)
            return fz, (u_hist, v_hist, gf.view(b, -1), zf.view(b, -1), 0, r_prev, t, "calm")
        if count == self.memory:  # memory full: restart from H = -I
            count = 0
        if not self.line_search:
            reject = None
        elif mode == "calm":   # (every t is 1: Armijo's test alone)
            reject = ~(r <= (1.0 - ARMIJO) * r_prev.amax(1))
        else:
            reject = self._reject(r, r_prev, t)
        if reject is not None:
            if not bool(reject.any()):   # (one host sync) no sample backtracks: a plain step
                reject = None
            elif mode != "guarded" and not recording:   # (own the anchors: updated in place)
                g_prev, z_prev, mode = g_prev.clone(), z_prev.clone(), "guarded"
        # With the line search, a rejected sample steps again from its accepted point z_a
        # (with g_a), the estimate updated by the trial all the same (a true secant pair).
        rej = None if reject is None else reject.view(b, 1, 1)
        dz = zf - z_prev.unsqueeze(1)
        u, v = u_hist[:, :count], v_hist[:, :count]
        v_slot = None if recording else v_hist[:, count:count + 1]
        if count:
            # (Δg, g) side by side, their products with the v_i, then both combinations of
            # the u_i in one pass over U: comb = (Σ u_i v_i·Δg, Σ u_i v_i·g).
            if recording:
                dg = gf - g_prev.unsqueeze(1)
                g_from = gf if rej is None else torch.where(rej, g_prev.unsqueeze(1), gf)
                work = torch.cat((dg, g_from), dim=1)
            else:
                work = gf.new_empty(b, 2, gf.shape[2])
                dg = torch.sub(gf, g_prev.unsqueeze(1), out=work[:, :1])
                g_from = work[:, 1:]
                if rej is None:
                    g_from.copy_(gf)
                else:
                    torch.where(rej, g_prev.unsqueeze(1), gf, out=g_from)
            comb = torch.bmm(torch.bmm(work, v.transpose(1, 2)), u)            # [b, 2, n]
            h_dg = torch.sub(comb[:, :1], dg, out=None if recording else comb[:, :1])   # H Δg
            zt_h = torch.bmm(torch.bmm(dz, u.transpose(1, 2)), v, out=v_slot)
            zt_h = zt_h - dz if recording else zt_h.sub_(dz)                     # Δzᵀ H
        else:
            dg = gf - g_prev.unsqueeze(1)
            g_from = gf if rej is None else torch.where(rej, g_prev.unsqueeze(1), gf)
            h_dg = -dg
            zt_h = torch.neg(dz, out=v_slot)
        new_u = self._new_u(dz, dg, h_dg, zt_h, None if recording else u_hist[:, count:count + 1],
                            in_place=not recording)
        del dz, dg, h_dg
        if recording:
            u_hist = write_slot(u_hist, (slice(None), count), new_u.squeeze(1))
            v_hist = write_slot(v_hist, (slice(None), count), zt_h.squeeze(1))
        # Step -H⁺g = g - Σ u_i (v_i·g), the new pair included: z⁺ = f(z) - Σ u_i (v_i·g).
        gv = torch.bmm(zt_h, g_from.transpose(1, 2))
        if rej is None:
            # (with the line search, z + p as below, so that every path rounds alike)
            first = gf if self.line_search else fz.reshape(new_u.shape)
            if not count:
                z_next = torch.addcmul(first, gv, new_u, value=-1.0)
            elif recording:
                z_next = torch.addcmul(first - comb[:, 1:], gv, new_u, value=-1.0)
            else:
                z_next = torch.sub(first, comb[:, 1:]).addcmul_(gv, new_u, value=-1.0)
            if self.line_search:
                z_next = z_next + zf if recording else z_next.add_(zf)
                r_prev = torch.cat((r_prev[:, 1:], r.unsqueeze(1)), 1)
                t = t if mode == "calm" else torch.ones_like(t)
            return z_next.view_as(fz), (u_hist, v_hist, gf.view(b, -1), zf.view(b, -1), count + 1, r_prev, t, "calm")
        # z⁺ = z_a + t·p (a rejected sample: its accepted point, t halved) or z + p.
        if not count:
            p = torch.addcmul(g_from, gv, new_u, value=-1.0)
        elif recording:
            p = torch.addcmul(g_from - comb[:, 1:], gv, new_u, value=-1.0)
        else:
            p = torch.sub(g_from, comb[:, 1:], out=comb[:, 1:]).addcmul_(gv, new_u, value=-1.0)
        t = torch.where(reject, 0.5 * t, 1.0)
        if recording:
            g_prev, z_prev = g_from.view(b, -1), torch.where(rej, z_prev.unsqueeze(1), zf).view(b, -1)
        else:
            g_prev.copy_(g_from.view(b, -1))
            torch.where(reject.view(b, 1), z_prev, zf.view(b, -1), out=z_prev)
        z_next = torch.addcmul(z_prev.unsqueeze(1), t.view(b, 1, 1), p)
        state = (u_hist, v_hist, g_prev, z_prev, count + 1, remember(r_prev, r, reject), t, mode)
        return z_next.view_as(fz), state

    @staticmethod
    def _reject(r: Tensor, r_prev: Tensor, t: Tensor) -> Tensor:
        """Armijo's test failed (nan fails it) and the step may still be halved."""
        return ~(r <= (1.0 - ARMIJO * t) * r_prev.amax(1)) & (t > 2.0 ** -MAX_BACKTRACKS)

    def _new_u(self, dz: Tensor, dg: Tensor, h_dg: Tensor, zt_h: Tensor, out: Optional[Tensor],
               skip: Optional[Tensor] = None, in_place: bool = False) -> Tensor:
        """u = (Δz - HΔg) / (Δzᵀ H Δg), or 0 (no update) where the denominator is too small
        or `skip` says so. in_place: Δz - HΔg may overwrite h_dg (a temporary)."""
        denom = torch.bmm(zt_h, dg.transpose(1, 2))                            # Δzᵀ H Δg
        scale = torch.linalg.vector_norm(dz, dim=2, keepdim=True) * torch.linalg.vector_norm(h_dg, dim=2, keepdim=True)
        numer = torch.sub(dz, h_dg, out=h_dg if in_place else None)
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
        if zeroed is not True:   # (once) pairs not yet written must hold finite numbers: they meet 0·x
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
