"""The maze task of examples/maze.py: labels, difficulty as a lower bound on passes, the check."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from maze import (OPEN, START, WALL, MazeLoop, bfs_distances, consistent, generate,  # noqa: E402
                  local_propagation, make_check)


def grid(rows):
    """A maze from strings: '#' wall, '.' open, 'S' start."""
    code = {"#": WALL, ".": OPEN, "S": START}
    return np.array([[code[ch] for ch in row] for row in rows], dtype=np.int64)


CORRIDOR = grid([
    "S.#.",
    "#.#.",
    "#...",
    "####",
])


def test_bfs_on_a_hand_made_grid():
    dist = bfs_distances(CORRIDOR)
    assert dist[0, 0] == 0 and dist[2, 1] == 3 and dist[0, 3] == 7
    assert dist.max() == 7
    assert (dist[CORRIDOR == WALL] == -1).all()


def test_labels_and_difficulty_match_bfs():
    rng = np.random.default_rng(0)
    m = generate(40, 8, rng, max_difficulty=12)
    assert m.cells.shape == (40, 8, 8) and m.difficulty.max() <= 12
    for cells, reach, d in zip(m.cells, m.reachable, m.difficulty):
        dist = bfs_distances(cells)
        assert (reach == (dist >= 0)).all()
        assert d == dist.max()
        assert (cells == START).sum() == 1


def test_difficulty_is_the_passes_local_propagation_needs():
    """The best purely local update labels every cell right from pass max(d, 1), never before."""
    rng = np.random.default_rng(1)
    m = generate(60, 8, rng)
    for cells, reach, d in zip(m.cells, m.reachable, m.difficulty):
        need = max(int(d), 1)
        assert (local_propagation(cells, need) == reach).all()
        assert not (local_propagation(cells, need - 1) == reach).all()


def test_the_model_cannot_see_the_start_before_its_distance():
    """In MazeLoop a cell at BFS distance k is unaffected by the start for its first k-1 passes:
    remove the start (make it an open cell) and the states of far cells stay identical."""
    torch.manual_seed(0)
    model = MazeLoop(dim=16, heads=2, sizes=(6,)).double()
    cells = grid([
        "S.....",
        "#####.",
        "......",
        ".#####",
        "......",
        "######",
    ])
    dist = torch.as_tensor(bfs_distances(cells)).flatten()
    without = cells.copy()
    without[cells == START] = OPEN
    both = torch.as_tensor(np.stack([cells, without]))
    with torch.no_grad():
        x = model.inputs(both)
        z = torch.zeros_like(x[0])
        for t in range(1, 20):   # the farthest cell is at distance 19
            z = model(z, x)
            same = (z[0] - z[1]).abs().amax(-1) == 0
            far = dist > t                # distance k > t: the start is out of reach after t passes
            assert same[far].all(), f"pass {t}: a cell farther than {t} saw the start"
            if t <= 5:   # the start's influence shrinks with distance; float64 still sees it here
                reached = (dist >= 0) & (dist <= t)
                assert not same[reached].any(), f"pass {t}: a cell within {t} did not see the start"


@pytest.mark.parametrize("rows, pred_rows, ok", [
    # the exact answer passes
    (["S.#.", "#.#.", "#...", "####"], ["11.1", ".1.1", ".111", "...."], True),
    # a cell cut off along the corridor: an open neighbour of a reachable cell is unreachable
    (["S.#.", "#.#.", "#...", "####"], ["11.1", ".1.1", ".1.1", "...."], False),
    # the start itself predicted unreachable (an all-'unreachable' answer)
    (["S.#.", "#.#.", "#...", "####"], ["....", "....", "....", "...."], False),
    # an extra isolated region wrongly marked reachable: closed, so the check cannot see it
    (["S#..", "##..", "....", "...."], ["1.11", "..11", "1111", "1111"], True),
    # the start alone in a closed pocket
    (["S#..", "##..", "....", "...."], ["1...", "....", "....", "...."], True),
])
def test_consistency_check(rows, pred_rows, ok):
    cells = torch.as_tensor(grid(rows)).unsqueeze(0)
    pred = torch.tensor([[ch == "1" for ch in r] for r in pred_rows]).unsqueeze(0)
    assert consistent(pred, cells).tolist() == [ok]


def test_check_on_model_states_matches_consistent():
    torch.manual_seed(0)
    model = MazeLoop(dim=16, heads=2)
    rng = np.random.default_rng(3)
    m = generate(8, 8, rng)
    cells = torch.as_tensor(m.cells)
    with torch.no_grad():
        x = model.inputs(cells)
        z = torch.randn_like(x[0])
        got = make_check(model)(z, x)
        want = consistent(model.predict(z, x[1]).view(8, 8, 8), cells)
    assert got.tolist() == want.tolist()
    # the true labels always pass
    assert consistent(torch.as_tensor(m.reachable), cells).all()
