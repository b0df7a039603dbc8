"""Gallery for docs/diagnosing.md: what `fpsolve.diagnose` finds on maps with known behaviour.

    python examples/diagnose_gallery.py            # writes docs/figures/diagnose_*.png
    python examples/diagnose_gallery.py --cost     # times diagnose against one solve (benchmark MLP)

Figures: the logistic map's bifurcation diagram coloured by the detected period; rotations
of the plane (rational and irrational angles) with their spectrum; a looped transformer
block with and without state normalisation and with growing residual scales; and the
standard `report.plot()` of a batch mixing healthy and failing samples.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

import fpsolve
from fpsolve import Flag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = os.path.join(ROOT, "docs", "figures")


def logistic(z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """z -> r z (1 - z), r per sample: period 1 for r < 3, 2 for 3 < r < 3.449, 4 for 3.449 < r < 3.544."""
    return r * z * (1 - z)


def rotation(z: torch.Tensor, x: tuple) -> torch.Tensor:
    """Rotation of the plane by theta about the centre c (both per sample): |λ| = 1, no real eigenvector."""
    c, theta = x
    d = z - c
    cos, sin = torch.cos(theta), torch.sin(theta)
    return c + torch.cat([cos * d[:, :1] - sin * d[:, 1:], sin * d[:, :1] + cos * d[:, 1:]], dim=1)


def scaled(z: torch.Tensor, x: tuple) -> torch.Tensor:
    """z -> a z + b with a per sample: contracts (|a| < 1), cycles (a = -1) or grows (|a| > 1)."""
    a, b = x
    return a * z + b


def figure_logistic(plt) -> str:
    """Bifurcation diagram of the logistic map, each r coloured by the period diagnose detects."""
    r = torch.linspace(2.8, 4.0, 1200, dtype=torch.float64).view(-1, 1)
    z0 = torch.full_like(r, 0.5)
    report = fpsolve.diagnose(logistic, z0, r, solver="fixed_point", max_iter=1000, restarts=0, max_period=16)
    z = z0.clone()
    for _ in range(1000):                      # the attractor, for the picture
        z = logistic(z, r)
    points = []
    for _ in range(64):
        z = logistic(z, r)
        points.append(z)
    orbit = torch.cat(points, dim=1)
    period = report.period
    osc = report.mask(Flag.OSCILLATION)
    palette = {2: "tab:blue", 4: "tab:green", 8: "tab:orange", 16: "tab:red", 3: "tab:purple",
               6: "tab:brown", 5: "tab:olive", 7: "tab:cyan"}
    unstable = report.mask(Flag.UNSTABLE_FIXED_POINT)
    classes = [("settles (period 0)", (period == 0) & ~osc & ~unstable, "black"),
               ("halts by chance at a repelling root (UNSTABLE)", (period == 0) & ~osc & unstable, "red")]
    classes += [(f"period {p}", period == p, c) for p, c in palette.items()]
    other = (period > 0) & ~torch.isin(period, torch.tensor(list(palette)))
    classes.append(("other periods <= 16", other, "0.55"))
    classes.append(("OSCILLATION, no period <= 16", (period == 0) & osc, "#f0a0d0"))
    fig, ax = plt.subplots(figsize=(11.5, 4.8))
    for label, mask, color in classes:
        if mask.any():
            rr = r[mask].repeat(1, orbit.shape[1]).flatten()
            ax.scatter(rr, orbit[mask].flatten(), s=3.0, lw=0, color=color, label=label, rasterized=True)
    ax.set_xlabel("r")
    ax.set_ylabel("attractor of z <- r z (1 - z)")
    ax.set_title("logistic map: the period fpsolve.diagnose detects for each r (batch of 1200 samples)")
    ax.legend(markerscale=4, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _save(fig, "diagnose_logistic.png")


def figure_rotation(plt) -> str:
    """Plain iteration of rotations by 2π/5, 2π/7 and an irrational angle, and their spectra."""
    angles = [2 * math.pi / 5, 2 * math.pi / 7, math.pi * (math.sqrt(5) - 1)]
    names = ["2π/5", "2π/7", "π(√5 − 1) (irrational)"]
    theta = torch.tensor(angles, dtype=torch.float64).view(-1, 1)
    c = torch.tensor([[1.0, 0.5]], dtype=torch.float64).repeat(3, 1)
    z0 = torch.zeros(3, 2, dtype=torch.float64)
    report = fpsolve.diagnose(rotation, z0, (c, theta), restarts=0)
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.9))
    z, orbit = z0, [z0]
    for _ in range(60):
        z = rotation(z, (c, theta))
        orbit.append(z)
    orbit = torch.stack(orbit)
    for i, ax in enumerate(axes[:3]):
        ax.plot(orbit[:, i, 0], orbit[:, i, 1], ".-", lw=0.4, ms=4, color="C0")
        ax.plot(*report.solution.z[i].tolist(), "*", color="C3", ms=12, label="root found (Anderson)")
        flags = ", ".join(sorted(f.name for f in report.flags[i]))
        ax.set_title(f"rotation by {names[i]}\nperiod {int(report.period[i])}; {flags}", fontsize=9)
        ax.set_aspect("equal")
    axes[0].legend(fontsize=7, loc="lower left")
    ax = axes[3]
    t = torch.linspace(0, 2 * math.pi, 200)
    ax.plot(torch.cos(t), torch.sin(t), "k--", lw=0.7)
    for i in range(3):
        lam = report.eigenvalues[i]
        ax.plot(lam.real, lam.imag, "o", ms=7 - 2 * i, label=f"{names[i]}: ρ = {float(report.spectral_radius[i]):.6f}")
    ax.set_aspect("equal")
    ax.set_title("Ritz values of ∂f/∂z (complex pairs on |λ| = 1)", fontsize=9)
    ax.legend(fontsize=7, loc="center")
    fig.tight_layout()
    return _save(fig, "diagnose_rotation.png")


def figure_transformer(plt) -> str:
    """A looped transformer block: residual scale and state normalisation change the flags."""
    B, L, d = 16, 16, 32
    x = torch.randn(B, L, d, generator=torch.Generator().manual_seed(0))
    variants = [
        ("pre-norm, state LayerNorm, scale 0.2", dict(), dict(rtol=1e-3)),
        ("pre-norm, state LayerNorm, scale 4", dict(residual_scale=4.0), dict(rtol=1e-3)),
        ("pre-norm, state LayerNorm, scale 32", dict(residual_scale=32.0), dict(rtol=1e-3)),
        ("no state normalisation, rtol 1e-3", dict(normalize_state=False), dict(rtol=1e-3)),
        ("no state normalisation, rtol 0.05", dict(normalize_state=False), dict(rtol=0.05)),
    ]
    from fpsolve.plot import flag_colors
    colors = flag_colors()
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    axes = axes.flatten()
    norm_ax = axes[-1]
    for n, (ax, (label, block_options, solve_options)) in enumerate(zip(axes, variants)):
        torch.manual_seed(1)
        block = fpsolve.LoopedTransformerBlock(d, heads=4, **block_options).eval()
        report = fpsolve.diagnose(block, torch.zeros_like(x), x, solver="fixed_point", max_iter=100, **solve_options)
        # the looped model as it runs: 100 plain passes, relative step and state norm per pass
        z, rel, size = torch.zeros_like(x), [], []
        with torch.no_grad():
            for _ in range(100):
                fz = block(z, x)
                step = torch.linalg.vector_norm((fz - z).flatten(1), dim=1)
                rel.append(step / torch.linalg.vector_norm(fz.flatten(1), dim=1))
                z = fz
                size.append(torch.linalg.vector_norm(z.flatten(1), dim=1) / math.sqrt(L * d))
        rel, size = torch.stack(rel), torch.stack(size)
        steps = torch.arange(1, 101)
        for i in reversed(report.order()):
            flags = report.flags[i]
            worst = min(flags, key=lambda f: f.severity) if flags else None
            ax.loglog(steps, rel[:, i], color="0.6" if worst is None else colors[worst], lw=1)
        depth = report.solution.iterations.double()
        ax.axhline(solve_options["rtol"], color="k", ls=":", lw=0.8)
        counts = {}
        for s in report.flags:
            key = "+".join(sorted(f.name for f in s)) or "healthy"
            counts[key] = counts.get(key, 0) + 1
        text = "\n".join(f"{v} x {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        text += f"\nhalting depth {depth.min():.0f}-{depth.max():.0f}"
        ax.set_title(label, fontsize=9)
        ax.text(0.03, 0.03, text, transform=ax.transAxes, ha="left", va="bottom", fontsize=7.5,
                bbox=dict(facecolor="white", alpha=0.8, lw=0))
        ax.set_xlabel("pass")
        ax.set_ylabel("relative step ||f(z) - z|| / ||f(z)||")
        norm_ax.semilogy(steps, size.median(dim=1).values, label=label, color=f"C{n}")
    norm_ax.set_title("state size ||z|| / sqrt(L d) (median over the batch)", fontsize=9)
    norm_ax.set_xlabel("pass")
    norm_ax.legend(fontsize=7)
    fig.suptitle("LoopedTransformerBlock(dim 32, seq 16, batch 16) run as a looped model: relative step per "
                 "sample, coloured by its worst flag (grey: healthy); dotted: rtol", fontsize=10)
    fig.tight_layout()
    return _save(fig, "diagnose_transformer.png")


def figure_report(plt) -> str:
    """`report.plot()` on one batch mixing a healthy, a slow, an oscillating and a divergent sample."""
    a = torch.tensor([[0.5], [0.7], [0.97], [-1.0], [1.3], [0.2]], dtype=torch.float64)
    b = torch.ones_like(a)
    report = fpsolve.diagnose(scaled, torch.zeros_like(a), (a, b), solver="fixed_point", rtol=1e-8, max_iter=60)
    print(report)
    title = "report.plot(): z -> a z + 1 with a = 0.5, 0.7, 0.97, -1, 1.3, 0.2 (plain iteration, 60 steps)"
    fig = report.plot(title=title)
    return _save(fig, "diagnose_report.png")


def _save(fig, name: str) -> str:
    os.makedirs(FIGURES, exist_ok=True)
    path = os.path.join(FIGURES, name)
    fig.savefig(path, dpi=110)
    return path


def cost(threads: int, repeats: int) -> None:
    """Wall time of diagnose against one solve on the benchmark MLP (benchmarks/problems.py)."""
    sys.path.insert(0, ROOT)
    from benchmarks.problems import build

    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {threads} threads, load average before {os.getloadavg()}")
    print("| dtype | solver | solve ms | diagnose ms (restarts=2) | ratio | diagnose ms (restarts=0) | ratio "
          "| rows of f: solve / diagnose |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for dtype in (torch.float32, torch.float64):
        p = build("mlp_contractive", dtype)
        for solver in ("anderson", "fixed_point"):
            runs = {
                "solve": lambda: fpsolve.solve(p.f, p.z0, p.x, solver=solver, max_iter=p.max_iter, backward="none"),
                "diag": lambda: fpsolve.diagnose(p.f, p.z0, p.x, solver=solver, max_iter=p.max_iter),
                "diag0": lambda: fpsolve.diagnose(p.f, p.z0, p.x, solver=solver, max_iter=p.max_iter, restarts=0),
            }
            times = {k: [] for k in runs}
            out = {}
            with torch.no_grad():
                for _ in range(2):
                    for fn in runs.values():
                        fn()
                for _ in range(repeats):    # alternating, so that load hits all alike
                    for k, fn in runs.items():
                        t = time.perf_counter()
                        out[k] = fn()
                        times[k].append(time.perf_counter() - t)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            rows = sum(out["diag"].evaluations.values())
            print(f"| {str(dtype).split('.')[-1]} | {solver} | {med['solve']:.1f} | {med['diag']:.1f} | "
                  f"{med['diag'] / med['solve']:.1f}x | {med['diag0']:.1f} | {med['diag0'] / med['solve']:.1f}x | "
                  f"{out['solve'].evaluations} / {rows} |")
    print(f"evaluations by part (float64, last solver): {out['diag'].evaluations}")
    print(f"load average after {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cost", action="store_true", help="time diagnose against one solve instead of drawing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.cost:
        cost(args.threads, args.repeats)
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    torch.set_num_threads(args.threads)
    for make in (figure_logistic, figure_rotation, figure_transformer, figure_report):
        print("wrote", make(plt))
        plt.close("all")


if __name__ == "__main__":
    main()
