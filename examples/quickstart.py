"""fpsolve quickstart: solve the fixed point z* = f(z*, x) of a small DEQ block.

Run it with `make demo` (or `python examples/quickstart.py` inside the virtualenv). CPU only,
no downloads, a few seconds. Sections:

  1. a DEQ block solved with each solver: "fixed_point", "anderson", "broyden"
  2. a batch of mixed difficulty: per-sample halting vs halting="batch"
  3. a tuple state (z_H, z_L), as in two-level looped models
  4. a sample with a NaN input: that sample is DIVERGED, the others still converge

Gradients are not needed here, so everything runs under torch.no_grad(): fpsolve then only
solves the forward problem (backward modes are a separate topic).
"""
import time

import torch
from torch import nn

import fpsolve
from fpsolve import Status

torch.manual_seed(0)           # every random tensor below comes from this seed
torch.set_num_threads(1)       # tiny problems: extra threads only add overhead

START = time.perf_counter()


def status_names(status: torch.Tensor) -> list:
    """Per-sample status codes (int64) -> names, for printing."""
    return [Status(int(s)).name for s in status]


def table(rows: list, header: tuple) -> str:
    """Format rows of cells as a plain-text table, first column left-aligned."""
    cells = [tuple(map(str, r)) for r in [header] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  " + "   ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                      for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(cells[0]), "  " + "-" * (sum(widths) + 3 * (len(widths) - 1))]
                     + [fmt(r) for r in cells[1:]])


def stats(sol: fpsolve.Solution) -> tuple:
    """iterations mean/max, rows passed through f, converged count, max residual."""
    it = sol.iterations.double()
    return (f"{it.mean():.1f} / {int(it.max())}", sol.evaluations,
            f"{int(sol.converged.sum())}/{sol.converged.numel()}", f"{float(sol.residual.max()):.1e}")


STATS = ("iterations mean/max", "f rows", "converged", "max residual")


# ---------------------------------------------------------------------------------------
# 1. A DEQ block and the three solvers
# ---------------------------------------------------------------------------------------
# The block maps (z, x) -> tanh(W z + U x). tanh is 1-Lipschitz, so when the spectral norm of
# W is below 1 the map is a contraction in z: it has exactly one fixed point, and plain
# iteration reaches it from any start. We rescale W once, at construction, to norm 0.95.
# W is made symmetric so that its spectral radius equals that norm: a random square W scaled
# to norm 0.95 contracts much faster than 0.95 (most of its singular values are smaller),
# which would make every solver look the same.
# (torch.nn.utils.parametrizations.spectral_norm also works, but its power iteration updates
# W on every call in training mode, so f would change between passes of one solve: call
# .eval() on the block first if you use it.)
class Block(nn.Module):
    def __init__(self, width: int, in_dim: int, gain: float = 0.95):
        super().__init__()
        self.W = nn.Linear(width, width, bias=False)
        self.U = nn.Linear(in_dim, width)
        with torch.no_grad():
            w = (self.W.weight + self.W.weight.T) / 2
            self.W.weight.copy_(w * (gain / torch.linalg.matrix_norm(w, ord=2)))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.W(z) + self.U(x))


BATCH, WIDTH, IN_DIM = 32, 64, 16
block = Block(WIDTH, IN_DIM)
x = 0.5 * torch.randn(BATCH, IN_DIM)
z0 = torch.zeros(BATCH, WIDTH)          # only the starting point: the fixed point does not depend on it

print("1. One DEQ block, three solvers (B=32, width 64, ||W||_2 = 0.95, rtol=1e-4)\n")
solutions, rows = {}, []
with torch.no_grad():
    for name in ("fixed_point", "anderson", "broyden"):
        # f is called as block(z, x). Each sample halts on its own as soon as
        # ||f(z) - z|| <= atol + rtol * ||f(z)|| (atol=0 by default); max_iter caps the
        # evaluations of f that any one sample receives.
        sol = fpsolve.solve(block, z0, x, solver=name, rtol=1e-4, max_iter=100)
        solutions[name] = sol
        rows.append((name,) + stats(sol))
print(table(rows, ("solver",) + STATS))

sol = solutions["anderson"]
print("\nPer sample (anderson), first 10 samples:")
print("  iterations:", sol.iterations[:10].tolist())
print("  status:    ", status_names(sol.status[:10]))
# The solvers find the same fixed point, as closely as the tolerance allows (the distance to
# the true fixed point is at most residual / (1 - contraction)):
gap = (solutions["fixed_point"].z - solutions["broyden"].z).norm(dim=1).max()
print(f"  largest ||z_fixed_point - z_broyden|| in the batch: {float(gap):.1e}")

# A budget that is too small is reported, not hidden: samples that did not meet the criterion
# within max_iter get MAX_ITER (sol.z is still their best iterate, sol.residual says how far).
with torch.no_grad():
    short = fpsolve.solve(block, z0, x, solver="fixed_point", max_iter=30)
counts = {st.name: int((short.status == st).sum()) for st in Status}
print(f"\nfixed_point with max_iter=30: {counts}")
print(f"  largest residual among MAX_ITER samples: "
      f"{float(short.residual[short.status == Status.MAX_ITER].max()):.1e}")
print(f"  Status.MAX_ITER.message: {Status.MAX_ITER.message}")

# Solver objects carry their options; the names above build them with defaults.
rows = []
with torch.no_grad():
    for obj in (fpsolve.FixedPointIteration(damping=0.8), fpsolve.Anderson(m=3), fpsolve.Broyden(memory=8)):
        rows.append((repr(obj),) + stats(fpsolve.solve(block, z0, x, solver=obj, max_iter=100)))
print("\nSolver objects with options:")
print(table(rows, ("solver",) + STATS))


