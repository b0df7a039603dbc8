"""The maze stream of benchmarks/stream.py: the shipped checkpoint, padding 8x8 mazes to 16x16,
and stream == solve per sample on the halting study's looped transformer (no timing)."""
from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pytest
import torch

import fpsolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "examples"))

from maze import WALL, bfs_distances, generate  # noqa: E402
from stream import MAZE_CHECKPOINT, load_maze, maze_stream, pad_mazes, run_stream  # noqa: E402


@pytest.fixture(scope="module")
def model_and_meta():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_maze()
    torch.set_num_threads(n)


def test_checkpoint_is_small_and_complete(model_and_meta):
    model, meta = model_and_meta
    assert os.path.getsize(MAZE_CHECKPOINT) < 2 * 2**20
    assert meta["rule"]["norm"] == "inf" and 0 < meta["rule"]["rtol"] < 1
    assert set(meta["config"]) >= {"dim", "heads", "residual_scale", "prenorm", "normalize_state"}
    assert not model.training


def test_padding_keeps_the_bfs_answer_and_the_model_answer(model_and_meta):
    model, _ = model_and_meta
    m = generate(24, 8, np.random.default_rng(5), max_difficulty=48)
    padded = pad_mazes(m.cells, 16)
    assert (padded[:, 8:] == WALL).all() and (padded[:, :, 8:] == WALL).all()
    for small, big in zip(m.cells, padded):
        d_small, d_big = bfs_distances(small), bfs_distances(big)
        assert (d_big[:8, :8] == d_small).all() and (d_big[8:] == -1).all() and (d_big[:, 8:] == -1).all()
    with pytest.raises(ValueError, match="n=4"):
        pad_mazes(m.cells, 4)
    kw = dict(solver="fixed_point", norm="inf", rtol=1e-3, max_iter=64, backward="none")
    with torch.no_grad():
        answers = []
        for cells in (torch.as_tensor(m.cells), torch.as_tensor(padded)):
            x = model.inputs(cells)
            sol = fpsolve.solve(model, torch.zeros_like(x[0]), x, **kw)
            answers.append(model.predict(sol.z, x[1]).view(len(m), cells.shape[1], -1)[:, :8, :8])
    # the padded grid adds wall neighbours to the maze's right and bottom edges (walls carry no
    # state but their embedding is a key/value), so the answers may differ on a few mazes, not most
    same = (answers[0] == answers[1]).flatten(1).all(1)
    assert same.float().mean() >= 0.9


def test_stream_equals_solve_alone_per_sample(model_and_meta):
    s = dataclasses.replace(maze_stream(32, seed=7), batch=8)   # 8 slots: every slot is refilled
    with torch.no_grad():
        st = run_stream(s, s.f, check_every=3)
        alone = [fpsolve.solve(s.f, torch.zeros_like(s.x[0][i:i + 1]), (s.x[0][i:i + 1], s.x[1][i:i + 1]),
                               solver="fixed_point", norm=s.norm, rtol=s.rtol, max_iter=s.max_iter,
                               backward="none") for i in range(s.N)]
    its = torch.cat([a.iterations for a in alone])
    status = torch.cat([a.status for a in alone])
    z = torch.cat([a.z for a in alone])
    assert torch.equal(st.iterations, its)
    assert torch.equal(st.status, status)
    torch.testing.assert_close(st.z, z, atol=1e-4, rtol=1e-4)
    assert torch.equal(s.readout(st.z, s.x), s.readout(z, s.x))
    assert its.max() > 2 * its.min()            # a mix of difficulties really went through
    acc = s.accuracy(st.z)
    assert acc["8x8 (padded)"] >= 0.9
    assert acc["16x16"] >= 0.5
