"""Grid-maze reachability: a reasoning task with a known per-sample difficulty (issue 6).

A maze is an n x n grid of cells, each a wall, an open cell, or the start (one open cell).
The label of a cell is whether it can be reached from the start by steps between open
4-neighbours. A looped model sees the grid as n*n tokens, one per cell; attention lets a cell
read only itself and its 4 neighbours, and wall cells carry no state (`MazeLoop` zeroes them
after every pass). Information therefore moves at most one open cell per pass, and a cell at
BFS distance k >= 1 from the start cannot tell, before pass k, whether the start is connected to it
(its view up to then is the same as in a maze whose start lies elsewhere). The sample's
difficulty, the BFS depth d = the largest distance from the start to a reachable cell, is a
lower bound on the passes any such local update needs to label every cell right.

    grids = generate(256, n=8, rng=np.random.default_rng(0), max_difficulty=12)
    grids.cells        # int64 [B, n, n]: WALL, OPEN or START
    grids.reachable    # bool [B, n, n]: the labels
    grids.difficulty   # int64 [B]: BFS depth
    consistent(pred_reachable, grids.cells)   # the task's own check, per sample

Everything here is generated on the fly (numpy); nothing is downloaded.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch
from torch import Tensor, nn

import fpsolve

WALL, OPEN, START = 0, 1, 2


# ---------------------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------------------

def bfs_distances(cells: np.ndarray) -> np.ndarray:
    """BFS distance from the start to every cell of one grid (-1: unreachable or a wall)."""
    n, m = cells.shape
    dist = np.full((n, m), -1, dtype=np.int64)
    starts = np.argwhere(cells == START)
    if len(starts) != 1:
        raise ValueError(f"a maze needs exactly one start cell; got {len(starts)}.")
    r0, c0 = starts[0]
    dist[r0, c0] = 0
    queue = deque([(r0, c0)])
    while queue:
        r, c = queue.popleft()
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            rr, cc = r + dr, c + dc
            if 0 <= rr < n and 0 <= cc < m and cells[rr, cc] != WALL and dist[rr, cc] < 0:
                dist[rr, cc] = dist[r, c] + 1
                queue.append((rr, cc))
    return dist


@dataclass
class Mazes:
    """A batch of same-size mazes (numpy arrays) with their labels and difficulties."""

    cells: np.ndarray        # int64 [B, n, n]
    reachable: np.ndarray    # bool [B, n, n]
    difficulty: np.ndarray   # int64 [B]: BFS depth of the reachable region

    @property
    def n(self) -> int:
        return self.cells.shape[1]

    def __len__(self) -> int:
        return self.cells.shape[0]


def generate(count: int, n: int, rng: np.random.Generator, wall_prob: float = 0.3,
             max_difficulty: Optional[int] = None, min_difficulty: int = 0) -> Mazes:
    """`count` random n x n mazes: each cell a wall with probability `wall_prob`, the start a
    uniformly chosen open cell; kept only when min_difficulty <= BFS depth <= max_difficulty."""
    cells, labels, depth = [], [], []
    while len(cells) < count:
        grid = np.where(rng.random((n, n)) < wall_prob, WALL, OPEN).astype(np.int64)
        open_cells = np.argwhere(grid == OPEN)
        if len(open_cells) == 0:
            continue
        r, c = open_cells[rng.integers(len(open_cells))]
        grid[r, c] = START
        dist = bfs_distances(grid)
        d = int(dist.max())
        if d < min_difficulty or (max_difficulty is not None and d > max_difficulty):
            continue
        cells.append(grid)
        labels.append(dist >= 0)
        depth.append(d)
    return Mazes(np.stack(cells), np.stack(labels), np.asarray(depth, dtype=np.int64))


def local_propagation(cells: np.ndarray, passes: int) -> np.ndarray:
    """The cells a purely local update can know to be reachable after `passes` passes.

    A pass lets each cell read its neighbours' state and input (the input is injected at every
    pass), so after pass 1 the start and its open neighbours can know, and each later pass adds
    one more step along open cells: the best any model whose cells read only their neighbours
    can do. Used by the tests to check that the BFS depth is exactly the passes needed (labels
    right from pass max(d, 1) on, not before).
    """
    known = np.zeros(cells.shape, dtype=bool)
    if passes < 1:
        return known
    known = cells == START
    open_ = cells != WALL
    for _ in range(passes):
        grown = known.copy()
        grown[1:] |= known[:-1]
        grown[:-1] |= known[1:]
        grown[:, 1:] |= known[:, :-1]
        grown[:, :-1] |= known[:, 1:]
        known = grown & open_
    return known


def consistent(pred: Tensor, cells: Tensor) -> Tensor:
    """The task's own check, per sample: the start is predicted reachable, and no open cell
    next to a predicted-reachable cell is predicted unreachable.

    pred, cells: [B, n, n] (bool prediction; WALL/OPEN/START codes). A prediction passing it
    contains the true reachable set (it is closed under steps and holds the start); it cannot
    see extra cells wrongly marked reachable in a region cut off from the start.
    """
    open_ = cells != WALL
    pred = pred & open_
    start_ok = (pred | (cells != START)).flatten(1).all(1)
    spread = torch.zeros_like(pred)
    spread[:, 1:] |= pred[:, :-1]
    spread[:, :-1] |= pred[:, 1:]
    spread[:, :, 1:] |= pred[:, :, :-1]
    spread[:, :, :-1] |= pred[:, :, 1:]
    closed = ~(spread & open_ & ~pred).flatten(1).any(1)
    return start_ok & closed


def neighbour_mask(n: int) -> Tensor:
    """[n*n, n*n] bool attention mask, True = blocked: each cell sees itself and 4 neighbours."""
    idx = torch.arange(n * n)
    r, c = idx // n, idx % n
    near = (r[:, None] - r[None, :]).abs() + (c[:, None] - c[None, :]).abs() <= 1
    return ~near


# ---------------------------------------------------------------------------------------
# the looped model
# ---------------------------------------------------------------------------------------

class MazeLoop(nn.Module):
    """One pass of the looped model on mazes: f(z, x) with shared weights for every grid size.

    x = (emb, code): emb [B, L, D] the embedded cells (injected at every pass), code [B, L, 1]
    the cell codes as floats (the per-sample data that the mask of wall cells needs; kept in x
    so that per-sample halting hands f only the rows still active). The neighbour mask depends
    only on the grid size, so one mask per size is kept here and passed to the shared
    `fpsolve.LoopedTransformerBlock` at each call. Wall cells are zeroed after each pass so
    that no information travels through them.
    """

    def __init__(self, dim: int = 32, heads: int = 2, residual_scale: float = 0.2,
                 prenorm: bool = True, normalize_state: bool = True, sizes=(8, 16)) -> None:
        super().__init__()
        self.dim = dim
        self.embed = nn.Embedding(3, dim)
        self.core = fpsolve.LoopedTransformerBlock(dim, heads=heads, residual_scale=residual_scale,
                                                   prenorm=prenorm, normalize_state=normalize_state)
        self.readout = nn.Linear(dim, 1)
        self.masks: Dict[int, Tensor] = {}
        for n in sizes:
            self.mask_for(n)

    def mask_for(self, n: int) -> Tensor:
        if n not in self.masks:
            self.masks[n] = neighbour_mask(n)
        return self.masks[n]

    def inputs(self, cells: Tensor):
        """x for f from cell codes [B, n, n]: (embedding [B, L, D], codes [B, L, 1])."""
        flat = cells.flatten(1)
        return self.embed(flat), flat.unsqueeze(-1).to(self.embed.weight.dtype)

    def forward(self, z: Tensor, x) -> Tensor:
        emb, code = x
        L = z.shape[1]
        n = int(round(L ** 0.5))
        out = self.core(z, emb, attn_mask=self.mask_for(n).to(z.device))
        return out * (code > 0.5).to(out.dtype)

    def logits(self, z: Tensor) -> Tensor:
        """Per-cell logit of 'reachable', [B, L]."""
        return self.readout(z).squeeze(-1)

    def predict(self, z: Tensor, code: Tensor) -> Tensor:
        """Per-cell prediction [B, L] (walls: never reachable)."""
        return (self.logits(z) > 0) & (code.squeeze(-1) > 0.5)


def make_check(model: MazeLoop):
    """check(z, x) -> bool [B] for fpsolve.diagnose: `consistent` on the model's readout."""

    def check(z: Tensor, x) -> Tensor:
        code = x[1]
        B, L = code.shape[:2]
        n = int(round(L ** 0.5))
        cells = code.squeeze(-1).round().long().view(B, n, n)
        pred = model.predict(z, code).view(B, n, n)
        return consistent(pred, cells)

    return check
