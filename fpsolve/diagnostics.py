"""`fpsolve.diagnose`: tell per sample why a fixed-point solve (or a looped model) misbehaves.

One call runs the solve the user would run, then asks the questions each failure needs:

- plain iteration of f from z0 (the looped model as it runs): does it settle, cycle (and with
  which period), circle without a period, or grow without bound?
- the spectrum of ∂f/∂z at the returned point, by batched Arnoldi on Jacobian-vector
  products (`_spectral`): is the point attracting (spectral radius < 1)?
- a Newton step (I − ∂f/∂z)⁻¹ (f(z) − z) in the same Krylov space: how far is the point from
  the true fixed point, compared with the tolerance it passed?
- restarts from the origin and from points spread around the solution: same fixed point?
- the linear response of the fixed point to a small change of x: does it depend on x at all?
- the user's own `check(z, x)`: is the fixed point the right one?

Every step is batched over samples; a sample's flags depend on that sample alone.
"""
from __future__ import annotations

import enum
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _spectral
from ._solution import Solution, Status
from ._options import SOLVE_DEFAULTS, Options
from ._solve import solve_with
from ._tree import StateLayout, select_rows, tensors_in

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
#: Relative size of the random perturbation of x used for the sensitivity.
PERTURBATION = 1e-2
#: A cycle closes when z_t and z_(t-p) are this close, relative to the orbit's diameter.
CYCLE_CLOSURE = 1e-3
#: States wider than this are stored as a random sign sketch of this width for cycle detection.
SKETCH_WIDTH = 1024
#: Divergence, as the solve's loop defines it: a residual above this multiple of the sample's
#: starting scale max(||f(z0) - z0|| + ||f(z0)||, sqrt(n)) (1 for the 'inf' norm), or non-finite.
DIVERGENCE_FACTOR = 1e6
#: Plain iteration whose residual falls by less than this fraction per step does not settle.
FLAT_RATE = 1e-3
#: A residual falling at most this much per iteration contracts quickly: a sample that still
#: ran out of budget needed more iterations, not a better map.
QUICK_RATE = 0.5
#: A restart's fixed point attracts when plain iteration from it, moved by this fraction of the
#: sample's scale, comes back (a repelling root reached exactly is not a second attractor).
NUDGE = 1e-3


class Flag(enum.Enum):
    """What can be wrong with one sample's fixed point (see `Report.flags`).

    Members, worst first: `DIVERGENCE` (iterates or residuals grow without bound or turn
    non-finite), `FALSE_HALT` (the step passed the tolerance but the estimated distance to the
    fixed point is 10x the tolerance or more), `INCONSISTENT` (the state settled but the
    user's `check(z, x)` says it is wrong), `OSCILLATION` (plain iteration cycles or circles),
    `UNSTABLE_FIXED_POINT` (a root with spectral radius >= 1: plain iteration cannot settle
    there), `STAGNATION` (the residual stopped falling well above the tolerance),
    `SLOW_CONTRACTION` (converges, but so slowly that the budget was spent or nearly),
    `PATH_DEPENDENCE` (restarts reach another fixed point), `INPUT_INSENSITIVE` (the fixed
    point barely depends on x), `BUDGET_TOO_SMALL` (the budget ran out before f could be
    judged). `flag.message` says what to try.

    Example:
        ```python
        flip = lambda z: -z + 1.0   # plain iteration from 0 cycles: 0, 1, 0, ...
        report = fpsolve.diagnose(flip, torch.zeros(1, 2), solver="fixed_point", max_iter=20)
        assert fpsolve.Flag.OSCILLATION in report.flags[0] and int(report.period[0]) == 2
        print(fpsolve.Flag.OSCILLATION.message)
        ```
    """

    DIVERGENCE = "divergence"
    FALSE_HALT = "false_halt"
    INCONSISTENT = "inconsistent"
    OSCILLATION = "oscillation"
    UNSTABLE_FIXED_POINT = "unstable_fixed_point"
    STAGNATION = "stagnation"
    SLOW_CONTRACTION = "slow_contraction"
    PATH_DEPENDENCE = "path_dependence"
    INPUT_INSENSITIVE = "input_insensitive"
    BUDGET_TOO_SMALL = "budget_too_small"

    @property
    def severity(self) -> int:
        """Rank used to list samples worst first (0 is the worst): the member's position.

        Returns:
            0 for `DIVERGENCE`, up to `len(Flag) - 1` for `BUDGET_TOO_SMALL`.

        Example:
            ```python
            assert fpsolve.Flag.DIVERGENCE.severity < fpsolve.Flag.SLOW_CONTRACTION.severity
            ```
        """
        return list(Flag).index(self)

    @property
    def message(self) -> str:
        """One line: what the flag means and what to try.

        Returns:
            The message that `print(report)` lists under "what the flags mean".

        Example:
            ```python
            print(fpsolve.Flag.FALSE_HALT.message)
            ```
        """
        return _MESSAGES[self]


