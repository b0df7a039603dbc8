"""Per-row stepping (`k` an int64 tensor [B]) for fixed-shape continuous batching.

Rows start new samples at different passes (k[i] == 0: a fresh sample in row i); every row
must follow, step for step, the trajectory that the int-k path gives its sample alone, for
every built-in solver and option that changes the state (the safeguard, beta, the line
search, Broyden's restart when its memory fills). The per-row step must also trace into one
graph (torch.compile, fullgraph): no host sync, no data-dependent shape.
"""
from __future__ import annotations

from typing import List, Tuple

import pytest
import torch

import fpsolve

from problems import generator

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
N = 3
W_TANH = torch.randn(N, N, dtype=F64, generator=generator(11))
W_TANH = 1.1 * W_TANH / torch.linalg.matrix_norm(W_TANH, ord=2)


def f(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x = [kind, a, b, c] per row: kind 0: z + Powell-like badly scaled F (first two entries),
    kind 1: tanh(a W z + b) (a > 1: plain iteration may not contract), kind 2: logistic r z (1 - z)."""
    kind, a, b = x[:, :1], x[:, 1:2], x[:, 2:3]
    x0, x1 = z[:, :1], z[:, 1:2]
    powell = torch.cat((1e4 * x0 * x1 - 1, torch.exp(-x0) + torch.exp(-x1) - 1.0001, z[:, 2:] - b), 1)
    tanh = torch.tanh(a * (z @ W_TANH.T) + b)
    logistic = a * z * (1 - z)
    return torch.where(kind == 0, z + powell, torch.where(kind == 1, tanh, logistic))


def samples() -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(z0 [N], x [4]) of a mixed set of samples."""
    g = generator(5)
    out = []
    for start in ((0.0, 1.0, 0.0), (-2.0, -1.0, 0.5), (0.5, 0.5, 0.0)):
        out.append((torch.tensor(start, dtype=F64), torch.tensor([0.0, 0.0, 0.3, 0.0], dtype=F64)))
    for a in (0.8, 1.2, 1.6):
        out.append((torch.zeros(N, dtype=F64), torch.cat((torch.tensor([1.0, a]), torch.randn(2, generator=g))).double()))
    for r in (2.9, 3.3):
        out.append((torch.tensor([0.3, 0.6, 0.8], dtype=F64), torch.tensor([2.0, r, 0.0, 0.0], dtype=F64)))
    return out


def alone(solver, z0: torch.Tensor, x: torch.Tensor, steps: int, f=f) -> torch.Tensor:
    """The points evaluated by the int-k path on this sample alone (B = 1)."""
    z, x = z0[None].clone(), x[None]
    seen = []
    with torch.no_grad():
        for k in range(steps):
            fz = f(z, x)
            seen.append(z[0])
            g = fz - z
            if k == 0:
                state = solver.init(z, fz, g)
            z, state = solver.step(state, z, fz, g, k)
    return torch.stack(seen)


def rows(solver, schedule: List[List[Tuple[int, int]]], data, passes: int, f=f):
    """Run rows through fixed-shape passes; row i hosts the samples schedule[i] = [(sample,
    steps), ...] one after the other. Returns, per (row, slot in schedule), the points evaluated,
    and whether the safeguard / line search fired anywhere."""
    b = len(schedule)
    pos = [0] * b
    k = torch.zeros(b, dtype=torch.int64)
    z = torch.stack([data[schedule[i][0][0]][0] for i in range(b)])
    x = torch.stack([data[schedule[i][0][0]][1] for i in range(b)])
    seen = {(i, j): [] for i in range(b) for j in range(len(schedule[i]))}
    fired = False
    with torch.no_grad():
        for t in range(passes):
            fz = f(z, x)
            g = fz - z
            for i in range(b):
                if pos[i] < len(schedule[i]):
                    seen[(i, pos[i])].append(z[i].clone())
            if t == 0:
                state = solver.init(z, fz, g)
            z, state = solver.step(state, z, fz, g, k)
            fired |= _fired(solver, state)
            k = k + 1
            for i in range(b):   # rows whose sample has had its steps take the next one
                if pos[i] < len(schedule[i]) and k[i] == schedule[i][pos[i]][1]:
                    pos[i] += 1
                    if pos[i] < len(schedule[i]):
                        z0, xi = data[schedule[i][pos[i]][0]]
                        z[i], x[i], k[i] = z0, xi, 0
    return seen, fired


def _fired(solver, state) -> bool:
    if isinstance(solver, fpsolve.Anderson):
        return bool((state[7][:, 2] > 0).any())    # rejections
    if isinstance(solver, fpsolve.Broyden):
        return bool((state[6] < 1).any())          # a backtracking trial
    return False


SOLVERS = [
    fpsolve.FixedPointIteration(),
    fpsolve.FixedPointIteration(damping=0.6),
    fpsolve.Anderson(m=3),
    fpsolve.Anderson(m=3, safeguard=False),
    fpsolve.Anderson(m=4, beta=0.7),
    fpsolve.Anderson(m=4, beta=0.7, safeguard=False),
    fpsolve.Broyden(memory=4),
    fpsolve.Broyden(memory=4, line_search=False),
    fpsolve.Broyden(memory=6),
]

# Four rows; each hosts samples of different lengths, so that starts, Anderson's slot cycle
# and Broyden's restart (memory 4 or 6) fall at different passes in every row.
SCHEDULE = [
    [(0, 13), (3, 5), (6, 9)],
    [(4, 3), (1, 11), (7, 7), (2, 4)],
    [(5, 7), (6, 1), (2, 10), (0, 6)],
    [(7, 10), (3, 2), (1, 12)],
]


def _compare(solver, schedule, data, f=f, tol=lambda sample: 1e-10):
    passes = max(sum(s for _, s in row) for row in schedule)
    seen, fired = rows(solver, schedule, data, passes, f)
    for (i, j), pts in seen.items():
        sample, steps = schedule[i][j]
        assert len(pts) == steps
        want = alone(solver, *data[sample], steps, f).flatten(1)
        got = torch.stack(pts).flatten(1)
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got)), f"row {i}, sample {sample}"
        err = ((got - want).abs() / (1 + want.abs()))[finite].max().item()
        assert err <= tol(sample), f"row {i}, sample {sample} ({steps} steps): {err:.2e}"
    return fired


