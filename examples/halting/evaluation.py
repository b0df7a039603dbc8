"""Evaluation of one trained model: every rule setting on the test sets, the operating points
chosen on validation sets, and fpsolve.diagnose with and without the task's check."""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import Tensor

import fpsolve
from maze import MazeLoop, Mazes, make_check

from .metrics import metrics
from .rules import (Halts, PlainRun, act_rule, cat_halts, corrected_rule, fixed_depth, fpsolve_rule, k_sat,
                    plain_run, step_rule)
from .task import TRAIN_MAX_DIFFICULTY, Config, as_tensors
from .training import ActHead


def cheapest_settings(runs: List[PlainRun], families: dict) -> dict:
    """Per family, the cheapest setting whose accuracy on the given validation runs is within
    0.5 point of plain iteration's after max_passes (none: the cheapest setting)."""
    target = float(torch.cat([r.correct[-1] for r in runs]).float().mean()) - 0.005
    chosen = {}
    for fam, (settings, fn) in families.items():
        scored = []
        for v in settings:
            h = cat_halts([fn(r, v) for r in runs])
            scored.append((float(h.correct.float().mean()) >= target, -float(h.passes.float().mean()), v))
        ok = [t for t in scored if t[0]]
        chosen[fam] = max(ok)[2] if ok else max(scored, key=lambda t: t[1])[2]
    return chosen


def choose_operating_points(model: MazeLoop, heads: Dict[str, ActHead], val: Dict[int, Mazes], cfg: Config) -> dict:
    """Per family, the cheapest good setting on a validation set (fresh mazes of both sizes,
    never the test set); act_train_only's tau on its 8x8 mazes with d <= 12 only, since a
    user who trains on the training distribution has no harder data to tune on."""
    runs = []
    for n, m in val.items():
        cells, labels, _ = as_tensors(m)
        runs.append(plain_run(model, heads, cells, labels, cfg.max_passes))
    families = {
        "act": (cfg.act_taus, lambda r, v: act_rule(r, v)),
        "fixed_point_inf": (cfg.rtols, lambda r, v: step_rule(r, v, "inf")),
        "fixed_point_l2": (cfg.rtols, lambda r, v: step_rule(r, v, "l2")),
        "fixed_point_corrected": (cfg.rtols, lambda r, v: corrected_rule(r, v, "inf")),
    }
    chosen = cheapest_settings(runs, families)
    if "act_train_only" in heads:
        cells, labels, d = as_tensors(val[8])
        keep = d <= TRAIN_MAX_DIFFICULTY
        train_run = plain_run(model, heads, cells[keep], labels[keep], cfg.max_passes)
        chosen.update(cheapest_settings([train_run], {
            "act_train_only": (cfg.act_taus, lambda r, v: act_rule(r, v, "act_train_only"))}))
    tols = [v for v in cfg.anderson_rtols if v <= chosen["fixed_point_inf"]]
    chosen["anderson_inf"] = max(tols) if tols else min(cfg.anderson_rtols)
    return chosen


def rule_settings(model: MazeLoop, heads: Dict[str, ActHead], cfg: Config) -> Dict[tuple, Callable[..., Halts]]:
    """(family, setting) -> the rule on one test set r = (plain run, cells, labels), in the
    order the sweeps are reported."""
    T = cfg.max_passes
    settings = {}
    for K in range(1, T + 1):
        settings[("fixed_depth", K)] = lambda r, K=K: fixed_depth(r[0], K)
    for name in heads:
        for tau in cfg.act_taus:
            settings[(name, tau)] = lambda r, tau=tau, name=name: act_rule(r[0], tau, name)
    for rtol in cfg.rtols:
        for norm in ("inf", "l2"):
            settings[(f"fixed_point_{norm}", rtol)] = (
                lambda r, rtol=rtol, norm=norm: fpsolve_rule(model, r[1], r[2], "fixed_point", norm, rtol, T))
        settings[("fixed_point_corrected", rtol)] = lambda r, rtol=rtol: corrected_rule(r[0], rtol, "inf")
    for rtol in cfg.anderson_rtols:
        settings[("anderson_inf", rtol)] = (
            lambda r, rtol=rtol: fpsolve_rule(model, r[1], r[2], "anderson", "inf", rtol, T))
    return settings