_MESSAGES = {
    Flag.DIVERGENCE: (
        "iterates or residuals grow without bound or turn non-finite; try damping "
        "(FixedPointIteration(damping=0.5), Anderson(beta=0.5)), a smaller step (scale the "
        "residual branch down), spectral normalisation, a normalisation of the state itself, "
        "or a different init."
    ),
    Flag.FALSE_HALT: (
        "the step passed the tolerance but the estimated distance to the fixed point (a Newton "
        "step, about residual / (1 - contraction)) is 10x the tolerance or more; try a "
        "tighter rtol/atol, an accelerated solver, normalise the state so its norm cannot grow, or "
        "make f contract faster (spectral normalisation)."
    ),
    Flag.INCONSISTENT: (
        "the state settled but your check(z, x) says this fixed point is wrong, a false halt "
        "that residual, spectrum and restarts do not show; try more iterations, another init, "
        "or retraining, and trust the check over the residual."
    ),
    Flag.OSCILLATION: (
        "plain iteration of f cycles (period >= 2) or circles without settling, so the looped "
        "model never settles; try damping, an accelerated solver, a smaller step, or spectral "
        "normalisation so that f contracts."
    ),
    Flag.UNSTABLE_FIXED_POINT: (
        "the solver found a root, but the spectral radius of df/dz there is >= 1, so plain "
        "iteration (the looped model as it runs) cannot settle at it; try keeping the "
        "accelerated solver at inference, or make f contract there (damping, spectral "
        "normalisation)."
    ),
    Flag.STAGNATION: (
        "the residual stopped falling well above the tolerance, with no cycle or divergence "
        "to explain it: f may be noisy (dropout, sampling), non-smooth, or the tolerance below its "
        "precision; try a deterministic f (eval mode), a looser tolerance or float64, a damped "
        "fixed-point solver instead of Anderson, or a different init."
    ),
    Flag.SLOW_CONTRACTION: (
        "it contracts, but so slowly (spectral radius or residual rate near 1) that the "
        "budget was spent or nearly; try more iterations (max_iter), an accelerated solver "
        "('anderson', 'broyden'), or spectral normalisation to make f contract faster."
    ),
    Flag.PATH_DEPENDENCE: (
        "restarts from the origin and from points spread around the solution reached another "
        "fixed point: f has several attractors and the answer depends on z0; try a deliberate "
        "init, or make f contract (spectral normalisation) so that the fixed point is unique."
    ),
    Flag.INPUT_INSENSITIVE: (
        "the fixed point barely moves when x moves (relative sensitivity < 0.01): the state "
        "collapsed onto an input-independent point; try injecting x more strongly (at every "
        "pass, at a larger scale), a weaker weight on z, or look for saturated activations."
    ),
    Flag.BUDGET_TOO_SMALL: (
        "the budget ran out before f could be judged: too few iterations to measure a rate, or "
        "the residual was still falling quickly (f contracts; it needed more passes); try a "
        "larger max_iter (the sample's note says about how many more)."
    ),
}