@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
def test_each_row_follows_its_solo_trajectory(solver):
    data = samples()
    # Rounding differs (the per-row small systems carry identity blocks for the unused
    # slots); Anderson's nearly dependent columns on the 1e4-scaled Powell rows amplify it
    # to ~3e-8, elsewhere it stays below 1e-10. (The BLAS kernels differ between machines:
    # one CPU measured 1.5e-7 and 5e-10 here, so the bounds carry a factor of 10 of room.)
    fired = _compare(solver, SCHEDULE, data, tol=lambda sample: 1e-6 if data[sample][1][0] == 0 else 1e-9)
    if getattr(solver, "line_search", False):
        assert fired, "the schedule should exercise the line search"


@pytest.mark.parametrize("solver", [fpsolve.Anderson(m=3), fpsolve.Anderson(m=4, beta=0.7),
                                    fpsolve.Anderson(m=4, beta=0.7, safeguard=False)], ids=repr)
def test_rows_through_safeguard_rejections(solver):
    """The tutorial's ResNet layer (tests/test_safeguard.py): Anderson's safeguard first
    rejects an iterate after about 30 steps there; rows start at different passes."""
    from test_safeguard import ResNetLayer
    torch.manual_seed(0)
    layer = ResNetLayer(4, 8, 2).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 4, 4, 4, dtype=F64)[1].repeat(3, 1, 1, 1)
    x[1, 0, 0, 0] += 1e-6
    x[2, 1, 2, 3] -= 1e-6
    data = [(torch.zeros(4, 4, 4, dtype=F64), x[i]) for i in range(3)]
    schedule = [[(0, 50), (1, 40)], [(1, 7), (0, 45), (2, 40)], [(2, 44), (0, 52)]]
    fired = _compare(solver, schedule, data, f=layer, tol=lambda sample: 1e-8)   # (3e-9 measured on one CPU)
    assert fired == solver.safeguard


@pytest.mark.parametrize("solver", [fpsolve.Anderson(m=3), fpsolve.Anderson(m=3, beta=0.7, safeguard=False),
                                    fpsolve.Broyden(memory=4), fpsolve.FixedPointIteration(damping=0.5)], ids=repr)
def test_per_row_step_traces_into_one_graph(solver):
    """fullgraph=True fails on any host sync (.item(), bool(tensor)) or data-dependent shape."""
    data = samples()
    z = torch.stack([d[0] for d in data[:4]])
    x = torch.stack([d[1] for d in data[:4]])
    fz = f(z, x)
    state = solver.init(z, fz, fz - z)
    k = torch.tensor([0, 1, 5, 2])
    eager_state = tuple(s.clone() if isinstance(s, torch.Tensor) else s for s in state)
    with torch.no_grad():
        step = torch.compile(solver.step, backend="eager", fullgraph=True, dynamic=False)
        z1, _ = step(state, z, fz, fz - z, k)
        z2, _ = solver.step(eager_state, z, fz, fz - z, k)
    torch.testing.assert_close(z1, z2)


def test_fresh_row_ignores_a_poisoned_history():
    """A row whose previous sample went non-finite: the next tenant starts clean."""
    for solver in (fpsolve.Anderson(m=3), fpsolve.Broyden(memory=4)):
        data = samples()
        z = torch.stack([data[3][0], data[4][0]])
        x = torch.stack([data[3][1], data[4][1]])
        with torch.no_grad():
            fz = f(z, x)
            state = solver.init(z, fz, fz - z)
            k = torch.zeros(2, dtype=torch.int64)
            for t in range(4):
                fz = f(z, x)
                if t == 2:
                    fz[1] = float("nan")   # row 1's sample blows up
                z, state = solver.step(state, z, fz, fz - z, k)
                k += 1
            z[1], x[1], k[1] = data[5][0], data[5][1], 0   # a new sample in row 1
            pts = []
            for t in range(6):
                pts.append(z[1].clone())
                fz = f(z, x)
                z, state = solver.step(state, z, fz, fz - z, k)
                k += 1
        want = alone(solver, *data[5], 6)
        torch.testing.assert_close(torch.stack(pts), want, rtol=1e-9, atol=1e-9)


def test_per_row_flag_is_documented_on_the_protocol():
    assert "per_row" in (fpsolve.Solver.__doc__ or "")
    for s in (fpsolve.FixedPointIteration(), fpsolve.Anderson(), fpsolve.Broyden()):
        assert s.per_row is True
