"""The halting rules, on one plain run of the trained model (per-pass predictions, head
readings and step norms), and on fpsolve's own solves.

  fixed_depth      K passes for every sample (a hand rule: a budget, not a criterion)
  act              fpsolve.HaltHead on a learned ActHead, replayed on the run (a sweep of tau)
  act_train_only   the same with the head trained and tuned on the training distribution
  fixed_point      fpsolve.solve with fpsolve.Residual, plain iteration, per-sample halting,
                   ||f(z)-z|| <= rtol ||f(z)|| (norm "inf" and "l2"; `fpsolve_rule`), and
                   the same criterion replayed on the run for validation (`step_rule`)
  anderson         the same criterion with Anderson acceleration
  fixed_point_corrected   a hand rule on the run: the estimated distance to the fixed point
                   r_t / (1 - rho_t) below the tolerance (fpsolve has no such criterion)

fpsolve.Stable and fpsolve.OutputKL are not used: no rule of the study halts on an unchanged
answer or a still read-out distribution (K_sat, below, is a retrospective measure).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import Tensor

import fpsolve
from maze import MazeLoop

from .training import ActHead


@dataclass
class PlainRun:
    """Plain iteration of the trained model for max_passes passes (index t: after t passes)."""

    correct: Tensor      # bool [T+1, B]: the whole prediction right after t passes
    changed: Tensor      # bool [T+1, B]: the prediction differs from the one after max_passes
    halt_logit: Dict[str, Tensor]   # head name -> [T+1, B]: its halting logit after t passes
    step: Dict[str, Tensor]   # norm -> [T, B]: ||z_(t+1) - z_t||
    scale: Dict[str, Tensor]  # norm -> [T, B]: ||z_(t+1)||


@dataclass
class Halts:
    """One rule on one test set: per sample the passes spent, right or not, settled or not."""

    passes: Tensor     # int64 [B]
    correct: Tensor    # bool [B]
    settled: Tensor    # bool [B]: the rule believes the sample finished (converged / confident)


def _run_chunk(model: MazeLoop, heads: Dict[str, ActHead], cells: Tensor, labels: Tensor, T: int) -> tuple:
    """One chunk of `plain_run`: (correct, changed, logits [heads, T+1, B], steps, scales)."""
    open_ = cells.flatten(1) > 0
    with torch.no_grad():
        x = model.inputs(cells)
        z = torch.zeros_like(x[0])

        def logits(z: Tensor) -> Tensor:
            return torch.stack([h(z, open_) for h in heads.values()]) if heads else z.new_zeros(0, z.shape[0])

        preds, logs, steps, scales = [model.predict(z, x[1])], [logits(z)], [], []
        for _ in range(T):
            z_new = model(z, x)
            g = (z_new - z).flatten(1)
            steps.append(torch.stack([g.norm(dim=1), g.abs().amax(1)]))
            scales.append(torch.stack([z_new.flatten(1).norm(dim=1), z_new.flatten(1).abs().amax(1)]))
            z = z_new
            preds.append(model.predict(z, x[1]))
            logs.append(logits(z))
    preds = torch.stack(preds)
    return ((preds == labels).all(-1), (preds != preds[-1]).any(-1), torch.stack(logs, 1),
            torch.stack(steps, 1), torch.stack(scales, 1))


def plain_run(model: MazeLoop, heads: Dict[str, ActHead], cells: Tensor, labels: Tensor, T: int,
              chunk: int = 128) -> PlainRun:
    """Plain iteration with every halt head read at every pass (one run serves every rule;
    `heads` may be empty)."""
    parts = [_run_chunk(model, heads, cells[s:s + chunk], labels[s:s + chunk], T)
             for s in range(0, cells.shape[0], chunk)]

    def cat(i: int, dim: int) -> Tensor:
        return torch.cat([p[i] for p in parts], dim)

    step, scale = cat(3, 2), cat(4, 2)
    logit = cat(2, 2)                                                    # [heads, T+1, B]
    return PlainRun(cat(0, 1), cat(1, 1), dict(zip(heads, logit)), {"l2": step[0], "inf": step[1]},
                    {"l2": scale[0], "inf": scale[1]})


def k_sat(run: PlainRun) -> Tensor:
    """The first pass from which the prediction no longer changes (up to max_passes).

    A measure, not a rule: it looks back from the budget. (fpsolve.Stable, which halts once
    the answer has stayed the same for `patience` passes, can only halt after it.)"""
    T1 = run.changed.shape[0]
    idx = torch.arange(T1).unsqueeze(1).expand_as(run.changed)
    last_change = torch.where(run.changed, idx, torch.full_like(idx, -1)).amax(0)
    return last_change + 1


def _first_halt(run: PlainRun, ok: Tensor) -> Halts:
    """ok: bool [T, B], whether a rule holds after pass t + 1. Each sample halts after its first
    such pass (settled), else after the budget T (not settled); its answer is read there."""
    T = ok.shape[0]
    has = ok.any(0)
    passes = torch.where(has, ok.float().argmax(0) + 1, torch.full_like(has, T, dtype=torch.int64))
    return Halts(passes, run.correct.gather(0, passes.view(1, -1)).squeeze(0), has)


def fixed_depth(run: PlainRun, K: int) -> Halts:
    """K passes for every sample. A hand rule: a fixed depth is a budget (max_iter=K), and
    fpsolve has no criterion that never halts."""
    B = run.correct.shape[1]
    passes = torch.full((B,), K, dtype=torch.int64)
    return Halts(passes, run.correct[K], ~run.changed[K])


def _recorded(logit: Tensor) -> Tensor:
    """The head as `plain_run` already read it: its logit, as recorded."""
    return logit


def act_rule(run: PlainRun, tau: float, head: str = "act") -> Halts:
    """Halt at the first pass t >= 1 where `fpsolve.HaltHead(threshold=tau)` fires on the named
    head's logit at z_t, sigmoid(logit) >= tau (else the budget).

    The criterion's own check is replayed on the logits the plain run recorded, so one run
    serves every tau. (`fpsolve.solve(criterion=fpsolve.HaltHead(...))` counts the same way:
    the head reads the newest state z_t = f(z_(t-1)), and a halt there reports t passes.)"""
    logits = run.halt_logit[head][1:]              # [T, B]: halting is decided after a pass
    rule = fpsolve.HaltHead(_recorded, threshold=tau)
    flat = logits.reshape(-1)
    fire, _ = rule.check(None, flat, rule.init(flat, flat.shape[0], flat.device))
    return _first_halt(run, fire.view_as(logits))


def step_rule(run: PlainRun, rtol: float, norm: str) -> Halts:
    """`fpsolve.Residual(rtol=rtol, norm=norm)` replayed on the plain run (for validation):
    halt after pass t + 1 at the first ||z_(t+1) - z_t|| <= atol + rtol ||z_(t+1)||.

    Residual has no per-pass method to call (fpsolve's loop applies it in its own arithmetic),
    so its inequality is applied to the run's norms with the criterion's tolerances. The pass
    counts are fpsolve's (tests/test_halting_study.py checks them against `fpsolve_rule`); the
    answer is read after the last pass, at z_(t+1), where fpsolve returns z_t."""
    rule = fpsolve.Residual(rtol=rtol, norm=norm)
    return _first_halt(run, run.step[rule.norm] <= rule.atol + rule.rtol * run.scale[rule.norm])


def corrected_rule(run: PlainRun, rtol: float, norm: str) -> Halts:
    """Halt after pass t+1 when r_t / (1 - rho_t) <= rtol ||z_(t+1)||, rho_t = r_t / r_(t-1).

    The distance to the fixed point of a map contracting by rho is at most r / (1 - rho); rho
    is estimated from the last two steps (at least the larger of the last two ratios, so one
    lucky small step does not count as fast contraction) and capped below 1. A hand rule:
    fpsolve has no distance-based criterion (Residual bounds the step, not the distance)."""
    r, s = run.step[norm], run.scale[norm]
    ratio = torch.ones_like(r)
    ratio[1:] = r[1:] / r[:-1].clamp_min(1e-30)
    rho = ratio.clone()
    rho[1:] = torch.maximum(ratio[1:], ratio[:-1])
    rho = rho.clamp(0.0, 0.999)
    rho[0] = 0.999                                  # no estimate from one step: be cautious
    return _first_halt(run, r / (1 - rho) <= rtol * s)


def fpsolve_rule(model: MazeLoop, cells: Tensor, labels: Tensor, solver: str, norm: str, rtol: float,
                 T: int, chunk: int = 256) -> Halts:
    """The fixed-point rule as fpsolve runs it: `fpsolve.Residual` with per-sample halting, its
    iteration counts, the answer read at `sol.z`."""
    out = []
    for s in range(0, cells.shape[0], chunk):
        c, y = cells[s:s + chunk], labels[s:s + chunk]
        with torch.no_grad():
            x = model.inputs(c)
            sol = fpsolve.solve(model, torch.zeros_like(x[0]), x, solver=solver, max_iter=T, backward="none",
                                criterion=fpsolve.Residual(rtol=rtol, norm=norm))
            pred = model.predict(sol.z, x[1])
        out.append((sol.iterations, (pred == y).all(-1), sol.converged))
    return Halts(*(torch.cat([o[i] for o in out]) for i in range(3)))


def cat_halts(parts: List[Halts]) -> Halts:
    return Halts(*(torch.cat([getattr(p, k) for p in parts]) for k in ("passes", "correct", "settled")))
