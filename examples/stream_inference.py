"""Continuous batching with fpsolve.stream: many inputs of mixed difficulty through one block.

A weight-tied block z -> tanh(c W z + x) settles fast when c is small and slowly when c is near 1.
Run batch by batch, every batch waits for its slowest sample (or the easy rows leave f's batch
and the calls get small); `fpsolve.stream` keeps `slots` rows in flight instead and refills a
slot as soon as its sample halts, so f always sees the same shape (compile-friendly).

    python examples/stream_inference.py [--n 2048] [--slots 64]
"""
from __future__ import annotations

import argparse
import time

import torch

import fpsolve


def make_data(n: int, width: int, seed: int = 0):
    """Inputs x and per-sample contraction factors c (the difficulty), and a symmetric W."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(width, width, generator=g))
    W = q @ torch.diag(torch.linspace(-1, 1, width)) @ q.T       # spectral radius 1
    x = torch.randn(n, width, generator=g)
    c = 0.3 + 0.68 * torch.rand(n, 1, generator=g)
    return W, x, c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--slots", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    W, x, c = make_data(args.n, args.width)
    Wt = W.T.contiguous()

    def block(z, xc):
        xi, ci = xc
        return torch.tanh(ci * (z @ Wt) + xi)

    data = torch.utils.data.TensorDataset(x, c)
    loader = torch.utils.data.DataLoader(data, batch_size=args.slots)   # any iterable of batches
    opts = dict(solver="fixed_point", rtol=1e-4, max_iter=100)
    z0 = torch.zeros(1, args.width)           # one state row, the start of every sample

    # 1. results one sample at a time, as they halt (index = position in the stream)
    first = next(iter(fpsolve.stream(block, loader, slots=args.slots, z0=z0, **opts)))
    print(f"first sample out: #{first.index}, {first.iterations} passes, {first.status.name}, "
          f"residual {first.residual:.1e}")

    # 2. the whole stream as one Solution in input order, against solve batch by batch
    with torch.no_grad():
        t0 = time.perf_counter()
        sol = fpsolve.solve_stream(block, loader, slots=args.slots, z0=z0, **opts)
        t_stream = time.perf_counter() - t0
        t0 = time.perf_counter()
        per_batch = [fpsolve.solve(block, torch.zeros_like(xb), (xb, cb), **opts) for xb, cb in loader]
        t_solve = time.perf_counter() - t0
    its = torch.cat([s.iterations for s in per_batch])
    assert torch.equal(sol.iterations, its), "stream and solve agree on every sample's passes"
    print(sol.summary())
    print(f"passes per sample: mean {its.double().mean():.1f}, max {int(its.max())}; "
          f"correlation with c: {torch.corrcoef(torch.stack((its.double(), c.squeeze(1).double())))[0, 1]:.2f}")
    print(f"stream: {args.n / t_stream:.0f} samples/s, {sol.evaluations // args.slots} calls of f at "
          f"[{args.slots}, {args.width}]; solve per batch: {args.n / t_solve:.0f} samples/s")

    # 3. halting on the read-out instead of the residual: stop when the argmax of a linear
    #    read-out has not changed for 2 passes (Status.HALTED; the residual is still reported)
    head = torch.randn(args.width, 10, generator=torch.Generator().manual_seed(1))
    crit = fpsolve.Stable(lambda z: z @ head, patience=2)
    sol_ro = fpsolve.solve_stream(block, loader, slots=args.slots, z0=z0, criterion=crit, **opts)
    agree = ((sol_ro.z @ head).argmax(1) == (sol.z @ head).argmax(1)).double().mean()
    print(f"Stable read-out: mean passes {sol_ro.iterations.double().mean():.1f} "
          f"(residual rule {its.double().mean():.1f}); same argmax as the fixed point on {agree:.1%}")


if __name__ == "__main__":
    main()
