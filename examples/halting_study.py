"""Halting as root-finding on a looped transformer: fixed-point halting vs fixed depth vs ACT.

    python examples/halting_study.py --quick      # one seed, small sets, <= 5 min on 2 CPU cores
    python examples/halting_study.py              # 3 seeds + ablations; writes docs/halting.json

The task (examples/maze.py): reachability on grid mazes, cells as tokens, attention to a cell
and its 4 neighbours, so a sample's BFS depth d lower-bounds the passes a model needs. The
model: `fpsolve.LoopedTransformerBlock` (pre-norm, input injected at every pass, residual
scale 0.2, state normalised each pass) looped with shared weights, trained on 8x8 mazes with
d <= 12 and tested on 8x8 and 16x16 mazes (d up to ~48) for depth extrapolation.

Training uses unrolled gradients (backpropagation through every pass, what
`fpsolve.Unroll(steps=None)` computes for plain iteration) written as a loop, because the loss
reads every pass: a per-sample deep supervision from pass max(d, 1) on (the first pass at
which the answer can be known), plus a fixed-point penalty on the relative step at every pass
after that. Implicit or phantom gradients only see the fixed point; here the answer is carried
by the propagation itself, and early in training there is no fixed point to differentiate at.

The ACT baseline is a halt head on the frozen trunk: from the state it predicts whether the
current answer is already right (binary cross-entropy, on 8x8 and 16x16 mazes of every
difficulty), and a sample halts at the first pass where it says so with probability >= tau.
A second head, act_train_only, is trained and tuned as TRM and HRM train theirs: on the
training distribution only (8x8, d <= 12), for pool and validation alike.

Every rule is evaluated on the same trained weights and the same test set:
  fixed_depth      K passes for every sample (a sweep of K)
  act              the learned halt head (a sweep of tau)
  act_train_only   the same head trained and tuned on the training distribution only
  fixed_point      fpsolve.solve, plain iteration, per-sample halting, ||f(z)-z|| <= rtol ||f(z)||
                   (norm "inf": largest entry, and "l2"; a sweep of rtol)
  anderson         the same criterion with Anderson acceleration
  fixed_point_corrected   plain iteration, halting when the estimated distance to the fixed point
                   r_t / (1 - rho_t) (rho_t = r_t / r_(t-1)) is below the tolerance
Then fpsolve.diagnose with and without the task's check, and (full run) the ablations.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fpsolve  # noqa: E402
from maze import MazeLoop, Mazes, generate, make_check  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = os.path.join(ROOT, "docs", "figures")
TRAIN_MAX_DIFFICULTY = 12
BUCKETS = [(0, 3), (4, 7), (8, 12), (13, 20), (21, 30), (31, 99)]


def bucket_name(lo: int, hi: int) -> str:
    return f"{lo}-{hi}" if hi < 99 else f"{lo}+"


@dataclass
class Config:
    seeds: List[int]
    dim: int = 32
    heads: int = 2
    steps: int = 400                 # training steps of the trunk
    batch: int = 32
    lr: float = 1e-2
    settle_weight: float = 0.1       # weight of the fixed-point penalty
    act_steps: int = 600             # training steps of the halt head
    act_pool: Tuple[int, int] = (192, 96)   # fresh 8x8 and 16x16 mazes whose states train it
                                            # (act_train_only: their sum, 8x8 with d <= 12)
    n_test: Dict[int, int] = field(default_factory=lambda: {8: 384, 16: 256})
    max_passes: int = 64             # the generous maximum for K_sat and every rule's budget
    max_test_difficulty: int = 48
    rtols: Tuple[float, ...] = (0.3, 0.1, 3e-2, 1e-2, 1e-3, 1e-4)
    anderson_rtols: Tuple[float, ...] = (1e-2, 1e-3, 1e-4)
    act_taus: Tuple[float, ...] = (0.3, 0.5, 0.7, 0.9, 0.95, 0.99)
    n_val: Dict[int, int] = field(default_factory=lambda: {8: 128, 16: 64})
    default_rtol: float = 1e-3       # the tolerance of the ablations' diagnose runs
    n_diagnose: Dict[int, int] = field(default_factory=lambda: {8: 96, 16: 64})
    ablations: Tuple[str, ...] = ("no_state_norm", "no_prenorm", "residual_scale_1")
    ablation_steps: int = 400
    recipes: Tuple[str, ...] = ("difficulty", "fixed_passes")


QUICK = Config(seeds=[0], steps=220, batch=32, act_steps=400, act_pool=(128, 48), n_test={8: 192, 16: 96},
               rtols=(0.1, 1e-2, 1e-3, 1e-4), anderson_rtols=(1e-2,), act_taus=(0.5, 0.7, 0.9, 0.99),
               n_val={8: 96, 16: 48},
               n_diagnose={8: 48, 16: 32}, ablations=(), max_passes=60, recipes=("difficulty",))
FULL = Config(seeds=[0, 1, 2])

RECIPES = ("difficulty", "fixed_passes")
HALT_HEADS = ("act", "act_train_only")   # every difficulty of both sizes; the training distribution only
LOOSE_L2_RTOL = 0.3   # a criterion loose enough to halt mid-propagation: a source of premature "settled" states
RECIPE_LABELS = {"difficulty": "difficulty-supervised", "fixed_passes": "label-free, 14-20 passes"}
VARIANTS = {
    "main": dict(),
    "no_state_norm": dict(normalize_state=False),
    "no_prenorm": dict(prenorm=False),
    "residual_scale_1": dict(residual_scale=1.0),
}


# ---------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------

def as_tensors(m: Mazes) -> Tuple[Tensor, Tensor, Tensor]:
    return (torch.as_tensor(m.cells), torch.as_tensor(m.reachable).flatten(1),
            torch.as_tensor(m.difficulty))


def train_trunk(cfg: Config, seed: int, variant: str, steps: int, bar=None,
                snapshot_at: Tuple[int, ...] = (), recipe: str = "difficulty"
                ) -> Tuple[MazeLoop, List[float], Dict[int, dict]]:
    """The looped model trained on 8x8 mazes with d <= 12 (unrolled gradients, see the top).

    recipe "difficulty": a batch runs max(d) + 2..5 passes; each sample is supervised at every
    pass from max(d, 1) on and penalised for moving after it (uses the generator's difficulty).
    recipe "fixed_passes" (label-free, the prototype's): a batch runs T ~ U{14..20} passes; the
    loss reads the last pass only, and the penalty the last 3 steps. No difficulty is used.
    With `snapshot_at`, copies of the weights at those steps are returned too: part-trained
    models, a source of confident wrong fixed points for the diagnose study."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}; got {recipe!r}.")
    torch.manual_seed(seed)
    rng = np.random.default_rng(1000 + seed)
    model = MazeLoop(cfg.dim, cfg.heads, **VARIANTS[variant])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    losses, snapshots = [], {}
    for step in range(steps):
        if step in snapshot_at:
            snapshots[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        cells, labels, d = as_tensors(generate(cfg.batch, 8, rng, max_difficulty=TRAIN_MAX_DIFFICULTY))
        x = model.inputs(cells)
        open_ = (cells.flatten(1) > 0).float()
        if recipe == "difficulty":
            first = d.clamp_min(1)                          # the first pass the answer can be known
            T = int(first.max()) + int(rng.integers(2, 6))  # a few passes beyond the hardest sample
            settle_from = first
        else:
            T = int(rng.integers(14, 21))
            first = torch.full_like(d, T)
            settle_from = first - 3
        z = torch.zeros_like(x[0])
        ce = settle = torch.zeros(cfg.batch)
        for t in range(1, T + 1):
            z_new = model(z, x)
            on = (t >= first).float()
            bce = F.binary_cross_entropy_with_logits(model.logits(z_new), labels.float(), reduction="none")
            ce = ce + on * (bce * open_).sum(1) / open_.sum(1)
            if t >= 2:
                step_sq = (z_new - z).pow(2).sum(-1) / z_new.pow(2).sum(-1).clamp_min(1e-6)
                settle = settle + (t > settle_from).float() * (step_sq * open_).sum(1) / open_.sum(1)
            z = z_new
        count = (T + 1 - first).float()
        loss = ((ce + cfg.settle_weight * settle) / count).mean()
        if not torch.isfinite(loss):
            losses.append(float("nan"))
            continue
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{variant} seed {seed} loss {np.mean(losses[-20:]):.4f}")
    model.eval()
    return model, losses, snapshots


class HaltHead(nn.Module):
    """ACT halt head: per-cell features, pooled (mean and max over open cells) into one logit
    of 'the current answer is already right'."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.tok = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.out = nn.Linear(2 * dim, 1)

    def forward(self, z: Tensor, open_: Tensor) -> Tensor:
        h = self.tok(z)
        w = open_.unsqueeze(-1).to(h.dtype)
        mean = (h * w).sum(1) / w.sum(1).clamp_min(1)
        top = h.masked_fill(~open_.unsqueeze(-1), -1e4).amax(1)
        return self.out(torch.cat([mean, top], -1)).squeeze(-1)


def halt_pool_mazes(cfg: Config, seed: int, train_only: bool = False) -> List[Mazes]:
    """The fresh mazes whose states train a halt head: 8x8 and 16x16 of every difficulty, or
    (train_only, as TRM/HRM train theirs) as many 8x8 mazes with d <= TRAIN_MAX_DIFFICULTY."""
    rng = np.random.default_rng(2000 + seed)
    if train_only:
        return [generate(sum(cfg.act_pool), 8, rng, max_difficulty=TRAIN_MAX_DIFFICULTY)]
    return [generate(count, n, rng, max_difficulty=cfg.max_test_difficulty)
            for n, count in zip((8, 16), cfg.act_pool)]


def train_halt_head(model: MazeLoop, cfg: Config, seed: int, bar=None, train_only: bool = False) -> HaltHead:
    """BCE on 'the prediction at this pass is entirely right', on the mazes of
    `halt_pool_mazes`: the trunk's states at every pass are computed once (a pool per maze
    size), then the head is trained on random (maze, pass) pairs, 256 a step split over pools."""
    torch.manual_seed(seed)
    pools = []
    for mazes in halt_pool_mazes(cfg, seed, train_only):
        cells, labels, d = as_tensors(mazes)
        open_ = cells.flatten(1) > 0
        T = min(cfg.max_passes, int(d.max()) + 10)
        zs = []
        with torch.no_grad():
            x = model.inputs(cells)
            z = torch.zeros_like(x[0])
            for _ in range(T):
                z = model(z, x)
                zs.append(z)
            zs = torch.stack(zs)                                                  # [T, B, L, D]
            right = ((model.logits(zs) > 0) & open_ == labels).all(-1).float()    # [T, B]
        pools.append((zs.flatten(0, 1), open_.repeat(T, 1), right.flatten()))
    head = HaltHead(cfg.dim)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for step in range(cfg.act_steps):
        loss = 0.0
        for zs, open_, right in pools:
            idx = torch.randint(len(right), (256 // len(pools),))
            loss = loss + F.binary_cross_entropy_with_logits(head(zs[idx], open_[idx]), right[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if bar is not None and step % 10 == 9:
            bar.update(10)
            bar.set_postfix_str(f"{HALT_HEADS[train_only]} head seed {seed} bce {loss.item() / len(pools):.3f}")
    head.eval()
    return head


# ---------------------------------------------------------------------------------------
# evaluation: one plain run (per-pass predictions), then every rule
# ---------------------------------------------------------------------------------------

@dataclass
class PlainRun:
    """Plain iteration of the trained model for max_passes passes (index t: after t passes)."""

    correct: Tensor      # bool [T+1, B]: the whole prediction right after t passes
    changed: Tensor      # bool [T+1, B]: the prediction differs from the one after max_passes
    act: Dict[str, Tensor]    # head name -> [T+1, B]: its halting probability after t passes
    step: Dict[str, Tensor]   # norm -> [T, B]: ||z_(t+1) - z_t||
    scale: Dict[str, Tensor]  # norm -> [T, B]: ||z_(t+1)||


def plain_run(model: MazeLoop, heads: Dict[str, HaltHead], cells: Tensor, labels: Tensor, T: int,
              chunk: int = 128) -> PlainRun:
    """Plain iteration with every halt head read at every pass (one run serves every rule)."""
    parts = []
    for s in range(0, cells.shape[0], chunk):
        c, y = cells[s:s + chunk], labels[s:s + chunk]
        open_ = c.flatten(1) > 0
        with torch.no_grad():
            x = model.inputs(c)
            z = torch.zeros_like(x[0])
            probs = lambda z: torch.stack([torch.sigmoid(h(z, open_)) for h in heads.values()])  # noqa: E731
            preds, acts, steps, scales = [model.predict(z, x[1])], [probs(z)], [], []
            for _ in range(T):
                z_new = model(z, x)
                g = (z_new - z).flatten(1)
                steps.append(torch.stack([g.norm(dim=1), g.abs().amax(1)]))
                scales.append(torch.stack([z_new.flatten(1).norm(dim=1), z_new.flatten(1).abs().amax(1)]))
                z = z_new
                preds.append(model.predict(z, x[1]))
                acts.append(probs(z))
        preds = torch.stack(preds)
        parts.append(((preds == y).all(-1), (preds != preds[-1]).any(-1), torch.stack(acts, 1),
                      torch.stack(steps, 1), torch.stack(scales, 1)))
    cat = lambda i, dim: torch.cat([p[i] for p in parts], dim)  # noqa: E731
    step, scale = cat(3, 2), cat(4, 2)
    act = cat(2, 2)                                                      # [heads, T+1, B]
    return PlainRun(cat(0, 1), cat(1, 1), dict(zip(heads, act)), {"l2": step[0], "inf": step[1]},
                    {"l2": scale[0], "inf": scale[1]})


@dataclass
class Halts:
    """One rule on one test set: per sample the passes spent, right or not, settled or not."""

    passes: Tensor     # int64 [B]
    correct: Tensor    # bool [B]
    settled: Tensor    # bool [B]: the rule believes the sample finished (converged / confident)


def k_sat(run: PlainRun) -> Tensor:
    """The first pass from which the prediction no longer changes (up to max_passes)."""
    T1 = run.changed.shape[0]
    idx = torch.arange(T1).unsqueeze(1).expand_as(run.changed)
    last_change = torch.where(run.changed, idx, torch.full_like(idx, -1)).amax(0)
    return last_change + 1


def fixed_depth(run: PlainRun, K: int) -> Halts:
    B = run.correct.shape[1]
    passes = torch.full((B,), K, dtype=torch.int64)
    return Halts(passes, run.correct[K], ~run.changed[K])


def act_rule(run: PlainRun, tau: float, head: str = "act") -> Halts:
    """Halt at the first pass where the named head's probability is >= tau (else the budget)."""
    T = run.correct.shape[0] - 1
    fire = run.act[head][1:] >= tau                # halting is decided after a pass
    has = fire.any(0)
    passes = torch.where(has, fire.float().argmax(0) + 1, torch.full_like(has, T, dtype=torch.int64))
    return Halts(passes, run.correct.gather(0, passes.view(1, -1)).squeeze(0), has)


def corrected_rule(run: PlainRun, rtol: float, norm: str) -> Halts:
    """Halt after pass t+1 when r_t / (1 - rho_t) <= rtol ||z_(t+1)||, rho_t = r_t / r_(t-1).

    The distance to the fixed point of a map contracting by rho is at most r / (1 - rho); rho
    is estimated from the last two steps (at least the larger of the last two ratios, so one
    lucky small step does not count as fast contraction) and capped below 1."""
    r, s = run.step[norm], run.scale[norm]
    T = r.shape[0]
    ratio = torch.ones_like(r)
    ratio[1:] = r[1:] / r[:-1].clamp_min(1e-30)
    rho = ratio.clone()
    rho[1:] = torch.maximum(ratio[1:], ratio[:-1])
    rho = rho.clamp(0.0, 0.999)
    rho[0] = 0.999                                  # no estimate from one step: be cautious
    ok = r / (1 - rho) <= rtol * s
    has = ok.any(0)
    passes = torch.where(has, ok.float().argmax(0) + 1, torch.full_like(has, T, dtype=torch.int64))
    return Halts(passes, run.correct.gather(0, passes.view(1, -1)).squeeze(0), has)


def step_rule(run: PlainRun, rtol: float, norm: str) -> Halts:
    """fpsolve's criterion ||f(z)-z|| <= rtol ||f(z)|| replayed on the plain run (validation)."""
    ok = run.step[norm] <= rtol * run.scale[norm]
    has = ok.any(0)
    T = ok.shape[0]
    passes = torch.where(has, ok.float().argmax(0) + 1, torch.full_like(has, T, dtype=torch.int64))
    return Halts(passes, run.correct.gather(0, passes.view(1, -1)).squeeze(0), has)


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


def choose_operating_points(model: MazeLoop, heads: Dict[str, HaltHead], val: Dict[int, Mazes], cfg: Config) -> dict:
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


def fpsolve_rule(model: MazeLoop, cells: Tensor, labels: Tensor, solver: str, norm: str, rtol: float,
                 T: int, chunk: int = 256) -> Halts:
    """The fixed-point rule as fpsolve runs it: per-sample halting, its iteration counts."""
    out = []
    for s in range(0, cells.shape[0], chunk):
        c, y = cells[s:s + chunk], labels[s:s + chunk]
        with torch.no_grad():
            x = model.inputs(c)
            sol = fpsolve.solve(model, torch.zeros_like(x[0]), x, solver=solver, norm=norm, rtol=rtol,
                                max_iter=T, backward="none")
            pred = model.predict(sol.z, x[1])
        out.append((sol.iterations, (pred == y).all(-1), sol.converged))
    return Halts(*(torch.cat([o[i] for o in out]) for i in range(3)))


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


def cat_halts(parts: List[Halts]) -> Halts:
    return Halts(*(torch.cat([getattr(p, k) for p in parts]) for k in ("passes", "correct", "settled")))


def evaluate(model: MazeLoop, heads: Dict[str, HaltHead], tests: Dict[int, Mazes], val: Dict[int, Mazes],
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
    results = {}
    for key, fn in settings.items():
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


# ---------------------------------------------------------------------------------------
# diagnose
# ---------------------------------------------------------------------------------------

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
        signals = {"distance / tolerance": rep.distance / rep.tolerance.clamp_min(1e-30),
                   "spectral radius": rep.spectral_radius,
                   "restart distance": rep.restart_distance / scale}
        for i, flags in enumerate(rep.flags):
            names = {f.name for f in flags}
            rows.append((bool(rep.solution.converged[i]), bool(correct[i]), names - {"INCONSISTENT"},
                         "INCONSISTENT" in names, int(d[i]), {k: float(v[i]) for k, v in signals.items()}))
    return rows


def summarize_diagnose(rows) -> dict:
    """Recall on settled-but-wrong samples and false alarms on settled-and-correct ones, for the
    internal flags and for check= (INCONSISTENT)."""
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


FLAG_RATES = {"oscillation_rate": "OSCILLATION", "divergence_rate": "DIVERGENCE", "false_halt_rate": "FALSE_HALT",
              "slow_contraction_rate": "SLOW_CONTRACTION", "stagnation_rate": "STAGNATION"}


def flag_rates(rows) -> dict:
    """Per model: the share of samples with each flag, with none, and accuracy (all mazes, and
    those harder than training) of fixed-point halting."""
    out = {k: float(np.mean([name in r[2] for r in rows])) for k, name in FLAG_RATES.items()}
    hard = [r[1] for r in rows if r[4] > TRAIN_MAX_DIFFICULTY]
    out.update(healthy_rate=float(np.mean([not r[2] for r in rows])), accuracy=float(np.mean([r[1] for r in rows])),
               accuracy_harder_than_training=float(np.mean(hard)) if hard else float("nan"),
               settled_wrong_rate=float(np.mean([r[0] and not r[1] for r in rows])))
    return out


# ---------------------------------------------------------------------------------------
# the table, the figures, the json
# ---------------------------------------------------------------------------------------

def named_rules(ev: dict, cfg: Config) -> Dict[str, dict]:
    """The operating points the table names (chosen before looking: rtol, tau; K the best)."""
    r, c = ev["results"], ev["chosen"]
    K = ev["best_fixed_depth"]["depth"]
    return {
        f"fixed_depth (K={K}, best)": r[("fixed_depth", K)],
        f"act (tau={c['act']:g})": r[("act", c["act"])],
        **({f"act_train_only (tau={c['act_train_only']:g})": r[("act_train_only", c["act_train_only"])]}
           if "act_train_only" in c else {}),
        f"fixed_point (inf, {c['fixed_point_inf']:g})": r[("fixed_point_inf", c["fixed_point_inf"])],
        f"fixed_point_l2 ({c['fixed_point_l2']:g})": r[("fixed_point_l2", c["fixed_point_l2"])],
        f"anderson (inf, {c['anderson_inf']:g})": r[("anderson_inf", c["anderson_inf"])],
        f"fixed_point_corrected ({c['fixed_point_corrected']:g})":
            r[("fixed_point_corrected", c["fixed_point_corrected"])],
    }


def print_table(rules: Dict[str, dict]) -> str:
    names = [bucket_name(lo, hi) for lo, hi in BUCKETS]
    lines = [f"{'rule':28s} {'acc':>6s} {'passes':>7s} {'rho_all':>7s} {'rho_in':>7s} {'prem%':>6s} {'sw%':>6s} "
             f"{'acc>12':>6s} {'pas>12':>6s} {'sw>12%':>6s} {'uns>12%':>7s}  "
             + "acc/overshoot by difficulty " + " ".join(f"{n:>9s}" for n in names)]
    for name, m in rules.items():
        cells = []
        for b in names:
            if b in m["accuracy_by_bucket"]:
                cells.append(f"{m['accuracy_by_bucket'][b]:.2f}/{m['median_overshoot_correct'][b]:+.0f}".rjust(9))
            else:
                cells.append(" " * 9)
        lines.append(f"{name:28s} {m['accuracy']:6.3f} {m['mean_passes']:7.1f} {m['spearman_difficulty']:7.2f} "
                     f"{m['spearman_in_distribution']:7.2f} {100 * m['premature_halt_rate']:6.2f} "
                     f"{100 * m['settled_wrong_rate']:6.2f} {m['accuracy_harder_than_training']:6.3f} "
                     f"{m['mean_passes_harder_than_training']:6.1f} "
                     f"{100 * m['settled_wrong_rate_harder_than_training']:6.2f} "
                     f"{100 * m['unsettled_rate_harder_than_training']:7.2f}  {'':27s} " + " ".join(cells))
    return "\n".join(lines)


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

    cols = [bucket_name(lo, hi) for lo, hi in BUCKETS]
    fig, axes = plt.subplots(k, 2, figsize=(11, 2.9 * k), squeeze=False)
    for row, (label, ev) in zip(axes, evs.items()):
        rules = named_rules(ev, cfg)
        names = [n.replace(" (", "\n(", 1) for n in rules]
        over = np.array([[m["median_overshoot_correct"].get(b, np.nan) for b in cols] for m in rules.values()])
        prem = np.array([[100 * m["premature_by_bucket"].get(b, np.nan) for b in cols] for m in rules.values()])
        heatmap(row[0], over, names, cols, f"{label}: median overshoot on correct halts (halt - K_sat)", ".0f")
        heatmap(row[1], prem, names, cols, f"{label}: premature halts (% of bucket)", ".1f")
    out.append(save(fig, "halting_overshoot", tag))

    if ablation:
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
        out.append(save(fig, "halting_ablation", tag))
    return out


def jsonable(v):
    if isinstance(v, dict):
        return {str(k): jsonable(w) for k, w in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(w) for w in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.floating, np.integer)):
        return jsonable(v.item())
    return v


def mean_spread(values: List[float]) -> Tuple[float, float]:
    a = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    return (float(a.mean()), float(a.std())) if len(a) else (float("nan"), float("nan"))


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """One independent piece of the study: a model trained with one recipe, variant and seed,
    and everything measured on it (units run in parallel worker processes)."""

    recipe: str
    variant: str    # "main" or an ablation
    seed: int


class QueueBar:
    """Progress from a worker process: the two tqdm methods the training loops call, sent
    through a queue to the bar in the parent."""

    def __init__(self, queue) -> None:
        self.queue = queue

    def update(self, n: int = 1) -> None:
        self.queue.put((n, None))

    def set_postfix_str(self, text: str) -> None:
        self.queue.put((0, text))


def n_rule_settings(cfg: Config) -> int:
    return len(HALT_HEADS) * len(cfg.act_taus) + 3 * len(cfg.rtols) + len(cfg.anderson_rtols) + 2


def unit_cost(u: Unit, cfg: Config) -> int:
    """Progress-bar ticks of one unit (training steps, head steps, rule settings)."""
    if u.variant != "main":
        return cfg.ablation_steps + 1
    return cfg.steps + len(HALT_HEADS) * cfg.act_steps + n_rule_settings(cfg)


def run_unit(u: Unit, cfg: Config, tests: Dict[int, Mazes], val: Dict[int, Mazes], threads: int, bar) -> bytes:
    """Train one model and measure it; returns the results pickled (tensors by value)."""
    import pickle
    torch.set_num_threads(threads)
    if u.variant != "main":
        model, losses, _ = train_trunk(cfg, u.seed, u.variant, cfg.ablation_steps, bar, recipe=u.recipe)
        bar.set_postfix_str(f"diagnose {u.variant} seed {u.seed}")
        rows = run_diagnose(model, tests, cfg, cfg.default_rtol, restarts=0)
        bar.update(1)
        return pickle.dumps({"unit": u, "rows": rows, "final_loss": float(np.mean(losses[-20:]))})
    snap_at = (int(0.4 * cfg.steps), int(0.6 * cfg.steps)) if u.recipe == "difficulty" else ()
    model, losses, snaps = train_trunk(cfg, u.seed, "main", cfg.steps, bar, snapshot_at=snap_at, recipe=u.recipe)
    heads = {name: train_halt_head(model, cfg, u.seed, bar, train_only=name == "act_train_only")
             for name in HALT_HEADS}
    ev = evaluate(model, heads, tests, val, cfg, bar)
    bar.set_postfix_str(f"diagnose {u.recipe} seed {u.seed}")
    rtol = ev["chosen"]["fixed_point_inf"]
    probes = {}   # other sources of settled-but-wrong samples: part-trained weights, a loose criterion
    for step, state in snaps.items():
        half = MazeLoop(cfg.dim, cfg.heads)
        half.load_state_dict(state)
        probes[f"snapshot at step {step}"] = run_diagnose(half.eval(), tests, cfg, rtol)
    if u.recipe == "difficulty":
        probes[f"l2 criterion at rtol {LOOSE_L2_RTOL:g}"] = run_diagnose(model, tests, cfg, LOOSE_L2_RTOL, norm="l2")
    return pickle.dumps({
        "unit": u, "eval": ev, "extrapolated": ev["hard_accuracy_at_max"] >= 0.95,
        "final_loss": float(np.mean(losses[-20:])), "rows": run_diagnose(model, tests, cfg, rtol),
        "probe_rows": probes,
        "ablation_rows": run_diagnose(model, tests, cfg, cfg.default_rtol, restarts=0) if cfg.ablations else None})


def run_units(units: List[Unit], cfg: Config, tests, val, jobs: int, threads: int, bar) -> List[dict]:
    """Every unit, in `jobs` worker processes of `threads` torch threads each (1: in this one)."""
    import pickle
    if jobs <= 1:
        return [pickle.loads(run_unit(u, cfg, tests, val, threads, bar)) for u in units]
    import concurrent.futures as cf
    import importlib
    import multiprocessing as mp
    study = importlib.import_module("halting_study")   # workers import the functions by this name
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, cf.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        queue = manager.Queue()
        futures = [pool.submit(study.run_unit, u, cfg, tests, val, threads, QueueBar(queue)) for u in units]
        pending = set(futures)
        while pending:
            _, pending = cf.wait(pending, timeout=1.0)
            while not queue.empty():
                n, text = queue.get()
                bar.update(n)
                if text:
                    bar.set_postfix_str(text)
        return [pickle.loads(f.result()) for f in futures]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one seed, small sets, no ablations (<= 5 min)")
    p.add_argument("--seeds", type=int, nargs="*", help="override the seeds")
    p.add_argument("--steps", type=int, help="override the training steps")
    p.add_argument("--recipes", nargs="*", choices=RECIPES, help="override the training recipes")
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--ablations", nargs="*", choices=[v for v in VARIANTS if v != "main"],
                   help="override the ablations to run")
    p.add_argument("--jobs", type=int, default=2, help="worker processes, one model each (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker (1 is fastest on a shared 2-core machine)")
    p.add_argument("--out", default=None, help="json path (full run default: docs/halting.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    cfg = QUICK if args.quick else FULL
    if args.seeds:
        cfg = replace(cfg, seeds=args.seeds)
    if args.steps:
        cfg = replace(cfg, steps=args.steps, ablation_steps=args.steps)
    if args.recipes:
        cfg = replace(cfg, recipes=tuple(args.recipes))
    if args.ablations is not None:
        cfg = replace(cfg, ablations=tuple(args.ablations))
    if args.no_ablation:
        cfg = replace(cfg, ablations=())
    tag = "_quick" if args.quick else ""
    t0 = time.time()
    rng = np.random.default_rng(12345)
    tests = {n: generate(cfg.n_test[n], n, rng, max_difficulty=cfg.max_test_difficulty) for n in (8, 16)}
    val = {n: generate(cfg.n_val[n], n, rng, max_difficulty=cfg.max_test_difficulty) for n in (8, 16)}
    units = ([Unit(r, "main", s) for r in cfg.recipes for s in cfg.seeds]
             + [Unit("difficulty", v, s) for v in cfg.ablations for s in cfg.seeds])
    bar = tqdm(total=sum(unit_cost(u, cfg) for u in units), desc="halting study", unit="step",
               dynamic_ncols=True, mininterval=2.0)
    results = run_units(units, cfg, tests, val, min(args.jobs, len(units)), args.threads, bar)
    bar.close()
    runtime = time.time() - t0

    by_recipe = {r: [o for o in results if o["unit"].variant == "main" and o["unit"].recipe == r]
                 for r in cfg.recipes}
    ablation = summarize_ablation(results, cfg)
    for recipe, outs in by_recipe.items():
        for o in outs:
            ev = o["eval"]
            print(f"\n[{RECIPE_LABELS[recipe]}] seed {o['unit'].seed}: trained loss {o['final_loss']:.4f}; accuracy after "
                  f"{cfg.max_passes} passes on mazes harder than training {ev['hard_accuracy_at_max']:.3f} -> "
                  f"{'extrapolated' if o['extrapolated'] else 'did NOT extrapolate'}; best fixed depth "
                  f"K={ev['best_fixed_depth']['depth']} acc {ev['best_fixed_depth']['accuracy']:.3f}")
            print(print_table(named_rules(ev, cfg)))
            for label, rows in [("trained model", o["rows"])] + list(o["probe_rows"].items()):
                dg = summarize_diagnose(rows)
                print(f"diagnose, {label} ({dg['samples']} samples; {dg['settled_wrong']} settled-but-wrong, "
                      f"{dg['settled_correct']} settled-and-correct): internal flags catch {fmt(dg['settled_wrong_recall'])}"
                      f" of false halts, fire on {fmt(dg['false_alarm_rate'])} of settled-and-correct; with check=: "
                      f"catch {fmt(dg['check_recall'])}, false alarms {fmt(dg['check_false_alarm_rate'])}; "
                      f"flags {dg['flag_counts']}")
    if ablation:
        print("\nablation (diagnose flags, % of samples, mean over seeds):")
        for name, a in ablation.items():
            print(f"  {name:18s} " + " ".join(f"{k.replace('_rate', '')} {100 * a[k]:5.1f}"
                                              for k in list(FLAG_RATES) + ["healthy_rate", "accuracy"])
                  + f"  extrapolated {a['extrapolated_seeds']}/{len(a['per_seed'])}")
    figs = make_figures({RECIPE_LABELS[r]: outs[0]["eval"] for r, outs in by_recipe.items()}, cfg,
                        ablation or None, tag)
    print(f"\nfigures: {', '.join(os.path.relpath(f, ROOT) for f in figs)}")
    print(f"runtime {runtime:.0f} s")
    summary = build_json(by_recipe, results, ablation, cfg, runtime, args.quick)
    out = args.out or (None if args.quick else os.path.join(ROOT, "docs", "halting.json"))
    if out:
        with open(out, "w") as fh:
            json.dump(jsonable(summary), fh, indent=1)
        print(f"wrote {os.path.relpath(out, ROOT)}")


def fmt(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{100 * v:.1f}%"


def summarize_ablation(results: List[dict], cfg: Config) -> dict:
    """Per ablation (and the main model under the same protocol): flag rates, mean and spread
    over seeds, and per seed whether fixed-point halting extrapolated (>= 0.95 on d > 12)."""
    if not cfg.ablations:
        return {}
    per = {"main": [(o["unit"].seed, o["ablation_rows"]) for o in results
                    if o["unit"].variant == "main" and o["unit"].recipe == "difficulty"]}
    for name in cfg.ablations:
        per[name] = [(o["unit"].seed, o["rows"]) for o in results if o["unit"].variant == name]
    out = {}
    for name, seeds in per.items():
        rates = [flag_rates(rows) for _, rows in seeds]
        entry = {k: mean_spread([r[k] for r in rates])[0] for k in rates[0]}
        entry["spread"] = {k: mean_spread([r[k] for r in rates])[1] for k in rates[0]}
        entry["per_seed"] = [{"seed": seed, **r, "extrapolated": bool(r["accuracy_harder_than_training"] >= 0.95)}
                             for (seed, _), r in zip(seeds, rates)]
        entry["extrapolated_seeds"] = sum(r["extrapolated"] for r in entry["per_seed"])
        out[name] = entry
    return out


def summarize_rules(outs: List[dict], cfg: Config) -> dict:
    """Per rule at its operating point: the mean over the given seeds, the spread under 'spread'."""
    rule_names = list(named_rules(outs[0]["eval"], cfg))
    rules = {}
    for i, name in enumerate(rule_names):
        ms = [list(named_rules(o["eval"], cfg).values())[i] for o in outs]
        entry, spread = {}, {}
        keys = ["accuracy", "mean_passes", "spearman_difficulty", "spearman_in_distribution",
                "premature_halt_rate", "settled_wrong_rate"]
        keys += [k for k in ms[0] if k.endswith(("_harder_than_training", "_8x8", "_16x16"))]
        for k in keys:
            entry[k], spread[k] = mean_spread([m[k] for m in ms])
        for k in ("median_overshoot_correct", "accuracy_by_bucket", "premature_by_bucket"):
            entry[k] = {b: mean_spread([m[k].get(b, float("nan")) for m in ms])[0] for b in ms[0][k]}
        entry["settled_correct_table"] = {k: int(sum(m["settled_correct_table"][k] for m in ms))
                                          for k in ms[0]["settled_correct_table"]}
        entry["spread"] = spread
        entry["per_seed_accuracy"] = [m["accuracy"] for m in ms]
        entry["per_seed"] = {k: [m[k] for m in ms] for k in keys}
        entry["operating_point_per_seed"] = [list(named_rules(o["eval"], cfg))[i] for o in outs]
        rules[name.split(" ")[0]] = entry
    return rules


def summarize_recipe(outs: List[dict], cfg: Config) -> dict:
    """One recipe's rules (mean over seeds, spread under 'spread'; also over the seeds that
    extrapolated only), sweeps and per-seed facts."""
    rules = summarize_rules(outs, cfg)
    good = [o for o in outs if o["extrapolated"]]
    sweeps: Dict[str, list] = {}
    for key in outs[0]["eval"]["results"]:
        acc = [o["eval"]["results"][key]["accuracy"] for o in outs]
        passes = [o["eval"]["results"][key]["mean_passes"] for o in outs]
        sweeps.setdefault(key[0], []).append({"setting": key[1], "accuracy": mean_spread(acc)[0],
                                              "mean_passes": mean_spread(passes)[0],
                                              "per_seed_accuracy": acc, "per_seed_mean_passes": passes})
    bests = [o["eval"]["best_fixed_depth"] for o in outs]
    return {
        "rules": rules,
        "rules_extrapolated_seeds": summarize_rules(good, cfg) if good and len(good) < len(outs) else None,
        "sweeps": sweeps,
        "best_fixed_depth": {"depth": int(round(np.mean([b["depth"] for b in bests]))),
                             "accuracy": float(np.mean([b["accuracy"] for b in bests])), "per_seed": bests},
        "extrapolated_seeds": int(sum(o["extrapolated"] for o in outs)),
        "per_seed": [{"seed": o["unit"].seed, "extrapolated": o["extrapolated"], "final_loss": o["final_loss"],
                      "hard_accuracy_at_max_passes": o["eval"]["hard_accuracy_at_max"],
                      "operating_points": o["eval"]["chosen"],
                      "diagnose_trained": summarize_diagnose(o["rows"]),
                      "diagnose_probes": {k: summarize_diagnose(v) for k, v in o["probe_rows"].items()}}
                     for o in outs],
    }


def build_json(by_recipe: Dict[str, List[dict]], results: List[dict], ablation: dict, cfg: Config,
               runtime: float, quick: bool) -> dict:
    """docs/halting.json: the top level is the difficulty-supervised recipe (the issue's schema);
    'label_free' has the same fields for the label-free recipe; 'diagnose' pools every model."""
    mains = [o for o in results if o["unit"].variant == "main"]
    sources = {f"trained, {RECIPE_LABELS[r]}": sum((o["rows"] for o in outs), []) for r, outs in by_recipe.items()}
    for prefix, name in (("snapshot", "part-trained snapshots"), ("l2", f"l2 criterion at rtol {LOOSE_L2_RTOL:g}")):
        sources[name] = sum((v for o in mains for k, v in o["probe_rows"].items() if k.startswith(prefix)), [])
    sources["ablations"] = sum((o["rows"] for o in results if o["unit"].variant != "main"), [])
    sources = {k: v for k, v in sources.items() if v}
    all_rows = sum(sources.values(), [])
    healthy = sum((o["rows"] for o in mains if o["extrapolated"]), [])
    dg_all = summarize_diagnose(all_rows)
    top = by_recipe.get("difficulty") or next(iter(by_recipe.values()))
    return {
        "task": "grid-maze reachability (examples/maze.py): train 8x8 with BFS depth <= 12; test 8x8 and 16x16 "
                f"(depth <= {cfg.max_test_difficulty}); {cfg.n_test[8]} + {cfg.n_test[16]} test mazes",
        "seeds": cfg.seeds,
        "quick": quick,
        "runtime_seconds": runtime,
        "max_passes": cfg.max_passes,
        "recipe": RECIPE_LABELS[top[0]["unit"].recipe],
        **summarize_recipe(top, cfg),
        **({"label_free": {"recipe": RECIPE_LABELS["fixed_passes"], **summarize_recipe(by_recipe["fixed_passes"], cfg)}}
           if by_recipe.get("fixed_passes") and top is not by_recipe["fixed_passes"] else {}),
        "diagnose": {
            **{k: dg_all[k] for k in ("settled_wrong_recall", "false_alarm_rate", "check_recall",
                                      "check_false_alarm_rate", "check_or_flags_recall", "samples",
                                      "settled_wrong", "settled_correct", "flag_counts")},
            "healthy_false_alarm_rate": summarize_diagnose(healthy)["false_alarm_rate"] if healthy else None,
            "by_source": {k: summarize_diagnose(v) for k, v in sources.items()},
        },
        "ablation": ablation,
    }


if __name__ == "__main__":
    main()
