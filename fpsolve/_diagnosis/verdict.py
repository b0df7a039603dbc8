"""The flag decisions: a pure function of measured numbers (`Measurements` in, `Verdict` out).

Nothing here calls f: every number was measured before (the solve, plain iteration, the
Krylov analysis, the restarts, the user's check), so each rule can be read, and tested, on
its own. The thresholds are the documented ones (docs/diagnosing.md, "The flags").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import FrozenSet, List, Optional, Tuple

import torch
from torch import Tensor

from .._rules import floor
from .._solution import Status
from .plain import Plain
from .report import Flag

#: A halt is false when the estimated distance to the fixed point exceeds the tolerance by this.
FALSE_HALT_FACTOR = 10.0
#: A spectral radius within this of 1 counts as >= 1 (the estimate's accuracy on exact maps).
MARGIN = 1e-4
#: A spectral radius at least this (and below 1) is a slow contraction.
SLOW_RADIUS = 0.9
#: A converged sample that used at least this fraction of max_iter contracted slowly.
BUDGET_FRACTION = 0.8
#: Relative sensitivity (relative change of z* over relative change of x) below this: collapse.
INSENSITIVE = 1e-2
#: Plain iteration whose residual falls by less than this fraction per step does not settle.
FLAT_RATE = 1e-3
#: A residual falling at most this much per iteration contracts quickly: a sample that still
#: ran out of budget needed more iterations, not a better map.
QUICK_RATE = 0.5


@dataclass
class Measurements:
    """Everything the flags are decided on, per sample (`[B]` tensors unless noted)."""

    status: Tensor               # the solve's status codes
    iterations: Tensor           # the solve's iteration counts
    max_iter: int
    trace: Optional[Tensor]      # [T, B] the solve's residual trace
    residual: Tensor             # ||f(z) - z|| at the returned point
    tolerance: Tensor            # atol + rtol ||f(z)|| there
    rule_holds: Tensor           # the residual rule in force holds there (a fixed point)
    criterion: bool              # another criterion (not the residual rule) decided the halts
    radius: Tensor               # spectral radius estimate of df/dz there
    distance: Tensor             # Newton estimate of ||z - z*||
    sensitivity: Tensor          # relative response of z* to x (nan: none)
    plain: Plain                 # plain iteration from z0
    path: Tensor                 # a restart reached another attracting fixed point
    check_failed: Tensor         # the user's check(z, x) said False
    n: int                       # entries per sample
    norm: str                    # "l2" or "inf"


@dataclass
class Verdict:
    """The flags of each sample, what they alone do not say, and the solve's contraction rate."""

    flags: List[FrozenSet[Flag]]
    sample_notes: List[str]
    contraction: Tensor


def decide(m: Measurements) -> Verdict:
    """Each sample's flags from its measurements (see docs/diagnosing.md for every rule)."""
    diverged = m.status == int(Status.DIVERGED)
    halted = m.status == int(Status.HALTED)
    # Under another criterion, the residual rule says whether a sample is at a fixed point: one
    # halted where it fails is not (a false halt, whatever its answer); one at a fixed point
    # that the criterion never halted spent its budget there (no budget or stagnation verdict).
    away = halted & ~m.rule_holds
    unfired = (m.status == int(Status.MAX_ITER)) & m.rule_holds & m.criterion
    converged = (m.status == int(Status.CONVERGED)) | (halted & m.rule_holds) | unfired
    at_max = (m.status == int(Status.MAX_ITER)) & ~unfired
    plain = m.plain
    fall, contraction = window_rates(m.trace, m.iterations) if m.trace is not None else (m.radius * float("nan"),) * 2
    plain_fall, _ = window_rates(plain.trace, plain.lengths)
    first_r, last_r = _ends(m.trace, m.iterations, m.residual)
    marginal = m.radius >= 1 - MARGIN
    slow_radius = (m.radius >= SLOW_RADIUS) & ~marginal

    false_halt = away | (converged & (m.distance > FALSE_HALT_FACTOR * m.tolerance))
    # Growth without bound, judged against the start's scale with a floor (as the loop's rule):
    # a bounded map started near zero moves a lot relative to its tiny first residual.
    grew_trace = ~converged & ~(last_r < 1e3 * first_r.clamp_min(floor(m.n, m.norm)))   # (non-finite counts)
    divergence = diverged | (~converged & (plain.diverged | (plain.grew & marginal) | grew_trace))
    # Circling: plain iteration neither settles, diverges nor grows, and its residual does not
    # fall near a marginal radius, or never fell at all (an isometry: its flat residual wins
    # over a low Krylov estimate of the radius, which a few Arnoldi steps can give).
    moving = ~plain.settled & ~plain.diverged & ~plain.grew
    circling = moving & ((~(plain_fall < 0.5) & marginal) | never_fell(plain.trace, plain.lengths))
    oscillation = (plain.period >= 2) | circling
    unstable = converged & marginal & ~false_halt
    still = at_max & ~divergence & ~oscillation
    falling = fall < 0.5
    # A budget too small to judge: under 4 iterations (no rate), or spent while the residual
    # still fell quickly; neither is f's fault.
    quick = (contraction <= QUICK_RATE) & ~slow_radius & ~marginal
    unjudged = still & (torch.isnan(fall) | (falling & quick))
    late = converged & ~unfired & ~marginal & ~oscillation & ~quick & ~torch.isnan(contraction) & (
        m.iterations >= max(2.0, BUDGET_FRACTION * m.max_iter))
    slow = (still & ~unjudged & (falling | slow_radius)) | late
    stagnation = still & ~unjudged & ~slow
    settled_ok = converged & ~false_halt
    table = [
        (Flag.DIVERGENCE, divergence), (Flag.FALSE_HALT, false_halt),
        (Flag.INCONSISTENT, converged & m.check_failed), (Flag.OSCILLATION, oscillation),
        (Flag.UNSTABLE_FIXED_POINT, unstable), (Flag.STAGNATION, stagnation), (Flag.SLOW_CONTRACTION, slow),
        (Flag.PATH_DEPENDENCE, m.path & settled_ok),
        (Flag.INPUT_INSENSITIVE, settled_ok & (m.sensitivity < INSENSITIVE)), (Flag.BUDGET_TOO_SMALL, unjudged),
    ]
    notes = budget_notes(unjudged, m.iterations, contraction, m.residual, m.tolerance)
    return Verdict(_flag_sets(table), _criterion_notes(notes, away, unfired, m), contraction)


