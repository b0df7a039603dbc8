"""The benchmark problems of shared/BENCH.md: each builds f(z, x), x, z0 for a dtype.

Per-sample data (the mixed batch's contraction factors) travels in x, so that fpsolve's
per-sample halting can drop rows; torchdeq gets a closure over the full x.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

WIDTH, BATCH = 256, 64


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


class TanhMLP(nn.Module):
    """z -> tanh(c * (W z) + U x); c is 1, or per sample when x = (x, c)."""

    def __init__(self, w: torch.Tensor, u: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("wt", w.t().contiguous())
        self.register_buffer("ut", u.t().contiguous())

    def forward(self, z: torch.Tensor, x: Any) -> torch.Tensor:
        if isinstance(x, tuple):
            x, c = x
            return torch.tanh(c * (z @ self.wt) + x @ self.ut)
        return torch.tanh(torch.addmm(x @ self.ut, z, self.wt))


class PreNormBlock(nn.Module):
    """A pre-norm transformer block used as a looped map: z -> LN(x + a*z + attn + mlp)."""

    def __init__(self, d: int, heads: int, gen: torch.Generator, scale: float = 0.5) -> None:
        super().__init__()
        self.ln1, self.ln2, self.ln_out = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.scale = scale
        with torch.no_grad():
            for p in self.parameters():
                if p.ndim == 2:
                    p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(z)
        a = self.attn(h, h, h, need_weights=False)[0]
        h = z + a
        h = h + self.mlp(self.ln2(h))
        return self.ln_out(x + self.scale * h)


@dataclass
class Problem:
    name: str
    description: str
    f: Callable[..., torch.Tensor]
    x: Any
    z0: torch.Tensor
    max_iter: int


def build(name: str, dtype: torch.dtype, seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    n, b = WIDTH, BATCH
    if name in ("mlp_contractive", "mlp_hard", "mixed_batch"):
        # small injection keeps tanh near-linear, so the contraction of the map is that of W
        u = 0.1 * torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
        x = torch.randn(b, n, generator=gen, dtype=torch.float64)
        if name in ("mlp_hard", "mixed_batch"):  # symmetric: the contraction is exactly rho
            q = _orthogonal(n, gen)
            rho = 0.99 if name == "mlp_hard" else 1.0
            lam = torch.linspace(-rho, rho, n, dtype=torch.float64)
            w = q @ torch.diag(lam) @ q.t()
        else:
            w = torch.randn(n, n, generator=gen, dtype=torch.float64)
            w = w / torch.linalg.matrix_norm(w, ord=2)
            if name == "mlp_contractive":
                w = 0.9 * w
        f = TanhMLP(w.to(dtype), u.to(dtype))
        xx: Any = x.to(dtype)
        desc = {
            "mlp_contractive": f"tanh(W z + U x), ||W||_2 = 0.9, width {n}, batch {b}",
            "mlp_hard": f"tanh(W z + U x), W symmetric, spectral radius 0.99, width {n}, batch {b}",
            "mixed_batch": f"tanh(c_i W z + U x), W symmetric with spectral radius 1, c_i from 0.3 to 0.98 per sample, width {n}, batch {b}",
        }[name]
        if name == "mixed_batch":
            c = torch.linspace(0.3, 0.98, b, dtype=dtype)[:, None]
            xx = (xx, c)
        max_iter = {"mlp_contractive": 100, "mlp_hard": 200, "mixed_batch": 500}[name]
        return Problem(name, desc, f, xx, torch.zeros(b, n, dtype=dtype), max_iter)
    if name == "transformer":
        d, seq, bt, heads = 128, 64, 16, 4
        torch.manual_seed(seed)   # biases and LayerNorms use the global generator
        block = PreNormBlock(d, heads, gen).to(dtype).eval()
        x = torch.randn(bt, seq, d, generator=gen).to(dtype)
        desc = f"pre-norm transformer block (attention + MLP, final LayerNorm), seq {seq}, width {d}, batch {bt}"
        return Problem(name, desc, block, x, torch.zeros(bt, seq, d, dtype=dtype), 100)
    if name == "conv":
        c, hw, bt = 32, 32, 8
        torch.manual_seed(seed)
        block = ConvBlock(c, 2.6, gen).to(dtype).eval()
        x = torch.randn(bt, c, hw, hw, generator=gen).to(dtype)
        desc = (f"tanh(conv3x3(z) + x), small random weights (every sample converges in 6 passes; f about 3 ms "
                f"on 1 CPU thread), {c} channels, {hw}x{hw}, batch {bt}")
        return Problem(name, desc, block, x, torch.zeros(bt, c, hw, hw, dtype=dtype), 100)
    raise ValueError(name)


class ConvBlock(nn.Module):
    """A short, expensive solve: tanh(conv(z) + x), the convolution scaled to a small norm."""

    def __init__(self, channels: int, scale: float, gen: torch.Generator) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        with torch.no_grad():
            w = torch.randn(self.conv.weight.shape, generator=gen)   # (scale: chosen for 6 passes)
            self.conv.weight.copy_(scale * w / w.flatten(1).norm(dim=1).sum() * channels ** 0.5 / 3)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(z) + x)


PROBLEMS = ("mlp_contractive", "mlp_hard", "mixed_batch", "transformer", "conv")