# ---------------------------------------------------------------------------------------
# 2. Mixed difficulty: each sample stops at its own fixed point
# ---------------------------------------------------------------------------------------
# z -> tanh(c_i * W z + u_i), with W symmetric and spectral radius 1, so sample i contracts
# at about c_i; c runs from 0.3 (easy) to 0.98 (hard). c_i is per-sample data, so it goes
# into x next to u: with halting="sample", f receives only the rows still active, and
# fpsolve hands it the matching rows of every tensor in x. A per-sample tensor closed over
# in f would keep all B rows and stop lining up with z once a sample halts.
print("\n2. Mixed difficulty: contraction c_i from 0.3 to 0.98 (B=32, width 64)\n")
A = torch.randn(WIDTH, WIDTH)
W_sym = (A + A.T) / 2
W_sym /= torch.linalg.eigvalsh(W_sym).abs().max()     # spectral radius exactly 1
c = torch.linspace(0.3, 0.98, BATCH)
inputs = {"u": 0.1 * torch.randn(BATCH, WIDTH), "c": c[:, None]}   # a dict of batch-first tensors


def mixed(z: torch.Tensor, x: dict) -> torch.Tensor:
    # W_sym is shared by all samples, so closing over it is fine.
    return torch.tanh(x["c"] * (z @ W_sym) + x["u"])


rows, by_halting = [], {}
with torch.no_grad():
    for name in ("fixed_point", "anderson"):
        for halting in ("sample", "batch"):
            s = fpsolve.solve(mixed, torch.zeros(BATCH, WIDTH), inputs, solver=name,
                              halting=halting, max_iter=500)
            by_halting[name, halting] = s
            rows.append((name, halting) + stats(s))
print(table(rows, ("solver", "halting") + STATS))
for name in ("fixed_point", "anderson"):
    per_sample, batch = by_halting[name, "sample"].evaluations, by_halting[name, "batch"].evaluations
    print(f"  {name}: per-sample halting passed {per_sample} rows through f instead of {batch} "
          f"({1 - per_sample / batch:.0%} fewer)")

# With plain iteration (the way a looped network runs), the passes a sample needs grow with
# its contraction factor. Under halting="batch" every sample gets the hardest one's count.
looped = by_halting["fixed_point", "sample"]
pick = torch.tensor([0, 5, 10, 15, 20, 25, 28, 31])
print("\n  Plain iteration, halting='sample': iterations by contraction c_i")
print("    c_i:       ", " ".join(f"{v:5.2f}" for v in c[pick].tolist()))
print("    iterations:", " ".join(f"{v:5d}" for v in looped.iterations[pick].tolist()))


# ---------------------------------------------------------------------------------------
# 3. A tuple state (z_H, z_L)
# ---------------------------------------------------------------------------------------
# Two-level looped models keep a slow state z_H and a fast state z_L. Pass z0 as a tuple and
# return a tuple of the same shapes: fpsolve solves for both at once (the halting criterion
# uses the norm over both, per sample) and hands back sol.z as a tuple.
print("\n3. Tuple state (z_H, z_L)\n")
H, L = 32, 48


def scaled(rows: int, cols: int, norm: float) -> torch.Tensor:
    M = torch.randn(rows, cols)
    return M * (norm / torch.linalg.matrix_norm(M, ord=2))


A_LL, A_LH, A_LX = scaled(L, L, 0.5), scaled(L, H, 0.3), scaled(L, IN_DIM, 1.0)
A_HH, A_HL = scaled(H, H, 0.5), scaled(H, L, 0.3)


def two_level(z, x):
    z_H, z_L = z
    z_L = torch.tanh(z_L @ A_LL.T + z_H @ A_LH.T + x @ A_LX.T)    # fast state reads the input
    z_H = torch.tanh(z_H @ A_HH.T + z_L @ A_HL.T)                 # slow state reads the fast one
    return z_H, z_L


with torch.no_grad():
    s = fpsolve.solve(two_level, (torch.zeros(BATCH, H), torch.zeros(BATCH, L)), x, solver="anderson")
z_H, z_L = s.z
print(f"  sol.z is a {type(s.z).__name__}: z_H {tuple(z_H.shape)}, z_L {tuple(z_L.shape)}")
print(f"  {s.summary()}")


# ---------------------------------------------------------------------------------------
# 4. A bad sample does not spoil the batch
# ---------------------------------------------------------------------------------------
# Sample 2 gets a NaN input. f returns NaN for it at the first evaluation, so it is marked
# DIVERGED and dropped at once; its sol.z is the best finite iterate seen (here the start,
# zeros) and its residual is nan. The other samples are solved as if it were not there.
# There is no exception: check sol.status.
print("\n4. One sample with a NaN input\n")
x_bad = x[:6].clone()
x_bad[2, 0] = float("nan")
with torch.no_grad():
    s = fpsolve.solve(block, torch.zeros(6, WIDTH), x_bad, solver="anderson")
print("  status:    ", status_names(s.status))
print("  iterations:", s.iterations.tolist())
print("  residual:  ", [f"{r:.1e}" for r in s.residual.tolist()])
print(f"  sol.z[2] is finite: {bool(torch.isfinite(s.z[2]).all())}")
healthy = torch.tensor([0, 1, 3, 4, 5])
diff = (s.z[healthy] - solutions["anderson"].z[healthy]).abs().max()
print(f"  samples 0,1,3,4,5 vs the same samples solved in section 1 (no NaN in the batch): "
      f"max difference {float(diff):.1e}")
print(f"  Status.DIVERGED.message: {Status.DIVERGED.message}")

print(f"\nDone in {time.perf_counter() - START:.1f} s.")
