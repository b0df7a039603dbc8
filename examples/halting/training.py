"""Training: the looped trunk (two recipes, deep supervision) and the ACT halt heads on it.

The trunk is trained with unrolled gradients through every pass (`halting.supervision`):
implicit or phantom gradients only see the fixed point, while here the answer is carried by
the propagation itself, and early in training there is no fixed point to differentiate at.

The ACT baseline is a halt head on the frozen trunk (`ActHead`): from the state it predicts
whether the current answer is already right (binary cross-entropy). `act` is trained on
8x8 and 16x16 mazes of every difficulty; `act_train_only` on the training distribution only
(8x8, d <= 12), as TRM and HRM train theirs.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from maze import MazeLoop, Mazes, generate

from .supervision import deep_supervision_loss
from .task import HALT_HEADS, RECIPES, TRAIN_MAX_DIFFICULTY, VARIANTS, Config, as_tensors


def train_trunk(cfg: Config, seed: int, variant: str, steps: int, bar=None,
                snapshot_at: Tuple[int, ...] = (), recipe: str = "difficulty"
                ) -> Tuple[MazeLoop, List[float], Dict[int, dict]]:
    """The looped model trained on 8x8 mazes with d <= 12 (unrolled gradients).

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
        loss = deep_supervision_loss(model, torch.zeros_like(x[0]), x, labels, open_, first, settle_from, T,
                                     cfg.settle_weight)
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


class ActHead(nn.Module):
    """The ACT halt head (a module; not `fpsolve.HaltHead`, the criterion that reads one):
    per-cell features, pooled (mean and max over open cells) into one logit of 'the current
    answer is already right'."""

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


def head_pool(model: MazeLoop, mazes: Mazes, max_passes: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The trunk's states at every pass 1..min(max_passes, max(d) + 10) of `mazes`, flattened
    over (pass, maze), with their open-cell masks and whether the prediction there is entirely
    right (the head's target)."""
    cells, labels, d = as_tensors(mazes)
    open_ = cells.flatten(1) > 0
    T = min(max_passes, int(d.max()) + 10)
    zs = []
    with torch.no_grad():
        x = model.inputs(cells)
        z = torch.zeros_like(x[0])
        for _ in range(T):
            z = model(z, x)
            zs.append(z)
        zs = torch.stack(zs)                                                  # [T, B, L, D]
        right = ((model.logits(zs) > 0) & open_ == labels).all(-1).float()    # [T, B]
    return zs.flatten(0, 1), open_.repeat(T, 1), right.flatten()


def train_halt_head(model: MazeLoop, cfg: Config, seed: int, bar=None, train_only: bool = False) -> ActHead:
    """BCE on 'the prediction at this pass is entirely right', on the mazes of
    `halt_pool_mazes`: the trunk's states at every pass are computed once (a pool per maze
    size), then the head is trained on random (maze, pass) pairs, 256 a step split over pools."""
    torch.manual_seed(seed)
    pools = [head_pool(model, mazes, cfg.max_passes) for mazes in halt_pool_mazes(cfg, seed, train_only)]
    head = ActHead(cfg.dim)
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
