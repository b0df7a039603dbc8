"""Anderson acceleration (type II), batched over samples with fixed-shape history buffers.

Walker & Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal. 49
(2011), in the difference form: with ΔG the last m differences of residuals g = f(z) - z and
ΔZ those of iterates, solve the regularised least-squares problem
    γ = argmin ||g - ΔG γ||² + λ Σ_j ||Δg_j||² γ_j²     (a ridge relative to each column)
and step  z⁺ = z + β g - (ΔZ + β ΔG) γ.
The Gram matrix ΔGᵀΔG is updated one row per step (one bmm against the new column), and the
small systems of all active samples are solved in one batched call over the filled slots.

The safeguard, after Zhang, O'Donoghue & Boyd, "Globally convergent type-I Anderson
acceleration for nonsmooth fixed-point iterations", SIAM J. Optim. 30 (2020) (as in the SCS
solver): per sample, an accelerated iterate whose residual is not below the largest residual
of the last WINDOW accepted points is rejected; the next iterate is the plain (damped) step
from the point it came from, already known (no extra evaluation of f); the history restarts
there, and after the s-th rejection 2^s - 2 more plain steps are taken before accelerating
again. A plain step that raises the residual by more than DISARM shows that plain iteration
does not contract there, and the sample continues with the textbook iteration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ._base import (State, check_positive, compact_rest, flat, is_ascending, keep_rows, recorded_solve, remember,
                    restart_rows, restarting, shift_in, to_host, write_slot)

#: A plain step that multiplies a sample's residual by more than this shows that plain
#: iteration does not contract there: the safeguard is switched off for that sample.
DISARM = 1.25
#: The nonmonotone window: an accelerated iterate is measured against the largest residual
#: of the last WINDOW accepted points (Grippo, Lampariello & Lucidi, SIAM J. Numer. Anal. 23
#: (1986)), so the rises that Anderson recovers from on a badly scaled problem are let through.
WINDOW = 10


@dataclass(frozen=True)
class Anderson:
    """Anderson acceleration mixing the last `m` iterates (type II, Walker & Ni 2011).

    Each step solves a small regularised least-squares problem per sample over the last `m`
    residual differences and mixes the iterates with it. A sample whose small system cannot be
    solved gets a plain damped step; the others are unaffected. With `safeguard=True`, a sample
    whose accelerated iterate does not lower its residual enough falls back to the plain
    (damped) step from the point before (no extra evaluation of f), so Anderson is never
    worse than plain iteration on a map where plain iteration converges. `solver="anderson"`
    builds `Anderson()`. Memory (measured, benchmarks/memory_solvers.py): 2m state-sized vectors per sample, plus
    2 (g and the anchor of the last point) and under 1 of step temporaries at the peak:
    12.9 state-sized buffers at m = 5 (12.4 with safeguard=False); halted rows are dropped
    in place when the history holds 8 MiB or more (never two copies of a large history).

    Args:
        m: How many past iterates are mixed (an integer >= 1).
        beta: The mixing (damping) factor, in (0, 2].
        regularization: λ, the ridge relative to each history column's squared norm; None:
            1e-5 in float32, 1e-10 in float64.
        safeguard: Fall back to the plain step where acceleration does not lower the
            residual; False gives the textbook iteration.

    Raises:
        ValueError: `m` not a positive integer, `beta` not in (0, 2], `regularization` not
            positive, or `safeguard` not a bool.

    Example:
        ```python
        A = 0.95 * torch.eye(3, dtype=torch.float64)   # slow for plain iteration
        f = lambda z, x: z @ A + x
        x = torch.ones(4, 3, dtype=torch.float64)
        sol = fpsolve.solve(f, torch.zeros_like(x), x, solver=fpsolve.Anderson(m=3), rtol=1e-8)
        assert torch.allclose(sol.z, x / 0.05) and int(sol.iterations.max()) < 10
        ```
    """

    m: int = 5
    beta: float = 1.0
    regularization: Optional[float] = None
    safeguard: bool = True

    per_row = True   # (a class attribute, not a field) step() accepts a per-row k tensor

    def __post_init__(self) -> None:
        check_positive("Anderson(m=...)", self.m, integer=True)
        check_positive("Anderson(beta=...)", self.beta, at_most=2.0)
        if self.regularization is not None:
            check_positive("Anderson(regularization=...)", self.regularization)
        if not isinstance(self.safeguard, bool):
            raise ValueError(f"Anderson(safeguard=...) must be True or False; got {self.safeguard!r}.")

    def _lambda(self, dtype: torch.dtype) -> float:
        if self.regularization is not None:
            return self.regularization
        return 1e-10 if dtype == torch.float64 else 1e-5

    def init(self, z: Tensor, fz: Tensor, g: Tensor) -> State:
        """Empty history buffers for the rows of z (m slots each), after the first evaluation.

        Args:
            z: The first iterate of the active rows, `[b, ...]`.
            fz: f(z), shaped like z.
            g: The residual f(z) - z.

        Returns:
            The history, its Gram matrix and the safeguard's per-row bookkeeping.
        """
        b, n, m = z.shape[0], z[0].numel(), self.m
        dg_hist = z.new_empty(b, m, n)   # slots [:filled] are valid; the rest is never read
        dz_hist = z.new_empty(b, m, n)   # columns Δz + β Δg
        system = z.new_empty(b, m, m)    # ΔGᵀΔG with its ridge on the diagonal (filled slots:
        # every entry a step reads was written before)
        # Then per sample: the residuals of the last accepted points, whether the current
        # iterate is an accelerated one (to be checked), and its counters (see `_guard`), made
        # by the first step that needs them; last, the mode: "calm" (no rejection yet: the
        # residuals live on the host, as numpy arrays, and the test costs no device op),
        # "guarded" (per-sample bookkeeping on the device), or True once per-row stepping has
        # zeroed the history (it reads every slot): from then on, the rows that `reset` marked to
        # start afresh at their next per-row step (bool [b]).
        return (dg_hist, dz_hist, system, flat(g), flat(self._anchor(z, fz)), None, None, None, False)

    def _anchor(self, z: Tensor, fz: Tensor) -> Tensor:
        """The vector whose differences form the ΔZ + βΔG columns: f(z) itself when β = 1."""
        return fz if self.beta == 1.0 else z

    def _plain(self, g: Tensor, a: Tensor) -> Tensor:
        """The plain damped step z + βg from (g, anchor a) of one point."""
        return a if self.beta == 1.0 else a.add(g, alpha=self.beta)

    def step(self, state: State, z: Tensor, fz: Tensor, g: Tensor, k: int | Tensor) -> Tuple[Tensor, State]:
        """One Anderson step per row (a plain damped step where the safeguard rejects).

        Args:
            state: The state from `init` or the previous `step`, rows matching z.
            z: The current iterate `[b, ...]`.
            fz: f(z), shaped like z.
            g: The residual f(z) - z.
            k: Evaluations already made for these rows, minus one (0 at the first step); or
                an int64 tensor `[b]` of per-row counts (`fpsolve.stream`), 0 marking a row
                that holds a new sample.

        Returns:
            The next iterate and the updated history.
        """
        if isinstance(k, Tensor):
            return self._step_rows(state, z, fz, g, k)
        if self.safeguard:
            return self._step_safeguarded(state, z, fz, g, k)
        dg_hist, dz_hist, system, g_prev, a_prev, *extra = state
        gf, af = flat(g), flat(self._anchor(z, fz))
        if k == 0:  # no history yet: a plain (damped) step
            return self._plain(g, self._anchor(z, fz)), (dg_hist, dz_hist, system, gf, af, *extra)
        m = min(k, self.m)
        dg_hist, dz_hist, system, hist_t, recording = self._write(dg_hist, dz_hist, system, gf, af, g_prev, a_prev,
                                                                  (k - 1) % self.m, m)
        gamma = self._gamma(system, gf, hist_t, m, recording)
        # A sample whose system is singular (a zero column: its residual did not change) gets
        # non-finite coefficients, zeroed (recorded: already zeroed, see `recorded_solve`).
        if not recording:
            gamma.nan_to_num_(0.0, 0.0, 0.0)
        return self._mix(gf, af, gamma, dz_hist, m).view(z.shape), (dg_hist, dz_hist, system, gf, af, *extra)

    @staticmethod
    def _gamma(system: Tensor, gf: Tensor, hist_t: Tensor, m: int, recording: bool = False) -> Tensor:
        """γ [b, m, 1] of the textbook step over the m filled slots (non-finite where singular;
        when autograd records the step, zeroed there, with a finite backward)."""
        # ([b, m, 1] right-hand side: the solution comes back contiguous, which bmm needs to
        # stay on its fast path on CPU.)
        rhs = torch.bmm(gf.unsqueeze(1), hist_t).transpose(1, 2)
        if recording:
            return recorded_solve(system[:, :m, :m], rhs)
        return torch.linalg.solve_ex(system[:, :m, :m], rhs)[0]

    def _mix(self, gf: Tensor, af: Tensor, gamma: Tensor, dz_hist: Tensor, m: int) -> Tensor:
        """z⁺ = z + βg - (ΔZ + βΔG) γ, [b, 1, n]."""
        return torch.baddbmm(self._plain(gf, af).unsqueeze(1), gamma.transpose(1, 2), dz_hist[:, :m], alpha=-1.0)

    def _write(self, dg_hist: Tensor, dz_hist: Tensor, system: Tensor, gf: Tensor, af: Tensor,
               g_prev: Tensor, a_prev: Tensor, j: int, m: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, bool]:
        """Write the new columns into slot j and its Gram row against the m filled slots;
        returns the history, the system, ΔGᵀ of the filled slots, and whether autograd records."""
        recording = torch.is_grad_enabled() and gf.requires_grad   # Unroll: no in-place on saved tensors
        ridge = 1.0 + self._lambda(gf.dtype)
        # The ridge is relative to each column's own squared norm (Levenberg-Marquardt
        # scaling): the diagonally scaled system has eigenvalues in [λ, m + λ], so it stays
        # well conditioned, and only the new column's diagonal entry changes. (bmm with the
        # thin operand first is several times faster than with the history first.)
        if recording:
            dg = gf - g_prev
            col = af - a_prev if self.beta == 1.0 else (af - a_prev) + self.beta * dg
            dg_hist = write_slot(dg_hist, (slice(None), j), dg)
            dz_hist = write_slot(dz_hist, (slice(None), j), col)
            hist_t = dg_hist[:, :m].transpose(1, 2)
            row = torch.bmm(dg.unsqueeze(1), hist_t).squeeze(1)
            row[:, j] *= ridge   # (autograd-safe: bmm saves only its inputs)
            system = write_slot(system, (slice(None), j, slice(0, m)), row)
            system = write_slot(system, (slice(None), slice(0, m), j), row)
            return dg_hist, dz_hist, system, hist_t, recording
        dg = torch.sub(gf, g_prev, out=dg_hist[:, j])
        col = torch.sub(af, a_prev, out=dz_hist[:, j])       # Δf (β = 1) or Δz
        if self.beta != 1.0:
            col.add_(dg, alpha=self.beta)
        hist_t = dg_hist[:, :m].transpose(1, 2)
        # The new Gram row, its ridge on the diagonal entry, then into row j and column j (the
        # same numbers: the system stays exactly symmetric). (Row j cannot be copied into
        # column j directly: they share the diagonal entry, and torch refuses the overlap.)
        row = torch.bmm(dg.unsqueeze(1), hist_t).squeeze(1)
        row[:, j].mul_(ridge)
        system[:, j, :m].copy_(row)
        system[:, :m, j].copy_(row)
        return dg_hist, dz_hist, system, hist_t, recording

    def _solve_masked(self, system: Tensor, rhs: Tensor, valid: Tensor, recording: bool = False) -> Tensor:
        """γ from the system restricted, per sample, to its valid slots (γ = 0 elsewhere).

        Invalid rows and columns are replaced by those of the identity and their right-hand
        side by 0, which decouples them exactly. Non-finite solutions become 0 (a plain step);
        when autograd records the step, with a finite backward (see `recorded_solve`)."""
        pair = valid.unsqueeze(2) & valid.unsqueeze(1)
        eye = torch.eye(system.shape[-1], dtype=system.dtype, device=system.device)
        system, rhs = torch.where(pair, system, eye), torch.where(valid.unsqueeze(2), rhs, 0.0)
        if recording:
            return recorded_solve(system, rhs)
        return torch.linalg.solve_ex(system, rhs)[0].nan_to_num(0.0, 0.0, 0.0)

    def _guard(self, r: Tensor, r_prev: Tensor, checked: Tensor, counts: Tensor,
               fresh: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The safeguard's per-sample decision: (reject, counts, accelerate?, check next?).

        counts [b, 4] (int64): valid history columns, plain steps still to take, rejections
        (-1: safeguard off), whether the current point came from a plain step. r_prev [b,
        WINDOW]: residuals of the last accepted points (nan fails the test). The plain steps
        after a rejection keep filling the history, so that acceleration resumes with it."""
        # (masked_fill where a branch is a constant: torch.where would make a scalar tensor)
        n_valid, wait, strikes, fell = counts.unbind(1)
        disarm = (fell > 0) & ~(r <= DISARM * r_prev[:, -1])
        strikes = strikes.masked_fill(disarm, -1)
        reject = checked & ~(r < r_prev.amax(1)) & (strikes >= 0)
        if fresh is not None:
            reject.masked_fill_(fresh, False)
        strikes = strikes + reject
        wait = torch.where(reject, torch.bitwise_left_shift(1, strikes.clamp(0, 30)) - 1,
                           (wait - 1).masked_fill_(disarm, 0).clamp_(min=0))
        n_valid = (n_valid + 1).clamp_(max=self.m).masked_fill_(reject, 0)
        if fresh is not None:
            n_valid, wait, strikes = (t.masked_fill_(fresh, 0) for t in (n_valid, wait, strikes))
        use = (wait == 0) & (n_valid > 0)
        fell = (~use).long()
        return reject, torch.stack((n_valid, wait, strikes, fell), 1), use, use & (strikes >= 0)

    def _step_safeguarded(self, state: State, z: Tensor, fz: Tensor, g: Tensor, k: int) -> Tuple[Tensor, State]:
        dg_hist, dz_hist, system, g_prev, a_prev, r_prev, checked, counts, mode = state
        gf, af = flat(g), flat(self._anchor(z, fz))
        r = torch.linalg.vector_norm(gf.detach(), dim=1)
        recording = torch.is_grad_enabled() and g.requires_grad
        if k == 0:   # (r_prev: the first residual, on the device until the first sync)
            return self._plain(g, self._anchor(z, fz)), (dg_hist, dz_hist, system, gf, af, r, checked, counts, "calm")
        m = min(k, self.m)
        # The new columns and Gram row: every path writes them alike.
        dg_hist, dz_hist, system, hist_t, _ = self._write(dg_hist, dz_hist, system, gf, af, g_prev, a_prev,
                                                          (k - 1) % self.m, m)
        if mode == "calm":
            # Until a first rejection, every sample accelerates with its whole history: the
            # textbook step, whose one host sync brings the residuals and γ to the host, where
            # the residual test, the window of residuals and γ's finiteness are decided (numpy).
            gamma = self._gamma(system, gf, hist_t, m, recording)
            if k == 1:   # the first step was plain: where it raised the residual by more than
                r0, rh, gh = to_host(r_prev, r, gamma)          # DISARM, the safeguard stands down
                r_prev, checked = np.repeat(r0[:, None], WINDOW, 1), rh <= DISARM * r0
                calm = True
            else:
                rh, gh = to_host(r, gamma)
                calm = not (checked & ~(rh < r_prev.max(1))).any()
            if calm:
                if not np.isfinite(gh).all():   # singular systems: a plain step for those samples
                    gamma = gamma.nan_to_num_(0.0, 0.0, 0.0)   # (never when recorded: zeroed already)
                z_next = self._mix(gf, af, gamma, dz_hist, m)
                return z_next.view(z.shape), (dg_hist, dz_hist, system, gf, af, shift_in(r_prev, rh), checked,
                                              counts, "calm")
            # The first rejection: the per-sample bookkeeping from here on, on the device (see `_guard`).
            b = z.shape[0]
            r_prev = torch.from_numpy(r_prev).to(z.device)
            checked = torch.from_numpy(checked).to(z.device)
            counts = torch.zeros(b, 4, dtype=torch.int64, device=z.device)
            counts[:, 0] = min(k - 1, self.m)
            counts[:, 2] = torch.where(checked, 0, -1)
            if not recording:   # (own copies of the last point, updated in place below)
                g_prev, a_prev = g_prev.clone(), a_prev.clone()
        reject, counts, use, checked = self._guard(r, r_prev, checked, counts)
        j = (k - 1) % self.m
        # Slot i was written (j - i) mod m steps ago; it is valid while younger than n_valid.
        age = torch.remainder(j - torch.arange(m, device=z.device), self.m)
        valid = (age < counts[:, :1]) & use.unsqueeze(1)
        rhs = torch.bmm(gf.unsqueeze(1), hist_t).transpose(1, 2)
        gamma = self._solve_masked(system[:, :m, :m], rhs, valid, recording)
        z_next = self._mix(gf, af, gamma, dz_hist, m).squeeze(1)
        # A rejected sample goes back to the point the rejected iterate came from and takes
        # its plain step (known already: no extra evaluation); that point stays its last.
        rej = reject.unsqueeze(1)
        if recording:
            z_next = torch.where(rej, self._plain(g_prev, a_prev), z_next)
            g_prev, a_prev = torch.where(rej, g_prev, gf), torch.where(rej, a_prev, af)
        else:
            torch.where(rej, self._plain(g_prev, a_prev), z_next, out=z_next)
            torch.where(rej, g_prev, gf, out=g_prev)
            torch.where(rej, a_prev, af, out=a_prev)
        state = (dg_hist, dz_hist, system, g_prev, a_prev, remember(r_prev, r, reject), checked, counts, "guarded")
        return z_next.view(z.shape), state

    def compact(self, state: State, keep: Tensor) -> State:
        """Drop halted rows; the history moves in place, not copied.

        Args:
            state: The solver state of the active rows.
            keep: int64 `[b_kept]`: the rows to keep, as indices into the state.

        Returns:
            The state of the kept rows, in the order of `keep`.
        """
        dg_hist, dz_hist, system, g_prev, a_prev, *rest = state
        ok = is_ascending(keep)
        owned = rest[-1] == "guarded"   # (otherwise g_prev, a_prev are views of the loop's tensors)
        return (keep_rows(dg_hist, keep, ok), keep_rows(dz_hist, keep, ok), system.index_select(0, keep),
                keep_rows(g_prev, keep, ok and owned), keep_rows(a_prev, keep, ok and owned),
                *compact_rest(rest, keep))

    def _step_rows(self, state: State, z: Tensor, fz: Tensor, g: Tensor, k: Tensor) -> Tuple[Tensor, State]:
        """One step with a per-row count k [b] (slot index); rows marked by `reset` (every row at
        the first per-row step) start afresh: fixed shapes, no host sync; slots are written per
        row with index_put and read through masks."""
        dg_hist, dz_hist, system, g_prev, a_prev, r_prev, checked, counts, pending = state
        b = z.shape[0]
        fresh = restarting(pending, k)
        if not isinstance(pending, Tensor):   # (once) slots not yet written must hold finite numbers: they meet 0·x
            dg_hist.zero_()
            dz_hist.zero_()
            system.zero_()
        if not isinstance(counts, Tensor):   # (the per-sample bookkeeping, made on first use)
            r_prev = z.new_zeros(b, WINDOW)
            checked = torch.zeros(b, dtype=torch.bool, device=z.device)
            counts = torch.zeros(b, 4, dtype=torch.int64, device=z.device)
        m, rows = self.m, torch.arange(b, device=z.device)
        gf, af = flat(g), flat(self._anchor(z, fz))
        r = torch.linalg.vector_norm(gf, dim=1)
        if self.safeguard:
            reject, counts, use, checked = self._guard(r, r_prev, checked, counts, fresh)
        else:
            reject, use = torch.zeros_like(fresh), ~fresh
            counts = (counts + torch.tensor([1, 0, 0, 0], device=z.device)).masked_fill_(fresh.unsqueeze(1), 0).clamp_(max=m)
            checked = use
        j = torch.remainder(k - 1, m)
        # The new columns (zeros for fresh rows; non-finite entries zeroed so that a diverged
        # sample never poisons the slot's next tenant).
        dg = (gf - g_prev).masked_fill_(fresh.unsqueeze(1), 0.0).nan_to_num_(0.0, 0.0, 0.0)
        col = (af - a_prev).masked_fill_(fresh.unsqueeze(1), 0.0).nan_to_num_(0.0, 0.0, 0.0)
        if self.beta != 1.0:
            col.add_(dg, alpha=self.beta)
        dg_hist.index_put_((rows, j), dg)
        dz_hist.index_put_((rows, j), col)
        row = torch.bmm(dg.unsqueeze(1), dg_hist.transpose(1, 2)).squeeze(1)
        slots = torch.arange(m, device=z.device)
        # (1 + λ on the new column's diagonal, the int path's product)
        row = torch.where(slots == j.unsqueeze(1), row * (1.0 + self._lambda(z.dtype)), row)
        system.index_put_((rows, j), row)
        system.transpose(1, 2).index_put_((rows, j), row)
        valid = (torch.remainder(j.unsqueeze(1) - slots, m) < counts[:, :1]) & use.unsqueeze(1)
        rhs = torch.bmm(gf.unsqueeze(1), dg_hist.transpose(1, 2)).transpose(1, 2)
        gamma = self._solve_masked(system, rhs, valid)
        z_acc = torch.baddbmm(self._plain(gf, af).unsqueeze(1), gamma.transpose(1, 2), dz_hist, alpha=-1.0).squeeze(1)
        rej = reject.unsqueeze(1)
        z_next = torch.where(rej, self._plain(g_prev, a_prev), z_acc)
        state = (dg_hist, dz_hist, system, torch.where(rej, g_prev, gf), torch.where(rej, a_prev, af),
                 torch.where(fresh.unsqueeze(1), r.unsqueeze(1), remember(r_prev, r, reject)), checked, counts,
                 torch.zeros_like(fresh))
        return z_next.view(z.shape), state

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