@dataclass
class Report:
    """Per-sample diagnosis of a fixed-point map, returned by `diagnose` (tensors `[B]` unless noted).

    `print(report)` shows `report.summary()`: the flagged samples worst first, what each flag
    means and what to try. The fields after `solution` are the evidence the flags were
    decided on.

    Attributes:
        flags: A list of length B; `flags[i]` is the frozenset of `Flag`s of sample i (empty:
            a healthy, unique, attracting fixed point).
        period: int64: the cycle length of plain iteration of f (0: it settles, or no cycle
            up to `max_period` was found).
        spectral_radius: An estimate of the spectral radius of ∂f/∂z at the returned point.
        solution: The `Solution` of the solve it ran.
        eigenvalues: `[B, k]` complex Ritz values: the estimate of the outer spectrum of ∂f/∂z.
        tolerance: The sample's halting tolerance atol + rtol ||f(z)|| at the returned point.
        distance: The estimated distance ||z - z*|| to the fixed point.
        contraction: Residual decay per iteration of the solve (nan: too few iterations).
        sensitivity: Relative change of z* over relative change of x (nan: no floating x).
        restart_distance: The largest distance from the solution to a converged restart's
            fixed point (nan: none).
        plain_trace: `[N, B]` residual of plain iteration of f from z0 (nan once it stopped).
        jacobian: How J v was taken: "forward" (forward-mode AD) or "differences".
        evaluations: Rows passed through f by each part of the diagnosis.
        notes: Anything that did not run as planned (reported, never raised).
        options: The solve options used.
        sample_notes: Per sample, what its flags alone do not say ("" when nothing), e.g. how
            many more iterations a `BUDGET_TOO_SMALL` sample needed.

    Example:
        ```python
        report = fpsolve.diagnose(lambda z, x: 0.5 * z + x, torch.zeros(3, 2), torch.randn(3, 2))
        assert bool(report.healthy.all()) and report.flags == [frozenset()] * 3
        assert torch.allclose(report.spectral_radius, torch.full((3,), 0.5), atol=1e-3)
        print(report)
        ```
    """

    flags: List[FrozenSet[Flag]]
    period: Tensor
    spectral_radius: Tensor
    solution: Solution
    #: Ritz values [B, k] (complex): the estimate of the outer spectrum of ∂f/∂z
    eigenvalues: Tensor
    #: the sample's halting tolerance atol + rtol ||f(z)|| at the returned point
    tolerance: Tensor
    #: estimated distance ||z - z*|| to the fixed point (Newton step in a Krylov space)
    distance: Tensor
    #: residual decay per iteration of the solve, from its trace (nan: too few iterations)
    contraction: Tensor
    #: relative change of z* over relative change of x (nan: x not given or not floating)
    sensitivity: Tensor
    #: largest distance from the solution to a converged restart's fixed point (nan: none)
    restart_distance: Tensor
    #: residual of plain iteration of f from z0 at each step [N, B] (nan once it stopped)
    plain_trace: Tensor
    #: "forward" (forward-mode AD) or "differences" (central differences): how J v was taken
    jacobian: str
    #: rows passed through f by each part of the diagnosis ("jvp": forward-mode products)
    evaluations: Dict[str, int]
    #: anything that did not run as planned (a step that failed is reported, never raised)
    notes: List[str] = field(default_factory=list)
    #: the solve options used (solver, atol, rtol, max_iter, halting, norm)
    options: Dict[str, Any] = field(default_factory=dict)
    #: per sample: what the flags alone do not say ("" when nothing), e.g. for BUDGET_TOO_SMALL
    sample_notes: List[str] = field(default_factory=list)

    @property
    def healthy(self) -> Tensor:
        """bool `[B]`: the sample has no flag.

        Returns:
            True where `flags[i]` is empty.
        """
        return torch.tensor([not s for s in self.flags], dtype=torch.bool)

    def mask(self, flag: Flag) -> Tensor:
        """bool `[B]`: the samples that carry `flag`.

        Args:
            flag: The `Flag` to look for.

        Returns:
            True where `flag in flags[i]`.

        Example:
            ```python
            flip = lambda z: -z + 1.0
            report = fpsolve.diagnose(flip, torch.zeros(2, 1), solver="fixed_point", max_iter=20)
            assert report.mask(fpsolve.Flag.OSCILLATION).tolist() == [True, True]
            ```
        """
        return torch.tensor([flag in s for s in self.flags], dtype=torch.bool)

    def order(self) -> List[int]:
        """Sample indices, worst first (most severe flag, then most flags, then index).

        Returns:
            A permutation of `range(B)`; healthy samples come last.
        """
        def key(i: int) -> Tuple[int, int, int]:
            s = self.flags[i]
            worst = min((f.severity for f in s), default=len(Flag))
            return (worst, -len(s), i)
        return sorted(range(len(self.flags)), key=key)

    def describe(self, i: int) -> str:
        """One line on sample i: its flags, status, iterations, residual and spectrum.

        Args:
            i: The sample's index in the batch.

        Returns:
            E.g. "sample 0: OSCILLATION (period 2); MAX_ITER after 20 iterations, ...".
        """
        sol = self.solution
        names = []
        for flag in sorted(self.flags[i], key=lambda f: f.severity):
            name = flag.name
            if flag is Flag.OSCILLATION:
                p = int(self.period[i])
                name += f" (period {p})" if p else " (no period found)"
            names.append(name)
        status = Status(int(sol.status[i])).name
        parts = [f"{status} after {int(sol.iterations[i])} iterations",
                 f"residual {float(sol.residual[i]):.3g} (tolerance {float(self.tolerance[i]):.3g})",
                 f"spectral radius {float(self.spectral_radius[i]):.4g}"]
        if Flag.FALSE_HALT in self.flags[i]:
            parts.append(f"distance to the fixed point ~{float(self.distance[i]):.3g}")
        if Flag.INPUT_INSENSITIVE in self.flags[i]:
            parts.append(f"sensitivity {float(self.sensitivity[i]):.2g}")
        if Flag.PATH_DEPENDENCE in self.flags[i]:
            parts.append(f"restart landed {float(self.restart_distance[i]):.3g} away")
        head = ", ".join(names) if names else "healthy"
        note = self.sample_notes[i] if i < len(self.sample_notes) else ""
        return f"sample {i}: {head}; " + ", ".join(parts) + (f" ({note})" if note else "")

    def summary(self, max_lines: int = 20) -> str:
        """The readable per-sample account that `str(report)` prints, worst first.

        Args:
            max_lines: The most flagged samples listed one per line.

        Returns:
            A header line (flagged and healthy counts, solver options, rows spent), a line per
            flagged sample, the flag counts, each present flag's message, the healthy samples'
            indices and the notes.
        """
        B = len(self.flags)
        flagged = [i for i in self.order() if self.flags[i]]
        o = self.options
        lines = [
            f"fpsolve.diagnose: {len(flagged)} of {B} samples flagged, {B - len(flagged)} healthy "
            f"(solver {o.get('solver')!s}, rtol {o.get('rtol')}, atol {o.get('atol')}, "
            f"max_iter {o.get('max_iter')}; J v by {self.jacobian}; "
            f"{sum(self.evaluations.values())} rows through f and J v)"
        ]
        for i in flagged[:max_lines]:
            lines.append("  " + self.describe(i))
        if len(flagged) > max_lines:
            lines.append(f"  ... and {len(flagged) - max_lines} more flagged samples")
        present = sorted({f for s in self.flags for f in s}, key=lambda f: f.severity)
        if present:
            counts = ", ".join(f"{f.name} {int(self.mask(f).sum())}" for f in present)
            lines.append(f"flag counts: {counts}")
            lines.append("what the flags mean and what to try:")
            lines.extend(f"  {f.name}: {f.message}" for f in present)
        healthy = [i for i in range(B) if not self.flags[i]]
        if healthy:
            shown = ", ".join(str(i) for i in healthy[:30]) + (", ..." if len(healthy) > 30 else "")
            lines.append(f"healthy samples (unique, attracting fixed point), by index: [{shown}]")
        lines.extend(f"note: {n}" for n in dict.fromkeys(self.notes))   # (each note once)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        B = len(self.flags)
        n = sum(1 for s in self.flags if s)
        return f"Report(B={B}, flagged={n})"

    def plot(self, **kwargs: Any) -> Any:
        """A matplotlib figure: residual traces (flagged samples highlighted) and the spectrum.

        Three panels: the solve's residual per sample, plain iteration's residual, and each
        sample's Ritz values against the unit circle; flagged samples in the colour of their
        worst flag.

        Args:
            **kwargs: `max_samples` (the most samples drawn, default 200) and `title`.

        Returns:
            A `matplotlib.figure.Figure` (matplotlib is an optional dependency, imported here).

        Example:
            ```python
            import matplotlib
            matplotlib.use("Agg")
            report = fpsolve.diagnose(lambda z, x: 0.5 * z + x, torch.zeros(3, 2), torch.randn(3, 2))
            fig = report.plot(title="a healthy contraction")   # fig.savefig("report.png") to keep it
            assert len(fig.axes) >= 3
            ```
        """
        from .plot import plot_report   # matplotlib is an optional extra
        return plot_report(self, **kwargs)


# --- helpers ------------------------------------------------------------------------------



def _norm(t: Tensor, norm: str) -> Tensor:
    """Per-row norm of a [R, n] tensor ('l2' or 'inf', as the solve measures)."""
    return torch.linalg.vector_norm(t, dim=1) if norm == "l2" else t.abs().amax(dim=1)