def evaluate(model: MazeLoop, heads: Dict[str, ActHead], tests: Dict[int, Mazes], val: Dict[int, Mazes],
             cfg: Config, bar=None) -> dict:
    """Every rule on every test set; returns per-rule-setting metrics and the sweep curves."""
    T = cfg.max_passes
    runs, ksats, later, diffs, raw = {}, [], [], [], {}
    for n, m in tests.items():
        cells, labels, d = as_tensors(m)
        runs[n] = (plain_run(model, heads, cells, labels, T), cells, labels)
        ksats.append(k_sat(runs[n][0]))
        later.append(runs[n][0].correct[-1])
        diffs.append(d)
        if bar is not None:
            bar.update(1)
    ksat, right_later, difficulty = torch.cat(ksats), torch.cat(later), torch.cat(diffs)
    size = torch.cat([torch.full((len(m),), n) for n, m in tests.items()])
    results = {}
    for key, fn in rule_settings(model, heads, cfg).items():
        h = cat_halts([fn(runs[n]) for n in tests])
        results[key] = metrics(h, ksat, right_later, difficulty, size)
        raw[key] = h
        if bar is not None and key[0] != "fixed_depth":
            bar.update(1)
    best_K = max(range(1, T + 1), key=lambda K: (round(results[("fixed_depth", K)]["accuracy"], 4), -K))
    extra = {
        "chosen": choose_operating_points(model, heads, val, cfg),
        "best_fixed_depth": {"depth": best_K, "accuracy": results[("fixed_depth", best_K)]["accuracy"]},
        "difficulty": difficulty, "ksat": ksat, "right_later": right_later, "raw": raw,
        "hard_accuracy_at_max": float(right_later[difficulty > TRAIN_MAX_DIFFICULTY].float().mean()),
    }
    return {"results": results, **extra}


def run_diagnose(model: MazeLoop, tests: Dict[int, Mazes], cfg: Config, rtol: float,
                 restarts: int = 2, norm: str = "inf") -> List[tuple]:
    """fpsolve.diagnose on the first cfg.n_diagnose mazes of each test set, with the task's check.

    One row per maze: (settled, correct, internal flags, INCONSISTENT, difficulty, signals). The
    internal flags (everything but INCONSISTENT) are what diagnose says without check=; signals
    are the continuous quantities behind them, for AUROC against settled-but-wrong."""
    rows = []
    for n, m in tests.items():
        k = cfg.n_diagnose[n]
        cells, labels, d = (t[:k] for t in as_tensors(m))
        with torch.no_grad():
            x = model.inputs(cells)
            rep = fpsolve.diagnose(model, torch.zeros_like(x[0]), x, restarts=restarts, check=make_check(model),
                                   solver="fixed_point", norm=norm, rtol=rtol, max_iter=cfg.max_passes)
            correct = (model.predict(rep.solution.z, x[1]) == labels).all(-1)
        scale = rep.solution.z.flatten(1).abs().amax(1).clamp_min(1e-30)
        signals: Dict[str, Tensor] = {"distance / tolerance": rep.distance / rep.tolerance.clamp_min(1e-30),
                                      "spectral radius": rep.spectral_radius,
                                      "restart distance": rep.restart_distance / scale}
        for i, flags in enumerate(rep.flags):
            names = {f.name for f in flags}
            rows.append((bool(rep.solution.converged[i]), bool(correct[i]), names - {"INCONSISTENT"},
                         "INCONSISTENT" in names, int(d[i]), {k: float(v[i]) for k, v in signals.items()}))
    return rows
