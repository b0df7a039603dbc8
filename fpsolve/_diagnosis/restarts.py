"""Restarts: more solves with the user's options from other starting points (the origin, the
mirror image of the solution, then random points at several distances from it); a converged
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

#: The distances, in solution-norms, of the random restart points from the solution, in turn
#: (restarts 2, 3, 4, 5, ...): a second attractor a few solution-norms away is reached even
#: where one distance lands on a repelling root (in 1-D, z* - |z*| is the origin).
SPREAD = (1.0, 3.0, 0.3)
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
        start = start_point(i, zf, scale, z0_zero, gen)
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


def start_point(i: int, zf: Tensor, scale: Tensor, z0_zero: Tensor, gen: torch.Generator) -> Tensor:
    """Restart i's start [B, n]: 0, the origin (a spread point for samples whose z0 is already
    0); 1, the mirror image -z* (an odd map's other fixed point; a spread point where z* = 0);
    then z* + s ξ scale, ξ a random unit direction and s cycling through SPREAD."""
    noise = random_like(zf, gen)
    unit = noise / torch.linalg.vector_norm(noise, dim=1, keepdim=True).clamp_min(1e-30)
    if i == 0:
        return torch.where(z0_zero.unsqueeze(1), zf + unit * scale.unsqueeze(1), 0.0)
    if i == 1:
        flat = (zf.abs().amax(dim=1) == 0).unsqueeze(1)
        return torch.where(flat, zf + unit * scale.unsqueeze(1), -zf)
    return zf + unit * (SPREAD[(i - 2) % len(SPREAD)] * scale).unsqueeze(1)


def attracting(problem: Problem, point: Tensor, nudge: Tensor, slack: Tensor, steps: int,
               gen: torch.Generator) -> Tensor:
    """bool [B]: plain iteration from `point` moved by `nudge` (a random direction) comes back
    to within 2 nudge + slack of it after `steps` passes (a repelling fixed point does not)."""
    noise = random_like(point, gen)
    z = point + noise * (nudge / torch.linalg.vector_norm(noise, dim=1).clamp_min(1e-30)).unsqueeze(1)
    for _ in range(steps):
        z = problem.flat_fn(z, problem.x)
    return sample_norm(z - point, problem.opts.rule.norm) <= 2 * nudge + slack


__all__ = ["Search", "search", "start_point", "attracting", "NUDGE", "SPREAD"]
