"""DEQ inside DistributedDataParallel: 2 processes on the gloo backend (CPU).

Each process takes half of a batch; DDP averages the gradients of the two half-batch mean
losses, which is the gradient of the full-batch mean loss computed in one process. Both are
float64 and solved tightly, so they agree to round-off. The model is a classifier with a DEQ
inside it; a bare `DDP(DEQ(...))` (whose forward returns `(z, sol)`) is checked too.
"""
from __future__ import annotations

import os
import warnings
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fpsolve

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)

WORLD, B, N = 2, 8, 6
OPTIONS = dict(rtol=1e-12, max_iter=300)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(N, N)
        self.inj = nn.Linear(N, N, bias=False)
        with torch.no_grad():
            self.lin.weight.mul_(0.5)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + self.inj(x))


class Classifier(nn.Module):
    def __init__(self, backward):
        super().__init__()
        self.enc = nn.Linear(4, N)
        self.deq = fpsolve.DEQ(Block(), backward=backward, **OPTIONS)
        self.head = nn.Linear(N, 3)

    def forward(self, x):
        z, _ = self.deq(self.enc(x))
        return self.head(z)


def _setup(backward):
    torch.manual_seed(0)
    model = Classifier(backward).double()
    bare = fpsolve.DEQ(Block(), backward=backward, **OPTIONS).double()
    x = torch.randn(B, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (B,))
    u = torch.randn(B, N, dtype=torch.float64)
    return model, bare, x, y, u


def _losses(model, bare, x, y, u):
    """The two losses whose gradients are compared (means over the rows given)."""
    a = nn.functional.cross_entropy(model(x), y)
    z, sol = bare(u)
    return a, (z.sin() * u).sum(dim=1).mean()


def _grads(module):
    return [p.grad.detach().clone() for p in module.parameters()]


MODES = ("implicit", "unroll")


def _worker(rank, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for backward in MODES:
            model, bare, x, y, u = _setup(backward)
            ddp_model = nn.parallel.DistributedDataParallel(model)
            ddp_bare = nn.parallel.DistributedDataParallel(bare)
            rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
            for step in range(2):    # two steps: the second runs after DDP's first reduction
                model.zero_grad(), bare.zero_grad()
                a, b = _losses(ddp_model, ddp_bare, x[rows], y[rows], u[rows])
                (a + b).backward()
            results[backward] = {"model": _grads(model), "bare": _grads(bare)}
        if rank == 0:
            torch.save(results, out_file)
        dist.barrier()   # (a rank that tears gloo down while the other still talks can abort)
        open(f"{out_file}.done{rank}", "w").close()   # this rank's work is complete
    finally:
        dist.destroy_process_group()
    os._exit(0)   # (skip interpreter teardown, where gloo's threads have aborted a rank)


@pytest.fixture(scope="module")
def ddp_grads():
    """One spawn of 2 processes serves every mode (process start-up dominates the cost)."""
    mp = pytest.importorskip("torch.multiprocessing")
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "grads.pt")
        try:
            mp.spawn(_worker, args=(init_file, out_file), nprocs=WORLD, join=True)
        except mp.ProcessExitedException as err:
            # gloo has aborted a rank while tearing down (SIGABRT, 'terminate called without an
            # active exception'), rarely and not reproducibly: harmless once every rank has
            # finished its work and the gradients are saved; a failure anywhere else is not.
            if not all(os.path.exists(f"{out_file}.done{r}") for r in range(WORLD)):
                raise
            warnings.warn(f"test_ddp: {err} after every rank finished (gloo teardown)")
        return torch.load(out_file, weights_only=True)


@pytest.mark.parametrize("backward", MODES)
def test_ddp_gradients_equal_the_single_process_ones(ddp_grads, backward):
    got = ddp_grads[backward]
    model, bare, x, y, u = _setup(backward)
    a, b = _losses(model, bare, x, y, u)
    (a + b).backward()
    for name, module in (("model", model), ("bare", bare)):
        want = _grads(module)
        assert len(got[name]) == len(want)
        for g, w in zip(got[name], want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
