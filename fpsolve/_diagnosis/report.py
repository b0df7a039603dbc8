"""`Flag` and `Report`: what `fpsolve.diagnose` finds, its messages, colours and text.

This module holds no analysis: the report is built by `entry.diagnose` from the decisions of
`verdict.decide`, and `Report.plot` imports `plot` only when called (matplotlib is optional).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Tuple

import torch
from torch import Tensor

from .._solution import Solution, Status

class Flag(enum.Enum):
    """What can be wrong with one sample's fixed point (see `Report.flags`).

    Members, worst first: `DIVERGENCE` (iterates or residuals grow without bound or turn
    non-finite), `FALSE_HALT` (the step passed the tolerance but the estimated distance to the
    fixed point is 10x the tolerance or more; or a halting criterion stopped the sample where
    the residual rule does not hold), `INCONSISTENT` (the state settled but the
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
        "step, about residual / (1 - contraction)) is 10x the tolerance or more, or a halting "
        "criterion stopped the sample where the residual rule does not hold (not at a fixed point); "
        "try a tighter rtol/atol, an accelerated solver, normalise the state so its norm cannot grow, "
        "make f contract faster (spectral normalisation), or check a criterion's answers with check=."
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

    @staticmethod
    def _colors() -> "tuple[Dict[Flag, str], str]":
        """(one colour per Flag, the healthy colour): what the figures draw with."""
        return flag_colors(), HEALTHY_COLOR


#: One colour per `Flag` (tab10 order, worst first), the same in every figure.
_PALETTE = ("#d62728", "#ff7f0e", "#8c564b", "#1f77b4", "#9467bd", "#7f7f7f", "#bcbd22", "#17becf", "#2ca02c",
            "#e377c2")
#: The colour of a healthy sample in figures.
HEALTHY_COLOR = "0.75"


def flag_colors() -> Dict[Flag, str]:
    """One colour per Flag (tab10), the same in every figure."""
    return {flag: _PALETTE[i % len(_PALETTE)] for i, flag in enumerate(Flag)}


__all__ = ["Flag", "Report", "flag_colors", "HEALTHY_COLOR"]
