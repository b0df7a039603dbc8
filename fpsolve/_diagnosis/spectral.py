"""Batched Krylov tools for `fpsolve.diagnose`: Jacobian-vector products, Arnoldi, GMRES.

Everything works on many independent samples at once: a "row" is one sample's flattened
state `[n]`, and every product J v is one batched call of f's linearisation on all rows.
Arnoldi (Saad, "Iterative Methods for Sparse Linear Systems", 2nd ed., §6.3) builds, per row,
an orthonormal basis Q of the Krylov space span{v, Jv, ..., J^(k-1) v} and the small
Hessenberg matrix H = Qᵀ J Q. Its eigenvalues (Ritz values, from `torch.linalg.eigvals` on
the k×k matrices) estimate the outer spectrum of J, complex pairs included: a rotation has
|λ| = 1 with no real dominant eigenvector, where plain power iteration fails. The same basis
solves (I − J) e = b by least squares in the Krylov space (GMRES, Saad §6.5): the Newton
step that says how far a point is from the fixed point, and the linear response of the
fixed point to a change of its input.

Why not scipy's ARPACK (`scipy.sparse.linalg.eigs` on a `LinearOperator`)? It drives one
operator at a time, so B samples would take B separate Jacobian-vector products per step
(a Python loop over samples) and a host round trip each; here one batched product serves all
samples, and only the k×k eigenproblems are solved by a library (`torch.linalg.eigvals`).
The tests check the radius against ARPACK, sample by sample.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor

#: Two-pass classical Gram-Schmidt: a new direction shorter than this fraction of J v is a
#: breakdown (the Krylov space is invariant: its Ritz values are exact).
BREAKDOWN = 1e3


class Linearization:
    """v -> (∂f/∂z at z) v for a batch of rows: forward-mode AD, else central differences.

    Forward mode (`torch.func.jvp`) is exact and costs about two to three evaluations of f;
    some operations have no forward-mode rule (e.g. fused CPU attention kernels), and then
    the products fall back, for good, to central differences (two evaluations of f, error
    ~ eps^(2/3)). `method` says which one was used; `jvp_rows` counts rows pushed through a
    forward-mode product and `f_rows` rows evaluated by f for differences.
    """

    def __init__(self, fn: Callable[[Tensor, Any], Tensor], z: Tensor, x: Any, method: str = "auto") -> None:
        if method not in ("auto", "forward", "differences"):
            raise ValueError(f"jacobian={method!r} is not known; use 'auto', 'forward' or 'differences'.")
        self.fn, self.z, self.x = fn, z, x
        self.method = "differences" if method == "differences" else "forward"
        self.fallback = method == "auto"
        self.jvp_rows = 0
        self.f_rows = 0
        self.error = ""
        eps = torch.finfo(z.dtype).eps
        scale = torch.linalg.vector_norm(z, dim=1).clamp_min(1.0)
        self.h = (eps ** (1.0 / 3.0)) * scale   # per-row step for unit-norm directions

    def __call__(self, v: Tensor) -> Tensor:
        if self.method == "forward":
            try:
                with warnings.catch_warnings():   # torch's own jvp decompositions warn on first use
                    warnings.simplefilter("ignore", DeprecationWarning)
                    out = torch.func.jvp(lambda zz: self.fn(zz, self.x), (self.z,), (v,))[1]
                self.jvp_rows += v.shape[0]
                return out
            except Exception as err:  # an op without a forward-mode rule
                if not self.fallback:
                    raise
                self.error = f"{type(err).__name__}: {err}".splitlines()[0][:200]
                self.method = "differences"
        h = (self.h / torch.linalg.vector_norm(v, dim=1).clamp_min(1e-30)).view(-1, 1)
        up = self.fn(self.z + h * v, self.x)
        down = self.fn(self.z - h * v, self.x)
        self.f_rows += 2 * v.shape[0]
        return (up - down) / (2 * h)


def arnoldi(matvec: Callable[[Tensor], Tensor], start: Tensor, k: int,
            generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """k Arnoldi steps per row from `start` [R, n]: basis Q [R, k+1, n] and H [R, k+1, k], J Q_k = Q_(k+1) H.

    When a row's Krylov space closes early (breakdown: it is invariant, e.g. J = c·I), that
    row goes on from a random direction orthogonal to its basis, with a zero below the
    diagonal of H: the basis then spans a sum of Krylov spaces, H stays block triangular
    (its eigenvalues: the exact ones of the invariant part, then estimates of the rest), and
    J Q_k = Q_(k+1) H still holds. A row that is all zero starts from a random direction.
    """
    R, n = start.shape
    k = max(1, min(k, n))
    eps = torch.finfo(start.dtype).eps
    Q = start.new_zeros(R, k + 1, n)
    H = start.new_zeros(R, k + 1, k)

    def fresh(basis: Tensor) -> Tensor:
        """Unit random directions orthogonal to `basis` [R, m, n] (zero when none is left)."""
        w = torch.randn(R, n, generator=generator, dtype=torch.float64).to(start)
        for _ in range(2):
            if basis.shape[1]:
                w = w - torch.bmm(torch.bmm(basis, w.unsqueeze(2)).transpose(1, 2), basis).squeeze(1)
        norm = torch.linalg.vector_norm(w, dim=1, keepdim=True)
        return torch.where(norm > BREAKDOWN * eps, w / norm.clamp_min(1e-300), 0.0)

    norm = torch.linalg.vector_norm(start, dim=1, keepdim=True)
    first = start / norm.clamp_min(1e-300)
    Q[:, 0] = torch.where(norm > 0, first, fresh(Q[:, :0]) if bool((norm == 0).any()) else first)
    for j in range(k):
        w = matvec(Q[:, j])
        w_norm = torch.linalg.vector_norm(w, dim=1)
        basis = Q[:, : j + 1]
        h = torch.zeros(R, j + 1, dtype=w.dtype, device=w.device)
        for _ in range(2):   # classical Gram-Schmidt, twice (keeps Q orthonormal to rounding)
            c = torch.bmm(basis, w.unsqueeze(2)).squeeze(2)
            w = w - torch.bmm(c.unsqueeze(1), basis).squeeze(1)
            h = h + c
        beta = torch.linalg.vector_norm(w, dim=1)
        ok = (beta > BREAKDOWN * eps * w_norm) & (beta > 0)
        H[:, : j + 1, j] = h
        H[:, j + 1, j] = torch.where(ok, beta, 0.0)
        nxt = w / beta.clamp_min(1e-300).unsqueeze(1)
        if not bool(ok.all()) and j + 1 < n:
            nxt = torch.where(ok.unsqueeze(1), nxt, fresh(Q[:, : j + 1]))
        Q[:, j + 1] = torch.where(ok.unsqueeze(1) | (j + 1 < n), nxt, 0.0)
    return Q, H


def ritz_values(H: Tensor) -> Tensor:
    """Eigenvalues [R, k] (complex128) of each row's k×k Hessenberg matrix; nan for a bad row."""
    k = H.shape[2]
    square = H[:, :k, :k].double()
    bad = ~torch.isfinite(square).flatten(1).all(dim=1)
    values = torch.linalg.eigvals(torch.where(bad.view(-1, 1, 1), 0.0, square))
    return torch.where(bad.view(-1, 1), complex(float("nan"), float("nan")), values)


