"""Plain iteration z <- f(z) from z0, the looped model as it runs: settling, divergence,
unbounded growth and the period of a cycle.

The halting test is the solve's own residual rule (`Residual.norms` / `excess`) and the
divergence limit is the solve's (`_rules.limit`), so a sample that the solve would call
DIVERGED is divergent here too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor

from .._criteria import Residual
from .._rules import floor, limit, sample_norm
from .._tree import select_rows

#: A cycle closes when z_t and z_(t-p) are this close, relative to the orbit's diameter.
CYCLE_CLOSURE = 1e-3
#: States wider than this are stored as a random sign sketch of this width for cycle detection.
SKETCH_WIDTH = 1024


class Sketch:
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


@dataclass(frozen=True)
class PlainSetup:
    """How to run plain iteration: the budget, the longest period looked for, the residual
    rule in force, per-sample halting, and the machine epsilon of the user's dtype."""

    steps: int
    max_period: int
    rule: Residual
    per_sample: bool
    precision: float


@dataclass
class Plain:
    """What plain iteration did, per sample (`[B]` unless noted)."""

    trace: Tensor       # [N, B] residual of plain iteration (nan once the row stopped)
    lengths: Tensor     # steps taken
    settled: Tensor     # the halting rule held (or it moved only by rounding)
    diverged: Tensor    # non-finite or beyond the divergence limit
    grew: Tensor        # the state's norm keeps growing (unbounded drift)
    period: Tensor      # int64: the cycle's length (0: none)
    rows: int           # rows passed through f

    @staticmethod
    def nothing(B: int, like: Tensor) -> "Plain":
        """The record of a plain run that could not run: no trace, no finding."""
        false = torch.zeros(B, dtype=torch.bool, device=like.device)
        zero = torch.zeros(B, dtype=torch.int64, device=like.device)
        return Plain(like.new_zeros(0, B), zero, false, false, false, zero.clone(), 0)


class _Record:
    """The plain run's per-step bookkeeping: residual trace, state norms and the ring of the
    last max_period + 2 (sketched) states, written for the rows still running."""

    def __init__(self, z0: Tensor, setup: PlainSetup, sketch: Sketch) -> None:
        B, steps = z0.shape[0], setup.steps
        self.sketch, self.slots = sketch, setup.max_period + 2
        self.ring = z0.new_zeros(self.slots, B, sketch.width)
        self.ring[0] = sketch(z0)
        self.trace = z0.new_full((steps, B), float("nan"))
        self.state_norm = z0.new_full((steps + 1, B), float("nan"))
        self.state_norm[0] = torch.linalg.vector_norm(z0, dim=1)

    def write(self, t: int, idx: Tensor, r: Tensor, z: Tensor) -> None:
        """Step t's residual `r` and new state `z` for the rows `idx`."""
        self.trace[t].index_copy_(0, idx, r)
        self.ring[(t + 1) % self.slots].index_copy_(0, idx, self.sketch(z))
        self.state_norm[t + 1].index_copy_(0, idx, torch.linalg.vector_norm(z, dim=1))