def _criterion_notes(notes: List[str], away: Tensor, unfired: Tensor, m: Measurements) -> List[str]:
    """`notes` with what a criterion's halt (or its silence) means for each sample it concerns."""
    out = list(notes)
    for i, (a, u, r, t) in enumerate(zip(away.tolist(), unfired.tolist(), m.residual.tolist(), m.tolerance.tolist())):
        if a:
            out[i] = (f"halted by the criterion away from a fixed point: residual {r:.3g} above the "
                      f"residual rule's tolerance {t:.3g} (its answer may still be right: test it with check=)")
        elif u:
            out[i] = "at a fixed point (the residual rule holds), but the criterion did not halt it within max_iter"
    return out


def _ends(trace: Optional[Tensor], iterations: Tensor, residual: Tensor) -> Tuple[Tensor, Tensor]:
    """The solve's first and last recorded residual per sample (the final one without a trace)."""
    if trace is None or not trace.shape[0]:
        return residual, residual
    last = trace.gather(0, (iterations - 1).clamp(0, trace.shape[0] - 1).view(1, -1)).squeeze(0)
    return trace[0], last


def _flag_sets(table: List[Tuple[Flag, Tensor]]) -> List[FrozenSet[Flag]]:
    """Per sample, the set of flags whose mask is set (one transfer to the host)."""
    matrix = torch.stack([m.to(torch.bool).cpu() for _, m in table], dim=1).tolist()
    return [frozenset(fl for (fl, _), on in zip(table, row) if on) for row in matrix]


def window_rates(trace: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
    """Per sample from a residual trace [T, B] with `lengths` valid rows: (fall, rate).

    fall: geometric mean of the residual over the last quarter of the sample's iterations
    divided by that over the quarter before its midpoint (robust to noise); rate: the same
    decay per iteration. nan for fewer than 4 iterations.
    """
    T, B = trace.shape
    if T == 0:
        nan = trace.new_full((B,), float("nan"))
        return nan, nan
    L = lengths.clamp(min=1, max=T).to(torch.int64)
    tiny = torch.finfo(trace.dtype).tiny
    logr = torch.log(trace.abs().clamp_min(tiny).double())
    logr = torch.where(torch.isfinite(logr), logr, 0.0)
    C = torch.cat([logr.new_zeros(1, B), logr.cumsum(0)])
    w = (L // 4).clamp(min=1)
    mid_e = L // 2
    mid_s = (mid_e - w).clamp(min=0)
    last_s = L - w

    def mean(s: Tensor, e: Tensor) -> Tensor:
        return (C.gather(0, e.view(1, -1)) - C.gather(0, s.view(1, -1))).squeeze(0) / (e - s).clamp(min=1)

    gap = ((last_s + L) - (mid_s + mid_e)).double() / 2
    log_fall = mean(last_s, L) - mean(mid_s, mid_e)
    short = L < 4
    fall = torch.where(short, float("nan"), log_fall.exp())
    rate = torch.where(short, float("nan"), (log_fall / gap.clamp(min=1)).exp())
    return fall.to(trace.dtype), rate.to(trace.dtype)


def never_fell(trace: Tensor, lengths: Tensor) -> Tensor:
    """bool [B]: over a plain run of 8 steps or more, the residual fell by less than FLAT_RATE
    per step from the first step to the last (it moves, but makes no progress at all)."""
    if trace.shape[0] == 0:
        return torch.zeros(trace.shape[1], dtype=torch.bool, device=trace.device)
    L = lengths.clamp(min=1, max=trace.shape[0])
    first, last = trace[0], trace.gather(0, (L - 1).view(1, -1)).squeeze(0)
    per_step = (last / first).pow(1.0 / (L - 1).clamp(min=1).to(trace.dtype))
    return (L >= 8) & (per_step >= 1 - FLAT_RATE) & (first > 0)


def budget_notes(unjudged: Tensor, iterations: Tensor, rate: Tensor, residual: Tensor,
                 tolerance: Tensor) -> List[str]:
    """Per sample, what a budget too small to judge means in numbers ("" elsewhere)."""
    need = torch.log(tolerance / residual) / torch.log(rate)     # iterations still needed
    rows = zip(unjudged.tolist(), iterations.tolist(), rate.tolist(), need.tolist())
    notes = []
    for bad, it, q, more in rows:
        if not bad:
            notes.append("")
        elif math.isnan(q):
            notes.append(f"budget too small to judge: {it} iterations give no rate (4 or more are needed)")
        else:
            extra = f"; about {math.ceil(more)} more would meet the tolerance" if math.isfinite(more) and more > 0 else ""
            notes.append(f"budget too small: the residual still fell quickly, ×{q:.2g} per iteration{extra}")
    return notes


__all__ = ["Measurements", "Verdict", "decide", "window_rates", "never_fell", "budget_notes",
           "FALSE_HALT_FACTOR", "MARGIN", "SLOW_RADIUS", "BUDGET_FRACTION", "INSENSITIVE", "FLAT_RATE",
           "QUICK_RATE"]