def krylov_solve(Q: Tensor, H: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """Least-squares solution e [R, n] of (I − J) e = b in the span of Q, and its relative residual.

    With Q the Arnoldi basis, (I − J) Q_k = Q_{k+1} (Ĩ − H̄), so the problem is a (k+1)×k
    least-squares one per row (solved in float64 with a pseudo-inverse that ignores singular
    directions). The residual counts the part of b outside the basis too; it is 0 for b = 0
    and 1 when the space holds no correction at all (e.g. J = I: no root in reach).
    """
    R, k1, n = Q.shape
    k = k1 - 1
    valid = (torch.linalg.vector_norm(Q, dim=2) > 0).double()            # [R, k+1]
    M = torch.eye(k1, k, dtype=torch.float64, device=Q.device) - H.double()
    M = M * valid.unsqueeze(2) * valid[:, :k].unsqueeze(1)
    c = torch.bmm(Q.double(), b.double().unsqueeze(2)).squeeze(2)         # coordinates of b
    bad = ~(torch.isfinite(M).flatten(1).all(dim=1) & torch.isfinite(c).all(dim=1))
    M = torch.where(bad.view(-1, 1, 1), 0.0, M)   # a non-finite row must not stop the others
    c = torch.where(bad.view(-1, 1), 0.0, c)
    b_norm = torch.linalg.vector_norm(b.double(), dim=1)
    outside = (b_norm.square() - c.square().sum(dim=1)).clamp_min(0.0)
    eps = torch.finfo(Q.dtype).eps
    y = torch.bmm(torch.linalg.pinv(M, atol=10 * eps, rtol=0.0), c.unsqueeze(2)).squeeze(2)
    left = torch.linalg.vector_norm(c - torch.bmm(M, y.unsqueeze(2)).squeeze(2), dim=1)
    rel = torch.where(b_norm > 0, (left.square() + outside).sqrt() / b_norm.clamp_min(1e-300), 0.0)
    e = torch.bmm(y.to(Q.dtype).unsqueeze(1), torch.where(bad.view(-1, 1, 1), 0.0, Q[:, :k])).squeeze(1)
    e = torch.where(bad.view(-1, 1), float("nan"), e)
    return e, torch.where(bad, float("nan"), rel).to(Q.dtype)
