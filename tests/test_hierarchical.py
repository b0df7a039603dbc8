"""examples/hierarchical.py: the two-timescale loop is one fixed-point map over (z_high, z_low),
information moves at most T + 1 cells per pass (the supervision schedule relies on it), the two
models have equal parameters, and the example runs end to end (tiny sizes)."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import fpsolve  # noqa: E402
import hierarchical  # noqa: E402
from maze import OPEN, START, WALL, bfs_distances, generate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def grid(rows):
    code = {"#": WALL, ".": OPEN, "S": START}
    return np.array([[code[ch] for ch in row] for row in rows], dtype=np.int64)


SNAKE = grid([
    "S.....",
    "#####.",
    "......",
    ".#####",
    "......",
    "######",
])


def test_the_tuple_map_is_solved_and_both_levels_are_fixed():
    torch.manual_seed(0)
    model = hierarchical.TwoTimescale(dim=8, heads=2, low_steps=3, sizes=(6,)).double().eval()
    cells = torch.as_tensor(np.stack([SNAKE, generate(1, 6, np.random.default_rng(0)).cells[0]]))
    with torch.no_grad():
        x = model.inputs(cells)
        sol = fpsolve.solve(model, model.start(x), x, solver="fixed_point", rtol=1e-10, max_iter=300)
        assert sol.converged.all()
        z_high, z_low = sol.z
        f_high, f_low = model(sol.z, x)
        scale = max(float(z_high.abs().max()), float(z_low.abs().max()))
        assert float((f_high - z_high).abs().max()) < 1e-8 * scale
        assert float((f_low - z_low).abs().max()) < 1e-8 * scale
        # each level is a fixed point of its own map with the other frozen at the solution
        assert torch.allclose(model.low_map(z_low, (x[0], x[1], z_high)), z_low, atol=1e-8)
        assert torch.allclose(model.high_map(z_high, (x[0], x[1], z_low)), z_high, atol=1e-8)
        assert (z_high[cells.flatten(1) == WALL] == 0).all() and (z_low[cells.flatten(1) == WALL] == 0).all()


@pytest.mark.parametrize("low_steps", [1, 2, 3])
def test_a_pass_moves_information_at_most_T_plus_one_cells(low_steps):
    """Remove the start: after k passes, cells farther than k (T + 1) keep bit-identical states
    at both levels, and the readout level z_high has seen every cell within k T (so
    supervising from pass ceil(d / T) asks nothing impossible)."""
    torch.manual_seed(0)
    model = hierarchical.TwoTimescale(dim=8, heads=2, low_steps=low_steps, sizes=(6,)).double()
    dist = torch.as_tensor(bfs_distances(SNAKE)).flatten()
    without = SNAKE.copy()
    without[SNAKE == START] = OPEN
    both = torch.as_tensor(np.stack([SNAKE, without]))
    reach = low_steps + 1
    with torch.no_grad():
        x = model.inputs(both)
        z = model.start(x)
        for k in range(1, 20 // reach + 2):
            z = model(z, x)
            for level in z:
                same = (level[0] - level[1]).abs().amax(-1) == 0
                assert same[dist > k * reach].all(), f"pass {k}: beyond {k * reach} cells"
            # readable by pass ceil(d / T); at random weights the influence falls ~50x per cell,
            # below float64 round-off beyond ~8 cells, so this is checked up to 6
            seen = (z[0][0] - z[0][1]).abs().amax(-1) > 0
            assert seen[(dist >= 0) & (dist <= min(k * low_steps, 6))].all(), f"pass {k}"


def test_equal_parameters():
    single, two = hierarchical.SingleTimescale(32, 2), hierarchical.TwoTimescale(22, 2)
    a, b = hierarchical.n_params(single), hierarchical.n_params(two)
    assert (a, b) == (8737, 8405) and abs(a - b) / a < 0.04


def test_settle_pass():
    step = torch.tensor([[1.0, 1.0, 1.0], [0.1, 1e-4, 1.0], [1e-4, 1e-4, 1.0], [1e-5, 1e-2, 1.0]])
    assert hierarchical.settle_pass(step, 1e-3).tolist() == [3, 5, 5]


def test_the_example_runs(tmp_path):
    out = hierarchical.main(["--steps", "3", "--small", "--figure", str(tmp_path / "h.png"),
                             "--json", str(tmp_path / "h.json")])
    assert (tmp_path / "h.png").exists()
    saved = json.loads((tmp_path / "h.json").read_text())
    assert set(saved["results"]) == {"single", "two-timescale"}
    for r in out["results"].values():
        assert 0 <= r["accuracy"] <= 1 and r["mean_passes"] >= 1
        assert {"8x8", "16x16"} <= set(r["stats"])
    assert set(out["diagnose"]) == {"whole", "low", "high"}
    assert out["diagnose"]["whole"]["samples"] == 8