def plain_run(fn: Callable[[Tensor, Any], Tensor], z0: Tensor, x: Any, setup: PlainSetup,
              gen: torch.Generator) -> Plain:
    """Plain iteration z <- f(z) from z0 ([B, n] rows): settling, divergence, growth, period.

    Rows that settle or diverge are dropped (per-sample halting; with batch halting f sees
    the whole batch and a row that went bad is frozen); the last max_period + 2 states of
    every row are kept (sketched when wide) to find the period at the end. A row whose
    motion stays within a few units of `setup.precision` of its state has settled as far as
    its precision allows: rounding, not a cycle.
    """
    B, n = z0.shape
    dev = z0.device
    rule = setup.rule
    rec = _Record(z0, setup, Sketch(n, dev, gen))
    settled = torch.zeros(B, dtype=torch.bool, device=dev)
    diverged = torch.zeros(B, dtype=torch.bool, device=dev)
    lengths = torch.full((B,), setup.steps, dtype=torch.int64, device=dev)
    idx = torch.arange(B, device=dev)
    z, xa, lim, rows, t = z0, x, None, 0, -1
    for t in range(setup.steps):
        fz = fn(z, xa)
        rows += z.shape[0]
        r, fnorm = rule.norms(fz - z, fz)
        if lim is None:
            lim = limit(r, fnorm, floor(n, rule.norm))
        done = rule.excess(r, fnorm) <= 0
        bad = ~(r <= lim) | ~torch.isfinite(fnorm)
        if not setup.per_sample:   # f sees the whole batch: freeze what went bad, keep the rest going
            fz = torch.where(bad.unsqueeze(1), z, fz)
            done = done & ~settled & ~diverged
            bad = bad & ~settled & ~diverged
        z = fz
        rec.write(t, idx, r, z)
        stop = done | bad
        if bool(stop.any()):
            settled[idx[done & ~bad]] = True
            diverged[idx[bad]] = True
            lengths[idx[stop]] = t + 1
            if setup.per_sample:
                keep = (~stop).nonzero().squeeze(1)
                idx, z, lim = idx[keep], z[keep], lim[keep]
                xa = select_rows(xa, keep)
                if idx.numel() == 0:
                    break
            elif bool((settled | diverged).all()):
                break
    N = t + 1   # states z_0 .. z_N exist for the rows still running at the end
    running = ~(settled | diverged)
    period, rounding = _period(rec, N, setup, running)
    if rounding is not None:
        settled |= rounding
        running &= ~rounding
    grew = running & _growing(rec, lengths)
    return Plain(rec.trace[:N], lengths, settled, diverged, grew, period, rows)


def _period(rec: _Record, N: int, setup: PlainSetup, running: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """Per row: the shortest p in [2, max_period] with z_N ≈ z_(N-p) and z_(N-1) ≈ z_(N-1-p)
    (within CYCLE_CLOSURE of the orbit's diameter; 0: none), and which running rows moved
    only by rounding (None when the run was too short to tell)."""
    B, slots, ring = running.shape[0], rec.slots, rec.ring
    period = torch.zeros(B, dtype=torch.int64, device=running.device)
    P = min(setup.max_period, N - 2)
    if P < 2:
        return period, None
    last, prev = ring[N % slots], ring[(N - 1) % slots]
    d_last = torch.stack([sample_norm(last - ring[(N - p) % slots], "l2") for p in range(1, P + 1)])
    d_prev = torch.stack([sample_norm(prev - ring[(N - 1 - p) % slots], "l2") for p in range(1, P + 1)])
    diameter = torch.maximum(d_last.amax(0), d_prev.amax(0))
    closes = (d_last <= CYCLE_CLOSURE * diameter) & (d_prev <= CYCLE_CLOSURE * diameter) & (diameter > 0)
    closes[0] = False   # period 1 is settling, not a cycle
    moving = d_last[0] > CYCLE_CLOSURE * diameter
    first = torch.where(closes.any(0), closes.to(torch.uint8).argmax(0) + 1, 0)
    rounding = running & (diameter <= 4 * setup.precision * torch.linalg.vector_norm(last, dim=1))
    return torch.where(running & moving & ~rounding, first, 0), rounding


def _growing(rec: _Record, lengths: Tensor) -> Tensor:
    """bool [B]: over a run of 8 steps or more, the state's norm grew 1.5x over the second
    half and ended 10x above the start's scale ||z0|| + first residual (unbounded drift)."""
    mid = rec.state_norm.gather(0, (lengths // 2).view(1, -1)).squeeze(0)
    end = rec.state_norm.gather(0, lengths.view(1, -1)).squeeze(0)
    start_scale = rec.state_norm[0] + rec.trace[0]
    return (end >= 1.5 * mid) & (end >= 10 * start_scale) & (lengths >= 8)


__all__ = ["Plain", "PlainSetup", "Sketch", "plain_run", "CYCLE_CLOSURE", "SKETCH_WIDTH"]
