"""Restarts: more solves with the user's options from other starting points; a converged
restart that lands far from the solution on a point that attracts is a second attractor
(`PATH_DEPENDENCE`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor

from .._rules import sample_norm
from .._solution import Status
from .._solve import solve_with
from .common import Account, Point, Problem, random_like
from .verdict import FALSE_HALT_FACTOR

#: A restart's fixed point attracts when plain iteration from it, moved by this fraction of the
#: sample's scale, comes back (a repelling root reached exactly is not a second attractor).
NUDGE = 1e-3


@dataclass
class Search:
    """How to restart: how many solves, the plain-iteration budget of the attraction check,
    and the seed (the restart points draw on the diagnosis' generator; the nudges on their own)."""

    restarts: int
    steps: int
    seed: int


def search(problem: Problem, point: Point, distance: Tensor, setup: Search, gen: torch.Generator,
           account: Account) -> Tuple[Tensor, Tensor]:
    """Per sample: the largest distance from the solution to another attracting fixed point
    that a restart reached (nan: none), and whether there was one."""
    B, n = problem.batch, problem.width
    restart_distance = torch.full((B,), float("nan"), dtype=point.z.dtype, device=point.z.device)
    path = torch.zeros(B, dtype=torch.bool, device=point.z.device)
    if not setup.restarts:
        return restart_distance, path
    nudge_gen = torch.Generator().manual_seed(setup.seed + 1)   # (leaves the restarts' own draws as they were)
    zf = point.z
    scale = torch.maximum(torch.linalg.vector_norm(zf, dim=1), torch.linalg.vector_norm(problem.z0, dim=1))
    scale = torch.where(scale > 0, scale, math.sqrt(n))
    z0_zero = problem.z0.abs().amax(dim=1) == 0
    dist_ok = torch.where(torch.isfinite(distance), distance, 0.0)
    threshold = FALSE_HALT_FACTOR * (point.tolerance + dist_ok) + 10 * torch.finfo(problem.layout.dtype).eps * scale
    norm = problem.opts.rule.norm
    for i in range(setup.restarts):
        noise = random_like(zf, gen)
        spread = zf + noise * (scale / torch.linalg.vector_norm(noise, dim=1).clamp_min(1e-30)).unsqueeze(1)
        start = torch.where(z0_zero.unsqueeze(1), spread, 0.0) if i == 0 else spread
        try:
            rsol = solve_with(problem.f, problem.layout.unpack(start.view(problem.shape)), problem.x,
                              problem.opts.replace(backward=None))
        except Exception as err:   # noqa: BLE001 - reported, never raised
            account.failed(f"restart {i}", err)
            continue
        account.evaluations["restarts"] += rsol.evaluations
        landed = problem.layout.pack(rsol.z).reshape(B, -1)
        gap = sample_norm(landed - zf, norm)
        other = (rsol.status == int(Status.CONVERGED)) & (gap > threshold)
        if bool(other.any()):   # a second attractor, or a repelling root hit exactly?
            try:
                other &= attracting(problem, landed, NUDGE * scale, threshold, setup.steps, nudge_gen)
                account.evaluations["restarts"] += B * setup.steps
            except Exception as err:   # noqa: BLE001 - reported, never raised
                account.failed(f"the stability check of restart {i}'s fixed point", err)
        restart_distance = torch.where(other, torch.fmax(restart_distance, gap), restart_distance)
        path |= other
    return restart_distance, path


def attracting(problem: Problem, point: Tensor, nudge: Tensor, slack: Tensor, steps: int,
               gen: torch.Generator) -> Tensor:
    """bool [B]: plain iteration from `point` moved by `nudge` (a random direction) comes back
    to within 2 nudge + slack of it after `steps` passes (a repelling fixed point does not)."""
    noise = random_like(point, gen)
    z = point + noise * (nudge / torch.linalg.vector_norm(noise, dim=1).clamp_min(1e-30)).unsqueeze(1)
    for _ in range(steps):
        z = problem.flat_fn(z, problem.x)
    return sample_norm(z - point, problem.opts.rule.norm) <= 2 * nudge + slack


__all__ = ["Search", "search", "attracting", "NUDGE"]