def _start_scale(r0: Tensor, f0: Tensor, n: int, norm: str) -> Tensor:
    """max(||f(z0) - z0|| + ||f(z0)||, floor): growth is judged against it (floor: the norm
    of a state of ones, sqrt(n) or 1), so a start near zero does not make ordinary motion of
    a bounded map look like a blow-up."""
    return (r0 + f0).clamp_min(math.sqrt(n) if norm == "l2" else 1.0)


def _window_rates(trace: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
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


class _Sketch:
    """Identity for narrow states; a random-sign count sketch for wide ones (cycle detection)."""

    def __init__(self, n: int, device: torch.device, gen: torch.Generator) -> None:
        self.n, self.width = n, min(n, SKETCH_WIDTH)
        if n > SKETCH_WIDTH:
            self.bucket = torch.randint(SKETCH_WIDTH, (n,), generator=gen).to(device)
            self.sign = (torch.randint(2, (n,), generator=gen) * 2 - 1).to(device)

    def __call__(self, z: Tensor) -> Tensor:
        if self.n <= SKETCH_WIDTH:
            return z
        out = z.new_zeros(z.shape[0], SKETCH_WIDTH)
        return out.index_add_(1, self.bucket, z * self.sign.to(z.dtype))


@dataclass
class _Plain:
    trace: Tensor       # [N, B] residual of plain iteration
    lengths: Tensor     # [B] steps taken
    settled: Tensor     # [B] the halting criterion held
    diverged: Tensor    # [B] non-finite or blown up
    grew: Tensor        # [B] the state's norm keeps growing (unbounded drift)
    period: Tensor      # [B] int64
    rows: int


def _plain_run(fn: Callable[[Tensor, Any], Tensor], z0: Tensor, x: Any, steps: int, max_period: int,
               atol: float, rtol: float, norm: str, per_sample: bool, gen: torch.Generator,
               precision: float) -> _Plain:
    """Plain iteration z <- f(z) from z0: settling, divergence, growth and the cycle period.

    Rows that settle or diverge are dropped (per-sample halting); the last max_period + 2
    states of every row are kept (sketched when wide) to find the period at the end. A row
    whose motion stays within a few units of `precision` (the machine epsilon of the user's
    dtype) of its state has settled as far as its precision allows: rounding, not a cycle.
    """
    B, n = z0.shape
    dev = z0.device
    sketch = _Sketch(n, dev, gen)
    slots = max_period + 2
    ring = z0.new_zeros(slots, B, sketch.width)
    ring[0] = sketch(z0)
    trace = z0.new_full((steps, B), float("nan"))
    state_norm = z0.new_full((steps + 1, B), float("nan"))
    state_norm[0] = torch.linalg.vector_norm(z0, dim=1)
    settled = torch.zeros(B, dtype=torch.bool, device=dev)
    diverged = torch.zeros(B, dtype=torch.bool, device=dev)
    lengths = torch.full((B,), steps, dtype=torch.int64, device=dev)
    idx = torch.arange(B, device=dev)
    z, xa, limit, rows, t = z0, x, None, 0, -1
    for t in range(steps):
        fz = fn(z, xa)
        rows += z.shape[0]
        g = fz - z
        r, fnorm = _norm(g, norm), _norm(fz, norm)
        trace[t].index_copy_(0, idx, r)
        if limit is None:
            limit = _start_scale(r, fnorm, n, norm) * DIVERGENCE_FACTOR
        done = r <= atol + rtol * fnorm
        bad = ~(r <= limit) | ~torch.isfinite(fnorm)
        if not per_sample:   # f sees the whole batch: freeze what went bad, keep the rest going
            fz = torch.where(bad.unsqueeze(1), z, fz)
            done = done & ~settled & ~diverged
            bad = bad & ~settled & ~diverged
        z = fz
        ring[(t + 1) % slots].index_copy_(0, idx, sketch(z))
        state_norm[t + 1].index_copy_(0, idx, torch.linalg.vector_norm(z, dim=1))
        stop = done | bad
        if bool(stop.any()):
            settled[idx[done & ~bad]] = True
            diverged[idx[bad]] = True
            lengths[idx[stop]] = t + 1
            if per_sample:
                keep = (~stop).nonzero().squeeze(1)
                idx, z, limit = idx[keep], z[keep], limit[keep]
                xa = select_rows(xa, keep)
                if idx.numel() == 0:
                    break
            elif bool((settled | diverged).all()):
                break
    N = t + 1   # states z_0 .. z_N exist for the rows still running at the end
    running = ~(settled | diverged)
    period = torch.zeros(B, dtype=torch.int64, device=dev)
    P = min(max_period, N - 2)
    if P >= 2:
        last = ring[N % slots]
        prev = ring[(N - 1) % slots]
        d_last = torch.stack([_norm(last - ring[(N - p) % slots], "l2") for p in range(1, P + 1)])
        d_prev = torch.stack([_norm(prev - ring[(N - 1 - p) % slots], "l2") for p in range(1, P + 1)])
        diameter = torch.maximum(d_last.amax(0), d_prev.amax(0))
        closes = (d_last <= CYCLE_CLOSURE * diameter) & (d_prev <= CYCLE_CLOSURE * diameter) & (diameter > 0)
        closes[0] = False   # period 1 is settling, not a cycle
        moving = d_last[0] > CYCLE_CLOSURE * diameter
        first = torch.where(closes.any(0), closes.to(torch.uint8).argmax(0) + 1, 0)
        rounding = running & (diameter <= 4 * precision * torch.linalg.vector_norm(last, dim=1))
        period = torch.where(running & moving & ~rounding, first, 0)
        settled |= rounding
        running &= ~rounding
    mid = state_norm.gather(0, (lengths // 2).view(1, -1)).squeeze(0)
    end = state_norm.gather(0, lengths.view(1, -1)).squeeze(0)
    start_scale = state_norm[0] + trace[0]
    grew = running & (end >= 1.5 * mid) & (end >= 10 * start_scale) & (lengths >= 8)
    return _Plain(trace[:N], lengths, settled, diverged, grew, period, rows)


def _perturb(x: Any, size: float, gen: torch.Generator) -> Tuple[Any, Tensor]:
    """x with its floating tensors moved by random noise, and the relative size of the move [B].

    Each tensor gets Gaussian noise scaled to `size` times its own per-sample RMS (so leaves
    of different scales move alike); the returned size is ||δ|| / ||x|| over all of them.
    """
    moved, base = [], []

    def visit(t: Any) -> Any:
        if isinstance(t, Tensor):
            if not t.is_floating_point() or t.ndim == 0:
                return t
            flat = t.reshape(t.shape[0], -1)
            noise = torch.randn(flat.shape, generator=gen, dtype=torch.float64).to(device=t.device, dtype=t.dtype)
            rms = torch.linalg.vector_norm(flat, dim=1, keepdim=True) / math.sqrt(max(flat.shape[1], 1))
            delta = size * rms * noise
            moved.append(delta.double().square().sum(dim=1))
            base.append(flat.double().square().sum(dim=1))
            return (flat + delta).view_as(t)
        if isinstance(t, dict):
            return {k: visit(v) for k, v in t.items()}
        if isinstance(t, (tuple, list)):
            return type(t)(visit(v) for v in t)
        return t

    out = visit(x)
    rel = (torch.stack(moved).sum(0) / torch.stack(base).sum(0)).sqrt()
    return out, rel


def _stack_rows(x: Any, copies: int) -> Any:
    """x with its batch repeated `copies` times (rows [x; x; ...]), for a stacked batch."""
    leaves = tensors_in(x)
    if copies == 1 or not leaves:
        return x
    B = leaves[0].shape[0]
    return select_rows(x, torch.arange(B, device=leaves[0].device).repeat(copies))


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


# --- diagnose -----------------------------------------------------------------------------

def diagnose(
    f: Callable[..., Any],
    z0: Any,
    x: Any = None,
    *,
    restarts: int = 2,
    check: Optional[Callable[[Any, Any], Any]] = None,
    max_period: int = 16,
    krylov: int = 8,
    plain_iter: Optional[int] = None,
    jacobian: str = "auto",
    seed: int = 0,
    **options: Any,
) -> Report:
    """Solve z = f(z, x) as `fpsolve.solve` would (same `options`) and flag, per sample, what is wrong.

    It also runs plain iteration of f (the looped model as it runs), estimates the spectrum
    of ∂f/∂z at the solution, the distance to the true fixed point and the sensitivity to x,
    and restarts from other points. Never raises on a badly behaved map (that is what it is
    for); runs without gradients, and leaves f's modules (training mode, BatchNorm
    statistics) as it found them.

    Args:
        f: The map, as for `solve`.
        z0: The starting point, as for `solve`.
        x: The input, as for `solve`.
        restarts: Extra solves from the origin and from points spread around the solution
            at its own scale (an integer >= 0; 0 skips the path check).
        check: `check(z, x) -> ` bool `[B]`: the task's own consistency rule; settled samples
            that fail it get `Flag.INCONSISTENT` (the one reliable way to catch a confident
            wrong fixed point).
        max_period: The longest cycle looked for (>= 1).
        krylov: Arnoldi steps for the spectrum, distance and sensitivity (>= 1).
        plain_iter: Budget of the plain-iteration run; None: max(max_iter, 4 max_period).
        jacobian: How J v is taken: "auto", "forward" (forward-mode AD) or "differences".
        seed: Seed of the random probes and restart points (the diagnosis is reproducible).
        **options: Keyword options of `solve` (solver, atol, rtol, max_iter, halting, norm,
            criterion, check_every); `record` and `backward` are ignored.

    Returns:
        A `Report`: per-sample `flags`, `period`, `spectral_radius`, the `solution`, and
        the evidence; `print(report)` lists the flagged samples worst first.

    Raises:
        TypeError: `check` not callable, or an option that `solve` does not take.
        ValueError: `restarts` < 0, `max_period`, `krylov` or `plain_iter` < 1, an unknown
            `jacobian`; and any argument error `solve` raises.

    Example:
        ```python
        x = torch.tensor([[0.5, 1.0], [1.5, 1.0]])   # per sample: slope, offset
        f = lambda z, x: x[:, :1] * z + x[:, 1:]     # sample 1 (slope 1.5) blows up
        report = fpsolve.diagnose(f, torch.zeros(2, 1), x, solver="fixed_point", max_iter=30)
        assert report.flags[0] == frozenset() and fpsolve.Flag.DIVERGENCE in report.flags[1]
        print(report)
        ```

    Cost (rows of f, per sample): the solve; one evaluation at the solution; the plain run
    (until it settles, at most `plain_iter`); `krylov` Jacobian-vector products (twice that
    when x is floating, for the sensitivity, plus one evaluation at the perturbed x); and
    `restarts` more solves. `report.evaluations` has the exact counts.
    """
    for name, value in (("restarts", restarts), ("max_period", max_period), ("krylov", krylov)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "restarts" else 1):
            raise ValueError(f"{name} must be an integer >= {0 if name == 'restarts' else 1}; got {value!r}.")
    if plain_iter is not None and (isinstance(plain_iter, bool) or not isinstance(plain_iter, int) or plain_iter < 1):
        raise ValueError(f"plain_iter must be a positive integer or None; got {plain_iter!r}.")
    if jacobian not in ("auto", "forward", "differences"):
        raise ValueError(f"jacobian={jacobian!r} is not known; use 'auto', 'forward' or 'differences'.")
    if check is not None and not callable(check):
        raise TypeError(f"check must be callable as check(z, x) -> bool tensor [B]; got {type(check).__name__}.")
    options = {k: v for k, v in options.items() if k not in ("record", "backward")}
    opts = Options.make("diagnose", SOLVE_DEFAULTS, options)
    atol, rtol, max_iter = opts.rule.atol, opts.rule.rtol, opts.max_iter
    norm, per_sample = opts.rule.norm, opts.per_sample

    with torch.no_grad(), _KeepState(f):
        sol = solve_with(f, z0, x, opts.replace(record=True, backward=None))
        layout = StateLayout(z0)
        return _diagnose(f, z0, x, sol, layout, restarts, check, max_period, krylov,
                         plain_iter if plain_iter is not None else max(max_iter, 4 * max_period),
                         jacobian, seed, opts, atol, rtol, max_iter, norm, per_sample,
                         dict(solver=opts.given["solver"], atol=atol, rtol=rtol, max_iter=max_iter,
                              halting=opts.halting, norm=norm))


def _diagnose(f: Callable[..., Any], z0: Any, x: Any, sol: Solution, layout: StateLayout, restarts: int,
              check: Optional[Callable[[Any, Any], Any]], max_period: int, krylov: int, plain_iter: int,
              jacobian: str, seed: int, opts: Options, atol: float, rtol: float, max_iter: int,
              norm: str, per_sample: bool, shown: Dict[str, Any]) -> Report:
    """Everything after the main solve (runs under no_grad)."""
    B, dev = layout.batch, layout.device
    gen = torch.Generator().manual_seed(seed)
    notes: List[str] = []
    evaluations = {"solve": sol.evaluations, "plain": 0, "jvp": 0, "differences": 0, "restarts": 0, "other": 0}
    if B == 0:
        empty = torch.zeros(0, dtype=layout.work_dtype, device=dev)
        return Report(flags=[], period=torch.zeros(0, dtype=torch.int64, device=dev), spectral_radius=empty,
                      solution=sol, eigenvalues=torch.zeros(0, 0, dtype=torch.complex128), tolerance=empty,
                      distance=empty, contraction=empty, sensitivity=empty, restart_distance=empty,
                      plain_trace=empty.view(0, 0), jacobian="none", evaluations=evaluations, options=shown)
    fn = layout.wrap(f, x is not None)
    z_star = layout.pack(sol.z)
    wdt = z_star.dtype
    n = z_star[0].numel() if B else 1
    nan = torch.full((B,), float("nan"), dtype=wdt, device=dev)
    k = max(1, min(krylov, n))

    # f at the returned point: the residual, the tolerance and the Newton right-hand side.
    fz = fn(z_star, x)
    evaluations["other"] += B
    g = (fz - z_star).reshape(B, -1)
    zf = z_star.reshape(B, -1)
    residual = _norm(g, norm)
    tolerance = atol + rtol * _norm(fz.reshape(B, -1), norm)
    finite = torch.isfinite(g).all(dim=1)

    converged = sol.status == int(Status.CONVERGED)
    diverged = sol.status == int(Status.DIVERGED)
    at_max = sol.status == int(Status.MAX_ITER)

    # --- plain iteration from z0 --------------------------------------------------------
    flat_fn = _flat_fn(fn, z_star.shape)
    try:
        plain = _plain_run(flat_fn, layout.pack(z0).reshape(B, -1), x, plain_iter, max_period,
                           atol, rtol, norm, per_sample, gen, torch.finfo(layout.dtype).eps)
        evaluations["plain"] = plain.rows
    except Exception as err:   # noqa: BLE001 - reported, never raised
        notes.append(f"plain iteration failed ({_short(err)}); period and oscillation not assessed")
        false = torch.zeros(B, dtype=torch.bool, device=dev)
        plain = _Plain(z_star.new_zeros(0, B), torch.zeros(B, dtype=torch.int64, device=dev),
                       false, false, false, torch.zeros(B, dtype=torch.int64, device=dev), 0)

    # --- spectrum, Newton distance and input sensitivity (one batched Arnoldi) ----------
    perturbable = any(t.is_floating_point() and t.ndim > 0 for t in tensors_in(x))
    radius, eigenvalues = nan.clone(), torch.full((B, k), complex(float("nan"), float("nan")), dtype=torch.complex128)
    distance, sensitivity, method = nan.clone(), nan.clone(), "none"
    try:
        starts, rhs = [g], [g]
        if perturbable:
            xp, moved = _perturb(x, PERTURBATION, gen)
            d = (flat_fn(zf, xp) - fz.reshape(B, -1))
            evaluations["other"] += B
            starts.append(d)
            rhs.append(d)
        copies = len(starts) if per_sample else 1
        results = []
        groups = [(torch.cat(starts), torch.cat(rhs))] if copies > 1 else list(zip(starts, rhs))
        for start, b in groups:
            reps = start.shape[0] // B
            lin = _spectral.Linearization(flat_fn, zf.repeat(reps, 1), _stack_rows(x, reps), jacobian)
            Q, H = _spectral.arnoldi(lin, start, k, gen)
            results.append((Q, H, b))
            evaluations["jvp"] += lin.jvp_rows
            evaluations["differences"] += lin.f_rows
            method = lin.method
            if lin.error:
                notes.append(f"forward-mode AD failed ({lin.error}); Jacobian-vector products by central differences")
        Q, H, b = results[0]
        ritz = _spectral.ritz_values(H[:B])
        eigenvalues = ritz.cpu()
        radius = ritz.abs().amax(dim=1).to(wdt)
        e, rel = _spectral.krylov_solve(Q[:B], H[:B], b[:B])
        step = _norm(e, norm)
        distance = torch.where(rel < 0.99, step / (1 - rel).clamp_min(1e-2), float("inf"))
        distance = torch.where(residual > 0, distance, 0.0).to(wdt)
        if perturbable:
            Qd, Hd, bd = results[1] if len(results) > 1 else (Q[B:], H[B:], b[B:])
            dz, rel_d = _spectral.krylov_solve(Qd, Hd, bd)
            change = torch.linalg.vector_norm(dz, dim=1) / (1 - rel_d).clamp_min(1e-2)
            change = torch.where(rel_d < 0.99, change, float("inf"))
            size = torch.linalg.vector_norm(zf, dim=1)
            none = torch.where(change > 0, float("inf"), 0.0)        # z* = 0: any change is infinite
            relative = torch.where(size > 0, change / size.clamp_min(1e-300), none)
            sensitivity = (relative / moved.to(relative)).to(wdt)
        radius = torch.where(finite, radius, float("nan"))
        distance = torch.where(finite, distance, float("nan"))
    except Exception as err:   # noqa: BLE001 - reported, never raised
        notes.append(f"the Jacobian analysis failed ({_short(err)}); spectral radius, distance and sensitivity are nan")

    # --- restarts ------------------------------------------------------------------------
    restart_distance = nan.clone()
    path = torch.zeros(B, dtype=torch.bool, device=dev)
    if restarts:
        nudge_gen = torch.Generator().manual_seed(seed + 1)   # (leaves the restarts' own draws as they were)
        scale = torch.maximum(torch.linalg.vector_norm(zf, dim=1),
                              torch.linalg.vector_norm(layout.pack(z0).reshape(B, -1), dim=1))
        scale = torch.where(scale > 0, scale, math.sqrt(n))
        z0_zero = layout.pack(z0).reshape(B, -1).abs().amax(dim=1) == 0
        dist_ok = torch.where(torch.isfinite(distance), distance, 0.0)
        threshold = FALSE_HALT_FACTOR * (tolerance + dist_ok) + 10 * torch.finfo(layout.dtype).eps * scale
        for i in range(restarts):
            noise = _random_like(zf, gen)
            spread = zf + noise * (scale / torch.linalg.vector_norm(noise, dim=1).clamp_min(1e-30)).unsqueeze(1)
            start = torch.where(z0_zero.unsqueeze(1), spread, 0.0) if i == 0 else spread
            try:
                rsol = solve_with(f, layout.unpack(start.view_as(z_star)), x, opts.replace(backward=None))
            except Exception as err:   # noqa: BLE001
                notes.append(f"restart {i} failed ({_short(err)})")
                continue
            evaluations["restarts"] += rsol.evaluations
            landed = layout.pack(rsol.z).reshape(B, -1)
            gap = _norm(landed - zf, norm)
            other = (rsol.status == int(Status.CONVERGED)) & (gap > threshold)
            if bool(other.any()):   # a second attractor, or a repelling root hit exactly?
                try:
                    other &= _attracting(flat_fn, landed, x, NUDGE * scale, threshold, plain_iter, norm, nudge_gen)
                    evaluations["restarts"] += B * plain_iter
                except Exception as err:   # noqa: BLE001 - reported, never raised
                    notes.append(f"the stability check of restart {i}'s fixed point failed ({_short(err)})")
            restart_distance = torch.where(other, torch.fmax(restart_distance, gap), restart_distance)
            path |= other

    # --- the user's check ------------------------------------------------------------------
    inconsistent = torch.zeros(B, dtype=torch.bool, device=dev)
    if check is not None:
        verdict = check(sol.z, x)
        verdict = torch.as_tensor(verdict, device=dev)
        if verdict.shape != (B,):
            raise ValueError(f"check(z, x) must return one bool per sample, shape ({B},); "
                             f"got shape {tuple(verdict.shape)}.")
        inconsistent = converged & ~verdict.bool()

    # --- decide ---------------------------------------------------------------------------
    fall, contraction = _window_rates(sol.trace, sol.iterations) if sol.trace is not None else (nan, nan)
    plain_fall, _ = _window_rates(plain.trace, plain.lengths)
    if sol.trace is not None and sol.trace.shape[0]:
        first_r = sol.trace[0]
        last_r = sol.trace.gather(0, (sol.iterations - 1).clamp(0, sol.trace.shape[0] - 1).view(1, -1)).squeeze(0)
    else:
        first_r = last_r = residual
    marginal = radius >= 1 - MARGIN
    slow_radius = (radius >= SLOW_RADIUS) & ~marginal
    floor = math.sqrt(n) if norm == "l2" else 1.0

    false_halt = converged & (distance > FALSE_HALT_FACTOR * tolerance)
    # Growth without bound, judged against the start's scale with a floor (see _start_scale):
    # a bounded map started near zero moves a lot relative to its tiny first residual.
    grew_trace = ~converged & ~(last_r < 1e3 * first_r.clamp_min(floor))   # (a non-finite one counts)
    divergence = diverged | (~converged & (plain.diverged | (plain.grew & marginal) | grew_trace))
    # Circling: plain iteration neither settles, diverges nor grows, and its residual does not
    # fall near a marginal radius, or never fell at all (an isometry: its flat residual wins
    # over a low Krylov estimate of the radius, which a few Arnoldi steps can give).
    moving = ~plain.settled & ~plain.diverged & ~plain.grew
    circling = moving & ((~(plain_fall < 0.5) & marginal) | _never_fell(plain.trace, plain.lengths))
    oscillation = (plain.period >= 2) | circling
    unstable = converged & marginal & ~false_halt
    still = at_max & ~divergence & ~oscillation
    falling = fall < 0.5
    # A budget too small to judge: under 4 iterations (no rate), or spent while the residual
    # still fell quickly; neither is f's fault.
    quick = (contraction <= QUICK_RATE) & ~slow_radius & ~marginal
    unjudged = still & (torch.isnan(fall) | (falling & quick))
    late = converged & ~marginal & ~oscillation & ~quick & ~torch.isnan(contraction) & (
        sol.iterations >= max(2.0, BUDGET_FRACTION * max_iter))
    slow = (still & ~unjudged & (falling | slow_radius)) | late
    stagnation = still & ~unjudged & ~slow
    settled_ok = converged & ~false_halt
    path = path & settled_ok
    insensitive = settled_ok & (sensitivity < INSENSITIVE)
    sample_notes = _budget_notes(unjudged, sol.iterations, contraction, residual, tolerance)

    table = [
        (Flag.DIVERGENCE, divergence), (Flag.FALSE_HALT, false_halt), (Flag.INCONSISTENT, inconsistent),
        (Flag.OSCILLATION, oscillation), (Flag.UNSTABLE_FIXED_POINT, unstable), (Flag.STAGNATION, stagnation),
        (Flag.SLOW_CONTRACTION, slow), (Flag.PATH_DEPENDENCE, path), (Flag.INPUT_INSENSITIVE, insensitive),
        (Flag.BUDGET_TOO_SMALL, unjudged),
    ]
    matrix = torch.stack([m.to(torch.bool).cpu() for _, m in table], dim=1).tolist()
    flags = [frozenset(fl for (fl, _), on in zip(table, row) if on) for row in matrix]
    return Report(
        flags=flags, period=plain.period, spectral_radius=radius, solution=sol, eigenvalues=eigenvalues,
        tolerance=tolerance, distance=distance, contraction=contraction, sensitivity=sensitivity,
        restart_distance=restart_distance, plain_trace=plain.trace, jacobian=method,
        evaluations=evaluations, notes=list(dict.fromkeys(notes)), options=shown, sample_notes=sample_notes,
    )


def _never_fell(trace: Tensor, lengths: Tensor) -> Tensor:
    """bool [B]: over a plain run of 8 steps or more, the residual fell by less than FLAT_RATE
    per step from the first step to the last (it moves, but makes no progress at all)."""
    if trace.shape[0] == 0:
        return torch.zeros(trace.shape[1], dtype=torch.bool, device=trace.device)
    L = lengths.clamp(min=1, max=trace.shape[0])
    first, last = trace[0], trace.gather(0, (L - 1).view(1, -1)).squeeze(0)
    per_step = (last / first).pow(1.0 / (L - 1).clamp(min=1).to(trace.dtype))
    return (L >= 8) & (per_step >= 1 - FLAT_RATE) & (first > 0)


def _budget_notes(unjudged: Tensor, iterations: Tensor, rate: Tensor, residual: Tensor,
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


def _attracting(fn: Callable[[Tensor, Any], Tensor], point: Tensor, x: Any, nudge: Tensor, slack: Tensor,
                steps: int, norm: str, gen: torch.Generator) -> Tensor:
    """bool [B]: plain iteration from `point` moved by `nudge` (a random direction) comes back
    to within 2 nudge + slack of it after `steps` passes (a repelling fixed point does not)."""
    noise = _random_like(point, gen)
    z = point + noise * (nudge / torch.linalg.vector_norm(noise, dim=1).clamp_min(1e-30)).unsqueeze(1)
    for _ in range(steps):
        z = fn(z, x)
    return _norm(z - point, norm) <= 2 * nudge + slack


def _modules_of(f: Any, depth: int = 3) -> List[nn.Module]:
    """The nn.Modules that f can reach: f itself, a bound method's object, a partial's parts,
    closure cells, globals that f names, and attributes of plain objects (a few levels deep)."""
    found: List[nn.Module] = []
    seen: set = set()

    def visit(o: Any, d: int) -> None:
        if id(o) in seen or d < 0 or isinstance(o, (Tensor, type, str, bytes, int, float)) or inspect.ismodule(o):
            return
        seen.add(id(o))
        if isinstance(o, nn.Module):
            found.append(o)
        elif inspect.ismethod(o):
            visit(o.__self__, d - 1)
            visit(o.__func__, d - 1)
        elif isinstance(o, functools.partial):
            for v in (o.func, *o.args, *o.keywords.values()):
                visit(v, d - 1)
        elif inspect.isfunction(o):
            for cell in o.__closure__ or ():
                try:
                    visit(cell.cell_contents, d - 1)
                except ValueError:   # an empty cell
                    pass
            for name in o.__code__.co_names:
                if name in o.__globals__:
                    visit(o.__globals__[name], d - 1)
        elif isinstance(o, (list, tuple, set, dict)) and len(o) <= 256:   # (not a data set)
            for v in (o.values() if isinstance(o, dict) else o):
                visit(v, d - 1)
        elif hasattr(o, "__dict__"):
            for v in vars(o).values():
                visit(v, d - 1)

    visit(f, depth)
    return found


class _KeepState:
    """Snapshot the buffers (BatchNorm running statistics, spectral_norm's vectors, ...),
    training flags and SharedDropout masks of the modules f can reach; restore them on exit,
    so that diagnosing a map leaves it as it was found."""

    def __init__(self, f: Any) -> None:
        self.saved = []
        for top in _modules_of(f):
            for m in top.modules():
                buffers = {k: (b, b.detach().clone()) for k, b in m._buffers.items() if b is not None}
                self.saved.append((m, m.training, buffers, m.__dict__.get("mask")))

    def __enter__(self) -> "_KeepState":
        return self

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for m, training, buffers, mask in self.saved:
                m.training = training
                for name, (buf, value) in buffers.items():
                    m._buffers[name] = buf
                    buf.copy_(value)
                if "mask" in m.__dict__:
                    m.__dict__["mask"] = mask


def _random_like(t: Tensor, gen: torch.Generator) -> Tensor:
    """Standard normal noise shaped like t (drawn on the CPU generator, so seeds are portable)."""
    return torch.randn(t.shape, generator=gen, dtype=torch.float64).to(device=t.device, dtype=t.dtype)


def _flat_fn(fn: Callable[[Tensor, Any], Tensor], shape: torch.Size) -> Callable[[Tensor, Any], Tensor]:
    """fn on [R, n] rows for a loop state of `shape` [B, ...] (identity when already flat)."""
    if len(shape) == 2:
        return fn
    inner = tuple(shape[1:])
    return lambda z, xa: fn(z.reshape((z.shape[0],) + inner), xa).reshape(z.shape[0], -1)


__all__ = ["Flag", "Report", "diagnose"]
