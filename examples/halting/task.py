"""The study's task and configuration: maze sizes and difficulty buckets, the quick and full
settings, the training recipes and the architecture ablations.

The mazes themselves (generator, BFS difficulty, the looped model `MazeLoop`) are in
examples/maze.py; this module holds what the study decides about them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from maze import Mazes

TRAIN_MAX_DIFFICULTY = 12          # training mazes: 8x8 with BFS depth d <= 12
BUCKETS = [(0, 3), (4, 7), (8, 12), (13, 20), (21, 30), (31, 99)]

RECIPES = ("difficulty", "fixed_passes")
RECIPE_LABELS = {"difficulty": "difficulty-supervised", "fixed_passes": "label-free, 14-20 passes"}
HALT_HEADS = ("act", "act_train_only")   # every difficulty of both sizes; the training distribution only
LOOSE_L2_RTOL = 0.3   # a criterion loose enough to halt mid-propagation: a source of premature "settled" states
VARIANTS = {
    "main": dict(),
    "no_state_norm": dict(normalize_state=False),
    "no_prenorm": dict(prenorm=False),
    "residual_scale_1": dict(residual_scale=1.0),
}


def bucket_name(lo: int, hi: int) -> str:
    return f"{lo}-{hi}" if hi < 99 else f"{lo}+"


def as_tensors(m: Mazes) -> Tuple[Tensor, Tensor, Tensor]:
    """(cells [B, n, n], reachable [B, n*n], difficulty [B]) as tensors."""
    return (torch.as_tensor(m.cells), torch.as_tensor(m.reachable).flatten(1),
            torch.as_tensor(m.difficulty))


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
