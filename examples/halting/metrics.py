"""Measures of a rule's halts (accuracy, passes, rank correlation with difficulty, premature
halts, overshoot past K_sat, per bucket and per size) and of fpsolve.diagnose's flags (recall
on settled-but-wrong samples, false alarms, AUROC of the signals behind them)."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
from torch import Tensor

from .rules import Halts
from .task import BUCKETS, TRAIN_MAX_DIFFICULTY, bucket_name

FLAG_RATES = {"oscillation_rate": "OSCILLATION", "divergence_rate": "DIVERGENCE", "false_halt_rate": "FALSE_HALT",
              "slow_contraction_rate": "SLOW_CONTRACTION", "stagnation_rate": "STAGNATION"}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(spearmanr(a, b).correlation)


def metrics(h: Halts, ksat: Tensor, right_later: Tensor, difficulty: Tensor, size: Optional[Tensor] = None) -> dict:
    """Everything the issue asks per rule (pooled over the test sets it is given), and how it
    halts on the inputs harder than training (d > 12) and per grid size (`size`, if given)."""
    passes, correct, settled = h.passes.numpy(), h.correct.numpy(), h.settled.numpy()
    d, ks, later = difficulty.numpy(), ksat.numpy(), right_later.numpy()
    premature = (passes < ks) & ~correct & later
    hard = d > TRAIN_MAX_DIFFICULTY
    on_hard = lambda v: float(v[hard].mean()) if hard.any() else float("nan")  # noqa: E731
    res = {
        "accuracy": float(correct.mean()),
        "mean_passes": float(passes.mean()),
        "spearman_difficulty": spearman(passes, d),
        "spearman_in_distribution": spearman(passes[d <= TRAIN_MAX_DIFFICULTY], d[d <= TRAIN_MAX_DIFFICULTY]),
        "premature_halt_rate": float(premature.mean()),
        "accuracy_harder_than_training": on_hard(correct),
        "mean_passes_harder_than_training": on_hard(passes),
        "settled_wrong_rate_harder_than_training": on_hard(settled & ~correct),   # false halts
        "premature_halt_rate_harder_than_training": on_hard(premature),
        "unsettled_rate_harder_than_training": on_hard(~settled),   # ran to the budget (ACT: never fired)
        "settled_wrong_rate": float((settled & ~correct).mean()),
        "settled_correct_table": {"settled_correct": int((settled & correct).sum()),
                                  "settled_wrong": int((settled & ~correct).sum()),
                                  "unsettled_correct": int((~settled & correct).sum()),
                                  "unsettled_wrong": int((~settled & ~correct).sum())},
        "accuracy_by_bucket": {}, "median_overshoot_correct": {}, "premature_by_bucket": {},
        "count_by_bucket": {},
    }
    for lo, hi in BUCKETS:
        m = (d >= lo) & (d <= hi)
        name = bucket_name(lo, hi)
        res["count_by_bucket"][name] = int(m.sum())
        if not m.any():
            continue
        res["accuracy_by_bucket"][name] = float(correct[m].mean())
        over = (passes - ks)[m & correct]
        res["median_overshoot_correct"][name] = float(np.median(over)) if len(over) else float("nan")
        res["premature_by_bucket"][name] = float(premature[m].mean())
    for n in ([] if size is None else sorted(set(size.tolist()))):
        m = size.numpy() == n
        res[f"accuracy_{n}x{n}"], res[f"mean_passes_{n}x{n}"] = float(correct[m].mean()), float(passes[m].mean())
    return res


def summarize_diagnose(rows) -> dict:
    """Recall on settled-but-wrong samples and false alarms on settled-and-correct ones, for the
    internal flags and for check= (INCONSISTENT). `rows`: from `evaluation.run_diagnose`."""
    sw = [r for r in rows if r[0] and not r[1]]     # settled but wrong: false halts
    sc = [r for r in rows if r[0] and r[1]]         # settled and correct
    rate = lambda rs, fn: float(np.mean([fn(r) for r in rs])) if rs else float("nan")  # noqa: E731
    counts: Dict[str, int] = {}
    for r in rows:
        for name in r[2]:
            counts[name] = counts.get(name, 0) + 1
    return {
        "samples": len(rows), "settled_wrong": len(sw), "settled_correct": len(sc),
        "settled_wrong_recall": rate(sw, lambda r: bool(r[2])),
        "false_alarm_rate": rate(sc, lambda r: bool(r[2])),
        "check_recall": rate(sw, lambda r: r[3]),
        "check_false_alarm_rate": rate(sc, lambda r: r[3]),
        "check_or_flags_recall": rate(sw, lambda r: r[3] or bool(r[2])),
        "flag_counts": counts,
        "auroc": {k: auroc([r[5][k] for r in sw], [r[5][k] for r in sc]) for k in (rows[0][5] if rows else {})},
    }


def auroc(positive: List[float], negative: List[float]) -> float:
    """P(a settled-but-wrong sample scores above a settled-and-correct one); nan scores and
    empty classes give nan. 0.5 is chance."""
    from scipy.stats import rankdata
    pos = np.asarray([v for v in positive if np.isfinite(v)])
    neg = np.asarray([v for v in negative if np.isfinite(v)])
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def flag_rates(rows) -> dict:
    """Per model: the share of samples with each flag, with none, and accuracy (all mazes, and
    those harder than training) of fixed-point halting."""
    out = {k: float(np.mean([name in r[2] for r in rows])) for k, name in FLAG_RATES.items()}
    hard = [r[1] for r in rows if r[4] > TRAIN_MAX_DIFFICULTY]
    out.update(healthy_rate=float(np.mean([not r[2] for r in rows])), accuracy=float(np.mean([r[1] for r in rows])),
               accuracy_harder_than_training=float(np.mean(hard)) if hard else float("nan"),
               settled_wrong_rate=float(np.mean([r[0] and not r[1] for r in rows])))
    return out


def mean_spread(values: List[float]) -> Tuple[float, float]:
    a = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    return (float(a.mean()), float(a.std())) if len(a) else (float("nan"), float("nan"))
