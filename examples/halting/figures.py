"""The study's figures: accuracy against compute, passes against difficulty, overshoot and
premature halts per bucket, and (full run) diagnose flags per ablation. Written to
docs/figures/halting_*{tag}.png (tag "_quick" for the quick mode)."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np

from .metrics import FLAG_RATES
from .report import named_rules
from .task import BUCKETS, TRAIN_MAX_DIFFICULTY, Config, bucket_name

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIGURES = os.path.join(ROOT, "docs", "figures")

FAMILIES = {"fixed_depth": ("k", "fixed depth K"), "act": ("tab:red", "ACT (tau)"),
            "act_train_only": ("tab:orange", "ACT, train only (tau)"),
            "fixed_point_inf": ("tab:blue", "fixed point, inf"), "fixed_point_l2": ("tab:cyan", "fixed point, l2"),
            "anderson_inf": ("tab:purple", "Anderson, inf"), "fixed_point_corrected": ("tab:green", "distance-corrected")}


def compute_panel(ax, ev: dict, title: str) -> None:
    """Accuracy against mean passes for every setting of every rule."""
    for f, (color, label) in FAMILIES.items():
        pts = sorted((v["mean_passes"], v["accuracy"]) for k, v in ev["results"].items() if k[0] == f)
        if not pts:
            continue
        ax.plot(*zip(*pts), "-" if f == "fixed_depth" else "o-", color=color, label=label, ms=4, lw=1.2)
    ax.set_xlabel("mean passes per sample (compute)")
    ax.set_ylabel("accuracy (whole maze right)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def difficulty_panel(ax, ev: dict, title: str) -> None:
    """Median passes at halt per difficulty for the named operating points, with K_sat."""
    d = ev["difficulty"].numpy()
    ax.plot(d, ev["ksat"].numpy() + 0.15 * np.random.default_rng(0).standard_normal(len(d)), ".", color="0.7",
            ms=3, label="K_sat (prediction stops changing)")
    ax.plot([0, d.max()], [0, d.max()], ":", color="0.4", lw=1, label="passes = difficulty (lower bound)")
    c = ev["chosen"]
    for key, color, label in ((("fixed_point_inf", c["fixed_point_inf"]), "tab:blue",
                               f"fixed point (inf, rtol {c['fixed_point_inf']:g})"),
                              (("act", c["act"]), "tab:red", f"ACT (tau {c['act']:g})"),
                              (("act_train_only", c.get("act_train_only")), "tab:orange",
                               f"ACT, train only (tau {c.get('act_train_only', 0):g})"),
                              (("fixed_point_corrected", c["fixed_point_corrected"]), "tab:green",
                               f"distance-corrected (rtol {c['fixed_point_corrected']:g})")):
        if key not in ev["raw"]:
            continue
        p = ev["raw"][key].passes.numpy()
        xs = np.unique(d)
        ax.plot(xs, [np.median(p[d == v]) for v in xs], "-", color=color, label=label + ", median")
    K = ev["best_fixed_depth"]["depth"]
    ax.axhline(K, color="k", lw=1, ls="--", label=f"best fixed depth K={K}")
    ax.axvline(TRAIN_MAX_DIFFICULTY + 0.5, color="0.5", lw=0.8)
    ax.set_xlabel("difficulty (BFS depth)")
    ax.set_ylabel("passes at halt")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def heatmap(ax, values: np.ndarray, rows: List[str], cols: List[str], title: str, fmt: str) -> None:
    """An annotated table as an image: one row per rule, one column per difficulty bucket."""
    ax.imshow(np.log1p(np.abs(np.nan_to_num(values))), cmap="Blues", aspect="auto", vmin=0, vmax=np.log1p(50))
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = values[i, j]
            ax.text(j, i, "–" if not np.isfinite(v) else format(v, fmt), ha="center", va="center", fontsize=8,
                    color="white" if np.isfinite(v) and abs(v) > 12 else "black")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=8)
    ax.set_xlabel("difficulty bucket (BFS depth; > 12 is harder than training)", fontsize=8)
    ax.set_title(title, fontsize=9)


def save(fig, name: str, tag: str) -> str:
    path = os.path.join(FIGURES, f"{name}{tag}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def overshoot_figure(plt, evs: Dict[str, dict], cfg: Config, tag: str) -> str:
    """Per recipe, two heatmaps of the named operating points: the median overshoot of correct
    halts past K_sat, and the premature halts, per difficulty bucket."""
    cols = [bucket_name(lo, hi) for lo, hi in BUCKETS]
    fig, axes = plt.subplots(len(evs), 2, figsize=(11, 2.9 * len(evs)), squeeze=False)
    for row, (label, ev) in zip(axes, evs.items()):
        rules = named_rules(ev, cfg)
        names = [n.replace(" (", "\n(", 1) for n in rules]
        over = np.array([[m["median_overshoot_correct"].get(b, np.nan) for b in cols] for m in rules.values()])
        prem = np.array([[100 * m["premature_by_bucket"].get(b, np.nan) for b in cols] for m in rules.values()])
        heatmap(row[0], over, names, cols, f"{label}: median overshoot on correct halts (halt - K_sat)", ".0f")
        heatmap(row[1], prem, names, cols, f"{label}: premature halts (% of bucket)", ".1f")
    return save(fig, "halting_overshoot", tag)


def ablation_figure(plt, ablation: dict, tag: str) -> str:
    """diagnose's flag rates per ablation, mean over seeds, with the spread as error bars."""
    fig, ax = plt.subplots(figsize=(7.4, 3.8))
    keys = list(FLAG_RATES) + ["healthy_rate"]
    w = 0.8 / len(keys)
    names_a = list(ablation)
    for i, key in enumerate(keys):
        ax.bar(np.arange(len(names_a)) + i * w, [100 * ablation[a][key] for a in names_a], w,
               yerr=[100 * ablation[a]["spread"][key] for a in names_a], capsize=2,
               label=key.replace("_rate", ""))
    ax.set_xticks(np.arange(len(names_a)) + 0.4 - w / 2)
    ax.set_xticklabels(names_a, fontsize=8)
    ax.set_ylabel("% of test samples (mean over seeds)")
    ax.set_title("fpsolve.diagnose flags per ablation (bars: spread over seeds)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return save(fig, "halting_ablation", tag)


def make_figures(evs: Dict[str, dict], cfg: Config, ablation: Optional[dict], tag: str) -> List[str]:
    """evs: recipe label -> the evaluation of its first seed. One panel per recipe."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(FIGURES, exist_ok=True)
    out, k = [], len(evs)
    fig, axes = plt.subplots(1, k, figsize=(6.4 * k, 4.2), squeeze=False)
    for ax, (label, ev) in zip(axes[0], evs.items()):
        compute_panel(ax, ev, f"Accuracy vs compute ({label})")
    axes[0][0].legend(fontsize=8)
    out.append(save(fig, "halting_compute", tag))

    fig, axes = plt.subplots(1, k, figsize=(6.4 * k, 4.2), squeeze=False)
    for ax, (label, ev) in zip(axes[0], evs.items()):
        difficulty_panel(ax, ev, f"Passes vs difficulty ({label})")
    axes[0][0].legend(fontsize=7)
    out.append(save(fig, "halting_difficulty", tag))

    out.append(overshoot_figure(plt, evs, cfg, tag))
    if ablation:
        out.append(ablation_figure(plt, ablation, tag))
    return out
