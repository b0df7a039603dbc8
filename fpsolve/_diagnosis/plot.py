"""Figures for `fpsolve.diagnose` reports (matplotlib is an optional extra: `pip install fpsolve[plot]`).

matplotlib is imported inside the functions, so importing fpsolve never needs it. This module
reads a finished `Report` only, through the report itself (its flags and its colours,
`Report._colors`): it imports no other part of diagnose, so no import runs in a circle.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:   # (for the annotations only)
    from .report import Report


def _worst(report: "Report", i: int) -> Any:
    flags = report.flags[i]
    return min(flags, key=lambda f: f.severity) if flags else None


def plot_report(report: "Report", *, max_samples: int = 200, title: Optional[str] = None) -> Any:
    """Three panels: the solve's residual per sample, plain iteration's residual, and the spectrum.

    Flagged samples are drawn in the colour of their worst flag, healthy ones in light grey
    (underneath); the spectrum panel shows each sample's Ritz values against the unit circle.
    Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    colors, HEALTHY_COLOR = report._colors()
    B = len(report.flags)
    order = report.order()[:max_samples][::-1]   # worst drawn last (on top)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    trace = report.solution.trace
    panels = [(axes[0], trace, "residual ||f(z) - z|| of the solve"),
              (axes[1], report.plain_trace, "plain iteration z <- f(z) from z0")]
    for ax, tr, label in panels:
        if tr is not None and tr.numel():
            t = tr.detach().double().cpu()
            steps = torch.arange(1, t.shape[0] + 1)
            for i in order:
                worst = _worst(report, i)
                color = HEALTHY_COLOR if worst is None else colors[worst]
                ax.semilogy(steps, t[:, i].clamp_min(1e-300), color=color,
                            lw=0.8 if worst is None else 1.3, alpha=0.8)
        ax.set_xlabel("iteration")
        ax.set_title(label, fontsize=10)
    axes[0].set_ylabel("residual")
    tol = report.tolerance.detach().double().cpu()
    if tol.numel() and torch.isfinite(tol).any():
        axes[0].axhline(float(tol[torch.isfinite(tol)].median()), color="k", ls=":", lw=0.8, label="tolerance (median)")

    ax = axes[2]
    angle = torch.linspace(0, 2 * torch.pi, 256)
    ax.plot(torch.cos(angle), torch.sin(angle), color="k", lw=0.8, ls="--")
    eig = report.eigenvalues
    for i in order:
        worst = _worst(report, i)
        lam = eig[i]
        lam = lam[torch.isfinite(lam.real) & (lam.abs() > 0)]
        if lam.numel():
            ax.scatter(lam.real, lam.imag, s=10 if worst is None else 16,
                       color=HEALTHY_COLOR if worst is None else colors[worst], alpha=0.8)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("Re λ")
    ax.set_ylabel("Im λ")
    ax.set_title("spectrum estimate of ∂f/∂z (Ritz values) and |λ| = 1", fontsize=10)

    present = sorted({f for s in report.flags for f in s}, key=lambda f: f.severity)
    handles = [plt.Line2D([], [], color=colors[f], lw=2, label=f.name) for f in present]
    healthy = sum(1 for s in report.flags if not s)
    if healthy:
        handles.append(plt.Line2D([], [], color=HEALTHY_COLOR, lw=2, label=f"healthy ({healthy})"))
    if handles:
        axes[0].legend(handles=handles, fontsize=8, loc="best")
    fig.suptitle(title or f"fpsolve.diagnose: {B - healthy} of {B} samples flagged", fontsize=11)
    fig.tight_layout()
    return fig


__all__ = ["plot_report"]
