"""A tiny TRM-style model trained on the maze task with deep supervision: `fpsolve.Carry` beside
the same loop written by hand, in one run (same data, same initial weights).

The model: a state (y, z) of two [B, L, D] parts (the answer and the latent), one shared
`fpsolve.LoopedTransformerBlock` whose attention sees a cell's 4 neighbours (examples/maze.py).
One pass of f is one recursion: z <- block(z, x + y) `n` times, then y <- block(y, z); walls are
zeroed. Each training step runs one segment of T recursions (the first T - 1 without
gradients: `criterion=fpsolve.Depth(T)`, `backward=fpsolve.Unroll(steps=1)`), with a per-cell
BCE on y's readout and a Q-halt BCE (the head learns whether the whole maze is already right);
a slot halts where the head says so (after at least 2 segments) or after `max_segments`.

    python examples/looped_trm.py --quick     # under a minute on one CPU thread

Prints the two loss curves (their largest difference), each model's accuracy on held-out
mazes after max_segments segments, and the trained model evaluated through `fpsolve.stream`
with fixed depth, its Q head and its fixed point: accuracy, mean passes and wall time.
"""
from __future__ import annotations

import argparse
import copy
import time
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import fpsolve
from maze import WALL, generate, neighbour_mask


class TinyTRM(nn.Module):
    """f((y, z), code) -> (y, z): one recursion of n latent updates and one answer update."""

    def __init__(self, n_grid: int, dim: int = 16, n: int = 2) -> None:
        super().__init__()
        self.n = n
        self.embed = nn.Embedding(3, dim)
        self.block = fpsolve.LoopedTransformerBlock(dim, heads=2, residual_scale=0.3)
        self.readout = nn.Linear(dim, 1)
        self.q = nn.Linear(dim, 1)
        self.register_buffer("mask", neighbour_mask(n_grid), persistent=False)

    def forward(self, state: Tuple[Tensor, Tensor], code: Tensor) -> Tuple[Tensor, Tensor]:
        y, z = state
        x = self.embed(code.long())                     # embedded inside f: trained every segment
        open_ = (code != WALL).unsqueeze(-1).to(x.dtype)
        for _ in range(self.n):
            z = self.block(z, x + y, attn_mask=self.mask) * open_
        return self.block(y, z, attn_mask=self.mask) * open_, z

    def losses(self, y: Tensor, code: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(loss, q logit [B], right [B]): per-cell BCE over open cells + the Q-halt BCE."""
        open_ = (code != WALL).to(y.dtype)
        logits = self.readout(y).squeeze(-1)
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        cell = ((bce * open_).sum(1) / open_.sum(1)).mean()
        right = (((logits > 0) == (labels > 0.5)) | (open_ == 0)).all(1)
        q = self.q(y.mean(1)).squeeze(-1)
        return cell + F.binary_cross_entropy_with_logits(q, right.to(q.dtype)), q, right


def start(code: Tensor, dim: int) -> Tuple[Tensor, Tensor]:
    shape = (*code.shape, dim)
    return torch.zeros(shape, dtype=torch.float32), torch.zeros(shape, dtype=torch.float32)


def batches(steps: int, slots: int, n_grid: int, seed: int) -> List[Tuple[Tensor, Tensor]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        m = generate(slots, n=n_grid, rng=rng)
        out.append((torch.from_numpy(m.cells).flatten(1).float(), torch.from_numpy(m.reachable).flatten(1).float()))
    return out


def train_carry(model: TinyTRM, data, T: int, max_segments: int, lr: float, explore: List[Tensor]) -> List[float]:
    dim = model.embed.embedding_dim
    carry = fpsolve.Carry(model, slots=data[0][0].shape[0], z0=lambda c: start(c, dim), max_segments=max_segments,
                          criterion=fpsolve.Depth(T), backward=fpsolve.Unroll(steps=1))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    curve = []
    for t, (code, labels) in enumerate(data):
        step = carry.step(code, targets=labels)
        loss, q, _ = model.losses(step.z[0], step.x, step.targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        step.halt((q > 0) & (step.segment >= explore[t]))
        curve.append(loss.item())
    return curve


def train_by_hand(model: TinyTRM, data, T: int, max_segments: int, lr: float, explore: List[Tensor]) -> List[float]:
    dim = model.embed.embedding_dim
    slots = data[0][0].shape[0]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    state = code = labels = None
    segment = torch.zeros(slots, dtype=torch.int64)
    halted = torch.ones(slots, dtype=torch.bool)
    curve = []
    for t, (new_code, new_labels) in enumerate(data):
        h = halted[:, None]
        code = new_code if code is None else torch.where(h, new_code, code)
        labels = new_labels if labels is None else torch.where(h, new_labels, labels)
        fresh = start(code, dim)
        state = fresh if state is None else tuple(torch.where(h[..., None], a, b) for a, b in zip(fresh, state))
        segment = torch.where(halted, 0, segment) + 1
        with torch.no_grad():
            for _ in range(T - 1):
                state = model(state, code)
        state = model(state, code)
        loss, q, _ = model.losses(state[0], code, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        halted = (segment >= max_segments) | ((q > 0) & (segment >= explore[t])).detach()
        state = tuple(s.detach() for s in state)
        curve.append(loss.item())
    return curve


@torch.no_grad()
def accuracy(model: TinyTRM, code: Tensor, labels: Tensor, T: int, segments: int) -> Tuple[float, float]:
    """(cell accuracy over open cells, share of mazes all right) after segments x T recursions."""
    dim = model.embed.embedding_dim
    sol = fpsolve.solve(model, start(code, dim), code, criterion=fpsolve.Depth(T * segments),
                        max_iter=T * segments, backward="none")
    open_ = code != WALL
    pred = model.readout(sol.z[0]).squeeze(-1) > 0
    ok = (pred == (labels > 0.5)) | ~open_
    return float((ok & open_).sum() / open_.sum()), float(ok.all(1).float().mean())


@torch.no_grad()
def evaluate(model: TinyTRM, code: Tensor, labels: Tensor, T: int, segments: int, slots: int = 32) -> dict:
    """The trained model through `fpsolve.stream` (one pass = one recursion) with three halting
    rules: fixed depth (T x segments passes), its Q head (halt where q > 0, after one segment)
    and its fixed point (the residual rule, inf norm). Per rule: accuracy (cells, whole mazes),
    mean passes and wall seconds."""
    dim = model.embed.embedding_dim
    K = T * segments
    rules = {
        "fixed depth": dict(criterion=fpsolve.Depth(K)),
        "Q head": dict(criterion=fpsolve.HaltHead(lambda s: model.q(s[0].mean(1)).squeeze(-1)), min_iter=T),
        "fixed point": dict(rtol=1e-2, norm="inf"),
    }
    open_ = code != WALL
    out = {}
    for name, options in rules.items():
        t = time.perf_counter()
        rows = sorted(fpsolve.stream(model, [code], slots=slots, z0=lambda c: start(c, dim), solver="fixed_point",
                                     max_iter=K, **options), key=lambda r: r.index)
        wall = time.perf_counter() - t
        y = torch.stack([r.z[0] for r in rows])
        ok = ((model.readout(y).squeeze(-1) > 0) == (labels > 0.5)) | ~open_
        out[name] = dict(cells=float((ok & open_).sum() / open_.sum()), mazes=float(ok.all(1).float().mean()),
                         passes=float(np.mean([r.iterations for r in rows])), wall_s=wall)
    return out


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small run (under a minute)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    steps = a.steps or (400 if a.quick else 2000)
    n_grid, slots, T, max_segments, lr = 6, 16, 2, 6, 3e-3
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    model = TinyTRM(n_grid)
    twin = copy.deepcopy(model)
    data = batches(steps, slots, n_grid, a.seed)
    g = torch.Generator().manual_seed(a.seed + 1)
    explore = [torch.where(torch.rand(slots, generator=g) < 0.1,
                           torch.randint(2, max_segments + 1, (slots,), generator=g), 2) for _ in range(steps)]
    t0 = time.perf_counter()
    carry_curve = train_carry(model, data, T, max_segments, lr, explore)
    t1 = time.perf_counter()
    hand_curve = train_by_hand(twin, data, T, max_segments, lr, explore)
    t2 = time.perf_counter()
    test = generate(256, n=n_grid, rng=np.random.default_rng(a.seed + 100))
    code, labels = torch.from_numpy(test.cells).flatten(1).float(), torch.from_numpy(test.reachable).flatten(1).float()
    acc = accuracy(model, code, labels, T, max_segments)
    acc_hand = accuracy(twin, code, labels, T, max_segments)
    diff = max(abs(x - y) for x, y in zip(carry_curve, hand_curve))
    k = max(1, steps // 8)
    print(f"steps {steps}: Carry {t1 - t0:.1f} s, hand loop {t2 - t1:.1f} s")
    print("loss (Carry)    " + " ".join(f"{np.mean(carry_curve[i:i + k]):.3f}" for i in range(0, steps, k)))
    print("loss (by hand)  " + " ".join(f"{np.mean(hand_curve[i:i + k]):.3f}" for i in range(0, steps, k)))
    print(f"largest difference of the two loss curves: {diff:.2e}")
    print(f"held-out accuracy, cells / whole mazes: Carry {acc[0]:.3f} / {acc[1]:.3f}, "
          f"by hand {acc_hand[0]:.3f} / {acc_hand[1]:.3f}")
    halting = evaluate(model, code, labels, T, max_segments)
    print(f"evaluated through fpsolve.stream ({len(code)} mazes, one pass = one recursion, at most "
          f"{T * max_segments}):")
    for name, r in halting.items():
        print(f"  {name:12s} cells {r['cells']:.3f}  mazes {r['mazes']:.3f}  mean passes {r['passes']:5.1f}  "
              f"wall {1e3 * r['wall_s']:.0f} ms")
    return dict(carry=carry_curve, hand=hand_curve, diff=diff, accuracy=acc, accuracy_hand=acc_hand,
                halting=halting)


if __name__ == "__main__":
    main()
