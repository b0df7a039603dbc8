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
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ._base import (IN_PLACE_BYTES, State, check_positive, compact_rest, is_ascending, keep_rows, recorded_reciprocal,
                    remember, restart_rows, restarting, shift_in, to_host, write_slot)

#: Armijo's sufficient-decrease constant on the residual norm.
ARMIJO = 1e-4
#: The most halvings of one step; the trial at t = 2^-MAX_BACKTRACKS is accepted whatever it gives.
MAX_BACKTRACKS = 5
#: The nonmonotone window: a trial is measured against the largest residual of the last
#: WINDOW accepted points, so the occasional rise that Broyden recovers from is let through.
WINDOW = 10


_ZEROS: Dict[Any, Tensor] = {}


def _zero(like: Tensor) -> Tensor:
    """A cached 0-dim zero of like's dtype and device (a Python 0.0 in torch.where makes a
    scalar tensor, one more op, at every call)."""
    key = (like.dtype, like.device)
    t = _ZEROS.get(key)
    if t is None:
        t = _ZEROS[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return t


def _tiny(dtype: Any) -> float:
    """The smallest normal number of a torch or numpy float dtype."""
    return float(torch.finfo(dtype).tiny) if isinstance(dtype, torch.dtype) else float(np.finfo(dtype).tiny)


def remember_host(recent: np.ndarray, r: np.ndarray, reject: np.ndarray) -> np.ndarray:
    """`remember` on the host: recent [b, w], oldest first, with r appended where not reject."""
    return np.where(reject[:, None], recent, shift_in(recent, r))


@dataclass(frozen=True)
class Broyden:
    """Limited-memory "good" Broyden with at most `memory` rank-one pairs (per sample).

    A quasi-Newton method on g(z) = f(z) - z: the inverse Jacobian estimate starts at -I (the
    first step is plain iteration) and gets one rank-one update per step; when `memory` pairs
    are stored it restarts from -I. `solver="broyden"` builds `Broyden()`. Memory (measured, benchmarks/memory_solvers.py): 2·memory state-sized vectors
    per sample, plus 2 (g and z of the last accepted point) and about 5 of step temporaries
    at the peak: 37.4 state-sized buffers at memory = 15 (38.1 with line_search=False);
    halted rows are dropped in place when the pairs hold 8 MiB or more (never two copies).

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
        # and the step length of the current trial (made by the first step that needs them: in
        # `solve` they live on the host, as numpy arrays, where the line search decides); last,
        # the mode: "calm" (no sample backtracking: g_prev, z_prev are the loop's tensors),
        # "guarded" (own copies, updated in place), or, once per-row stepping has zeroed u and v
        # (it reads every pair), the rows that `reset` marked to start afresh (bool [b]).
        return (u, v, g.reshape(b, n), z.reshape(b, n), 0, None, None, False)

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
        small = u.numel() * u.element_size() < IN_PLACE_BYTES
        ok = not small and is_ascending(keep) and not torch.is_grad_enabled() and not (u.requires_grad or v.requires_grad)
        if small:   # (one gather each: the copy of a small history costs little memory)
            u2, v2 = u.index_select(0, keep), v.index_select(0, keep)
        elif ok:
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
        rest = compact_rest(rest, keep)
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
        if k == 0:  # H = -I: the Newton step -H g is g, i.e. plain iteration
            # (r_prev: the first residual norm, on the device until the next step's sync)
            r = torch.linalg.vector_norm(gf.detach(), dim=2).squeeze(1) if self.line_search else None
            return fz, (u_hist, v_hist, gf.view(b, -1), zf.view(b, -1), 0, r, t, "calm")
        if count == self.memory:  # memory full: restart from H = -I
            count = 0
        # In a plain solve the new pair is written straight into its slot (out=) and the
        # temporaries are reused in place; when autograd records the step (Unroll), nothing
        # saved for backward is overwritten (write_slot copies the history instead).
        recording = torch.is_grad_enabled() and g.requires_grad
        # The step's vectors side by side in one buffer x [b, 5, n]: Δg and g (their products
        # with the v_i in one bmm), Δz, then -HΔg and g - Σ u_i (v_i·g) (written over the
        # products Σ u_i v_i·Δg, Σ u_i v_i·g); one norm of rows 1-3 then gives ||g||, ||Δz|| and
        # ||HΔg||. x is made from copies of g and z (one cat), then one subtraction makes rows
        # 0 and 3 Δg, another row 2 Δz. (Without the line search, f(z) - Σ u_i (v_i·g) instead,
        # from a copy of f(z) in a sixth row.)
        first = gf if self.line_search else fz.reshape(b, 1, -1)
        if recording:
            dg = gf - g_prev.unsqueeze(1)
            x = torch.cat((dg, gf, zf - z_prev.unsqueeze(1), dg, first), 1)
        else:
            x = torch.cat((gf, gf, zf, gf, gf) if self.line_search else (gf, gf, zf, gf, gf, first), 1)
            x[:, 0:4:3].sub_(g_prev.unsqueeze(1))
            x[:, 2:3].sub_(z_prev.unsqueeze(1))
        dz = x[:, 2:3]
        u, v = u_hist[:, :count], v_hist[:, :count]
        v_slot = None if recording else v_hist[:, count:count + 1]
        if count:
            pv = torch.bmm(x[:, :2], v.transpose(1, 2))
            if recording:
                x = torch.cat((x[:, :3], x[:, 3:] - torch.bmm(pv, u)), 1)
            else:
                torch.bmm(pv, u, out=x[:, 3:5])
                torch.sub(x[:, :2] if self.line_search else x[:, 0:6:5], x[:, 3:5], out=x[:, 3:5])
            del pv
            zt_h = torch.bmm(torch.bmm(dz, u.transpose(1, 2)), v, out=v_slot)
            zt_h = zt_h - dz if recording else zt_h.sub_(dz)                     # Δzᵀ H
        else:   # (H = -I: -HΔg = Δg and g stand as they are)
            zt_h = torch.neg(dz, out=v_slot)
        denom = torch.bmm(zt_h, x[:, :1].transpose(1, 2))                         # Δzᵀ H Δg
        gv = torch.bmm(zt_h, x[:, 1:2].transpose(1, 2))                           # v_new·g
        norms = torch.linalg.vector_norm(x[:, 1:4].detach(), dim=2)
        reject: Optional[np.ndarray] = None
        if self.line_search:
            # The step's one host sync: the norms and the update's denominators go to the
            # host, where the line search and the skip test are decided (numpy compares and
            # rounds as torch does: the same decisions).
            if k == 1:
                r0, nh, dh = to_host(r_prev, norms, denom)
                r_prev, t = np.repeat(r0[:, None], WINDOW, 1), np.ones_like(r0)
            else:
                nh, dh = to_host(norms, denom)
            r = nh[:, 0]
            if mode == "calm":   # (every t is 1: Armijo's test alone)
                reject = ~(r <= (1.0 - ARMIJO) * r_prev.max(1))
            else:
                reject = self._reject(r, r_prev, t)
            if not reject.any():
                reject = None
            # 1 / (Δzᵀ H Δg), or 0 (no update) where it is too small relative to |Δz|·|H Δg|
            # (floored at the smallest normal number: a subnormal has no finite inverse).
            # The inverse is taken on the host too (numpy divides as torch does), except when
            # autograd records the step: then it is taken on the device, in the graph (of a
            # safe denominator: a skipped update sends no gradient back, not NaN).
            d = dh.reshape(b)
            ok = np.abs(d) > np.maximum(self.min_denominator * (nh[:, 1] * nh[:, 2]), _tiny(d.dtype))
            if recording:
                inv = recorded_reciprocal(denom, torch.from_numpy(ok).to(z.device).view(b, 1, 1))
            else:
                with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
                    inv = np.where(ok, 1.0 / d, 0.0).astype(d.dtype)
                inv = torch.from_numpy(inv).to(z.device, denom.dtype).view(b, 1, 1)
        else:   # (no sync: the skip test on the device)
            inv = self._inverse(denom, norms[:, 1:2].unsqueeze(2), norms[:, 2:3].unsqueeze(2), recording)
        # u = (Δz - HΔg) / (Δzᵀ H Δg), into its slot
        if recording:
            new_u = (dz + x[:, 3:4]) * inv
            u_hist = write_slot(u_hist, (slice(None), count), new_u.squeeze(1))
            v_hist = write_slot(v_hist, (slice(None), count), zt_h.squeeze(1))
        else:
            new_u = torch.add(dz, x[:, 3:4], out=u_hist[:, count:count + 1]).mul_(inv)
        if reject is None:
            # Step -H⁺g = g - Σ u_i (v_i·g), the new pair included: z⁺ = z + p (with the line
            # search, as below, so that every path rounds alike), or f(z) - Σ u_i (v_i·g).
            if recording or not self.line_search:
                z_next = torch.addcmul(x[:, 4:5] if count or recording else first, gv, new_u, value=-1.0)
            else:
                z_next = x[:, 4:5].addcmul_(gv, new_u, value=-1.0)
            if self.line_search:
                z_next = torch.add(z_next, zf)   # (a new tensor: x is not kept)
                r_prev, t = shift_in(r_prev, r), t if mode == "calm" else np.ones_like(t)
            return z_next.view_as(fz), (u_hist, v_hist, gf.view(b, -1), zf.view(b, -1), count + 1, r_prev, t, "calm")
        # A rejected sample steps again from its accepted point z_a (with g_a), the estimate
        # updated by the trial all the same (a true secant pair): z⁺ = z_a + t·p, t halved; the
        # others take z + p. The products with the v_i are taken again with g_a in row 1 (row
        # 3, -HΔg, is not recomputed: a row of a product does not depend on the other rows).
        rej = torch.from_numpy(reject).to(z.device).view(b, 1, 1)
        if recording:
            g_from = torch.where(rej, g_prev.unsqueeze(1), gf)
            x = torch.cat((x[:, :1], g_from), 1)
            p = g_from if not count else g_from - torch.bmm(torch.bmm(x, v.transpose(1, 2)), u)[:, 1:]
            p = torch.addcmul(p, torch.bmm(zt_h, g_from.transpose(1, 2)), new_u, value=-1.0)
        else:
            g_from = torch.where(rej, g_prev.unsqueeze(1), gf, out=x[:, 1:2])
            p = x[:, 4:5].copy_(g_from)
            if count:
                p.sub_(torch.bmm(torch.bmm(x[:, :2], v.transpose(1, 2)), u)[:, 1:])
            p.addcmul_(torch.bmm(zt_h, g_from.transpose(1, 2)), new_u, value=-1.0)
        t = np.where(reject, 0.5 * t, 1.0).astype(t.dtype)
        if recording:   # (out of place; "guarded": some t is below 1, so Armijo's test needs them)
            g_prev, z_prev = g_from.view(b, -1), torch.where(rej, z_prev.unsqueeze(1), zf).view(b, -1)
            mode = "guarded"
        else:
            if mode != "guarded":   # (own the anchors: updated in place from here on)
                g_prev, z_prev, mode = g_prev.clone(), z_prev.clone(), "guarded"
            g_prev.copy_(g_from.view(b, -1))
            torch.where(rej.view(b, 1), z_prev, zf.view(b, -1), out=z_prev)
        z_next = torch.addcmul(z_prev.unsqueeze(1), torch.from_numpy(t).to(z.device, z.dtype).view(b, 1, 1), p)
        state = (u_hist, v_hist, g_prev, z_prev, count + 1, remember_host(r_prev, r, reject), t, mode)
        return z_next.view_as(fz), state

    @staticmethod
    def _reject(r: Any, r_prev: Any, t: Any) -> Any:
        """Armijo's test failed (nan fails it) and the step may still be halved (tensors on
        the device, or numpy arrays on the host: the same arithmetic)."""
        top = r_prev.amax(1) if isinstance(r_prev, Tensor) else r_prev.max(1)
        return ~(r <= (1.0 - ARMIJO * t) * top) & (t > 2.0 ** -MAX_BACKTRACKS)

    def _inverse(self, denom: Tensor, dz_norm: Tensor, h_norm: Tensor, recording: bool = False) -> Tensor:
        """1 / (Δzᵀ H Δg), or 0 (no update) where it is too small relative to |Δz|·|H Δg| (on
        the device; floored at the smallest normal number: a subnormal has no finite inverse).
        When autograd records the step, a skipped update sends no gradient back (not NaN)."""
        ok = denom.abs() > (self.min_denominator * (dz_norm * h_norm)).clamp_min_(_tiny(denom.dtype))
        if recording:
            return recorded_reciprocal(denom, ok)
        return torch.where(ok, denom.reciprocal(), _zero(denom))

    def _new_u(self, dz: Tensor, dg: Tensor, h_dg: Tensor, zt_h: Tensor, skip: Tensor) -> Tensor:
        """u = (Δz - HΔg) / (Δzᵀ H Δg), or 0 (no update) where the denominator is too small
        or `skip` says so (the per-row step's form of the skip test of `step`)."""
        denom = torch.bmm(zt_h, dg.transpose(1, 2))                            # Δzᵀ H Δg
        scale = torch.linalg.vector_norm(dz, dim=2, keepdim=True) * torch.linalg.vector_norm(h_dg, dim=2, keepdim=True)
        # (floored at the smallest normal number: a subnormal denominator has no finite
        # inverse; an infinite floor where skipped: no denominator passes it)
        floor = (self.min_denominator * scale).clamp_min_(torch.finfo(denom.dtype).tiny)
        ok = denom.abs() > floor.masked_fill_(skip.view(-1, 1, 1), float("inf"))
        inv = torch.where(ok, denom.reciprocal(), 0.0)                          # skipped update: u = 0
        return (dz - h_dg).mul_(inv)

    def _step_rows(self, state: State, z: Tensor, fz: Tensor, g: Tensor, k: Tensor) -> Tuple[Tensor, State]:
        """One step with a per-row count k [b]; rows marked by `reset` (every row at the first
        per-row step) start afresh: fixed shapes, no host sync. Row i writes pair (k_i - 1) mod
        memory and reads the pairs before it, which is exactly the restart rule of the shared count."""
        u_hist, v_hist, g_prev, z_prev, _, r_prev, t, pending = state
        fresh = restarting(pending, k)
        if not isinstance(pending, Tensor):   # (once) pairs not yet written must hold finite numbers: they meet 0·x
            u_hist.zero_()
            v_hist.zero_()
        b, mem = z.shape[0], self.memory
        if not isinstance(t, Tensor):   # (the per-row bookkeeping, made on first use)
            r_prev, t = z.new_zeros(b, WINDOW), z.new_ones(b)
        rows = torch.arange(b, device=z.device)
        gf, zf = g.reshape(b, 1, -1), z.reshape(b, 1, -1)
        r = torch.linalg.vector_norm(gf, dim=2).squeeze(1)
        reject = self._reject(r, r_prev, t) & ~fresh if self.line_search else torch.zeros_like(fresh)
        c = torch.remainder(k - 1, mem)
        dz = (zf - z_prev.unsqueeze(1)).masked_fill_(fresh.view(b, 1, 1), 0.0).nan_to_num_(0.0, 0.0, 0.0)
        dg = (gf - g_prev.unsqueeze(1)).masked_fill_(fresh.view(b, 1, 1), 0.0).nan_to_num_(0.0, 0.0, 0.0)
        valid = (torch.arange(mem, device=z.device) < c.unsqueeze(1)).masked_fill_(fresh.unsqueeze(1), False)
        valid = valid.unsqueeze(1).to(z.dtype)                                 # [b, 1, mem]
        rej = reject.view(b, 1, 1)
        g_from = torch.where(rej, g_prev.unsqueeze(1), gf)   # as in step(): see there
        prods = torch.bmm(torch.cat((dg, g_from), dim=1), v_hist.transpose(1, 2)) * valid
        comb = torch.bmm(prods, u_hist)
        h_dg = comb[:, :1] - dg
        zt_h = (torch.bmm(torch.bmm(dz, u_hist.transpose(1, 2)) * valid, v_hist) - dz).nan_to_num_(0.0, 0.0, 0.0)
        new_u = self._new_u(dz, dg, h_dg, zt_h, fresh).nan_to_num_(0.0, 0.0, 0.0)
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
                 torch.where(fresh.unsqueeze(1), r.unsqueeze(1), remember(r_prev, r, reject)), t,
                 torch.zeros_like(fresh))
        return z_next.view_as(fz), state

    def reset(self, state: State, fresh: Tensor) -> State:
        """Restart the rows `fresh` (a refilled `stream` slot) at their next per-row step.

        That step ignores their history, exactly as if `init` had been called for those rows
        alone (a row whose count k is 0 is restarted too, for callers that drive the steps).

        Args:
            state: The solver state of the rows in flight.
            fresh: bool `[b]`: the rows that now hold a new sample.

        Returns:
            The state, with those rows marked to start afresh at their next step.
        """
        return restart_rows(state, fresh)
