"""The linearisation at the returned point, by one batched Arnoldi process (`spectral`):
the spectrum of ∂f/∂z, the Newton distance to the fixed point, and the linear response of
the fixed point to a small random change of x (the input sensitivity)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Tuple

import torch
from torch import Tensor

from .._rules import sample_norm
from .._tree import map_tensors, select_rows, tensors_in
from .spectral import Linearization, arnoldi, krylov_solve, ritz_values
from .common import Account, Point, Problem

#: Relative size of the random perturbation of x used for the sensitivity.
PERTURBATION = 1e-2


@dataclass
class Linear:
    """Per sample: spectral radius, Ritz values [B, k], Newton distance, sensitivity (nan: not
    measured), and how J v was taken ("forward", "differences"; "none": not at all)."""

    radius: Tensor
    eigenvalues: Tensor
    distance: Tensor
    sensitivity: Tensor
    method: str = "none"

    @staticmethod
    def unknown(B: int, k: int, like: Tensor) -> "Linear":
        nan = torch.full((B,), float("nan"), dtype=like.dtype, device=like.device)
        eig = torch.full((B, k), complex(float("nan"), float("nan")), dtype=torch.complex128)
        return Linear(nan, eig, nan.clone(), nan.clone())


def analyse(problem: Problem, point: Point, krylov: int, jacobian: str, gen: torch.Generator,
            account: Account) -> Linear:
    """Spectrum, distance and sensitivity; a failure leaves nan where nothing was measured
    (and a note)."""
    B, n = problem.batch, problem.width
    k = max(1, min(krylov, n))
    out = Linear.unknown(B, k, point.z)
    perturbable = any(t.is_floating_point() and t.ndim > 0 for t in tensors_in(problem.x))
    try:
        starts, moved = [point.g], None
        if perturbable:
            xp, moved = perturb(problem.x, PERTURBATION, gen)
            starts.append(problem.flat_fn(point.z, xp) - point.fz)
            account.evaluations["other"] += B
        runs = _arnoldi_runs(problem, point, starts, k, jacobian, gen, account, out)
        Q, H, b = runs[0]
        ritz = ritz_values(H[:B])
        out.eigenvalues = ritz.cpu()
        out.radius = ritz.abs().amax(dim=1).to(point.z.dtype)
        out.distance = _distance(Q[:B], H[:B], b[:B], point, problem.opts.rule.norm)
        if perturbable:
            Qd, Hd, bd = runs[1] if len(runs) > 1 else (Q[B:], H[B:], b[B:])
            out.sensitivity = _sensitivity(Qd, Hd, bd, point.z, moved)
        out.radius = torch.where(point.finite, out.radius, float("nan"))
        out.distance = torch.where(point.finite, out.distance, float("nan"))
    except Exception as err:   # noqa: BLE001 - reported, never raised
        account.failed("the Jacobian analysis", err, "spectral radius, distance and sensitivity are nan")
    return out


def _arnoldi_runs(problem: Problem, point: Point, starts: List[Tensor], k: int, jacobian: str,
                  gen: torch.Generator, account: Account, out: Linear) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """Arnoldi from each start (its own right-hand side): stacked into one batch of rows when
    samples are independent (halting="sample"), one run per start otherwise (f sees the batch)."""
    B = problem.batch
    stacked = len(starts) > 1 and problem.opts.per_sample
    groups = [torch.cat(starts)] if stacked else starts
    runs = []
    for start in groups:
        reps = start.shape[0] // B
        lin = Linearization(problem.flat_fn, point.z.repeat(reps, 1), stack_rows(problem.x, reps), jacobian)
        Q, H = arnoldi(lin, start, k, gen)
        runs.append((Q, H, start))
        account.evaluations["jvp"] += lin.jvp_rows
        account.evaluations["differences"] += lin.f_rows
        out.method = lin.method
        if lin.error:
            account.notes.append(f"forward-mode AD failed ({lin.error}); Jacobian-vector products by central differences")
    return runs


def _distance(Q: Tensor, H: Tensor, b: Tensor, point: Point, norm: str) -> Tensor:
    """The Newton step's length ||(I - J)^-1 (f(z) - z)||, extrapolated over the part the Krylov
    space leaves unresolved (inf when nothing is resolved; 0 at an exact root)."""
    e, rel = krylov_solve(Q, H, b)
    step = sample_norm(e, norm)
    distance = torch.where(rel < 0.99, step / (1 - rel).clamp_min(1e-2), float("inf"))
    return torch.where(point.residual > 0, distance, 0.0).to(point.z.dtype)


def _sensitivity(Q: Tensor, H: Tensor, b: Tensor, z: Tensor, moved: Tensor) -> Tensor:
    """Relative change of z* (the linear response dz = (I - J)^-1 b) over the relative change
    `moved` of x; inf for z* = 0 moved at all."""
    dz, rel = krylov_solve(Q, H, b)
    change = torch.linalg.vector_norm(dz, dim=1) / (1 - rel).clamp_min(1e-2)
    change = torch.where(rel < 0.99, change, float("inf"))
    size = torch.linalg.vector_norm(z, dim=1)
    none = torch.where(change > 0, float("inf"), 0.0)        # z* = 0: any change is infinite
    relative = torch.where(size > 0, change / size.clamp_min(1e-300), none)
    return (relative / moved.to(relative)).to(z.dtype)


def perturb(x: Any, size: float, gen: torch.Generator) -> Tuple[Any, Tensor]:
    """x with its floating tensors moved by random noise, and the relative size of the move [B].

    Each tensor gets Gaussian noise scaled to `size` times its own per-sample RMS (so leaves
    of different scales move alike); the returned size is ||δ|| / ||x|| over all of them.
    """
    moved, base = [], []

    def move(t: Tensor) -> Tensor:
        if not t.is_floating_point() or t.ndim == 0:
            return t
        flat = t.reshape(t.shape[0], -1)
        noise = torch.randn(flat.shape, generator=gen, dtype=torch.float64).to(device=t.device, dtype=t.dtype)
        rms = torch.linalg.vector_norm(flat, dim=1, keepdim=True) / math.sqrt(max(flat.shape[1], 1))
        delta = size * rms * noise
        moved.append(delta.double().square().sum(dim=1))
        base.append(flat.double().square().sum(dim=1))
        return (flat + delta).view_as(t)

    out = map_tensors(move, x)
    rel = (torch.stack(moved).sum(0) / torch.stack(base).sum(0)).sqrt()
    return out, rel


def stack_rows(x: Any, copies: int) -> Any:
    """x with its batch repeated `copies` times (rows [x; x; ...]), for a stacked batch."""
    leaves = tensors_in(x)
    if copies == 1 or not leaves:
        return x
    B = leaves[0].shape[0]
    return select_rows(x, torch.arange(B, device=leaves[0].device).repeat(copies))


__all__ = ["Linear", "analyse", "perturb", "stack_rows", "PERTURBATION"]
