"""Blocks built to converge when looped: a weight-tied transformer block for `fpsolve.DEQ`.

What makes a looped block settle (from the prototype behind issue 6; see docs/halting.md):
pre-norm branches, the input injected at every pass, a small fixed residual scale (about
0.2), and the state normalised at the end of each pass. Without the last, pre-norm lets the
state's norm grow linearly: the relative step then falls like 1/t for every input and
"fixed-point halting" silently becomes a fixed depth (fpsolve.diagnose flags it).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._checks import as_float, as_int


class LoopedTransformerBlock(nn.Module):
    """z -> Norm(u + a·MLP(LN(u))),  u = z + x + a·Attn(LN(z + x)): one pass of a looped model.

    `dim`: width; `heads`: attention heads; `mlp_ratio`: hidden width / dim; `residual_scale`
    (a): the branch scale; `prenorm`: LayerNorm before each branch (False: post-norm style
    branches on the raw state); `normalize_state`: LayerNorm of the state at the end of each
    pass; `attn_mask`: an optional [L, L] boolean mask (True = may not attend), shared by all
    samples, e.g. to restrict attention to a cell's neighbours. States are [B, L, dim].
    `forward(z, x, attn_mask=...)` overrides the stored mask for one call (for inputs of several
    sequence lengths, each with its own mask).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        residual_scale: float = 0.2,
        prenorm: bool = True,
        normalize_state: bool = True,
        dropout: float = 0.0,
        attn_mask: Optional[Tensor] = None,
    ) -> None:
        super().__init__()
        dim, heads = as_int("dim", dim), as_int("heads", heads)
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}).")
        residual_scale = as_float("residual_scale", residual_scale, strict=True)
        mlp_ratio = as_float("mlp_ratio", mlp_ratio, strict=True)
        dropout = as_float("dropout", dropout)
        if dropout >= 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}.")
        # (nn.MultiheadAttention's own dropout would draw a new mask at every pass.)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.drop_attn = SharedDropout(dropout)
        self.drop_mlp = SharedDropout(dropout)
        hidden = int(round(mlp_ratio * dim))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.ln_attn = nn.LayerNorm(dim) if prenorm else nn.Identity()
        self.ln_mlp = nn.LayerNorm(dim) if prenorm else nn.Identity()
        self.ln_state = nn.LayerNorm(dim) if normalize_state else nn.Identity()
        self.residual_scale = residual_scale
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool or attn_mask.ndim != 2:
                raise ValueError("attn_mask must be a 2-D boolean tensor [L, L] (True = blocked).")
            self.register_buffer("attn_mask", attn_mask, persistent=False)
        else:
            self.attn_mask = None

    def forward(self, z: Tensor, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        a = self.residual_scale
        mask = self.attn_mask if attn_mask is None else attn_mask
        u = z + x
        h = self.ln_attn(u)
        u = u + a * self.drop_attn(self.attn(h, h, h, attn_mask=mask, need_weights=False)[0])
        u = u + a * self.drop_mlp(self.mlp(self.ln_mlp(u)))
        return self.ln_state(u)


class SharedDropout(nn.Module):
    """Dropout whose mask is drawn once per `DEQ` forward and reused at every pass.

    Plain `nn.Dropout` draws a new mask at every call, which makes f a different map at each
    pass, so the loop cannot settle. Here the mask is shared by all samples of the batch (its
    batch dimension is 1), so it stays valid when per-sample halting drops rows. `DEQ` calls
    `reset()` on every SharedDropout in its block at the start of each forward; outside a DEQ,
    call it yourself. A no-op in eval mode.
    """

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        p = as_float("p", p)
        if p >= 1.0:
            raise ValueError(f"p must be in [0, 1); got {p!r}.")
        self.p = p
        self.mask: Optional[Tensor] = None

    def reset(self) -> None:
        """Forget the mask; the next training-mode call draws a new one."""
        self.mask = None

    def forward(self, z: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return z
        shape = (1,) + tuple(z.shape[1:])
        if self.mask is None or tuple(self.mask.shape) != shape or self.mask.device != z.device:
            keep = torch.rand(shape, device=z.device) >= self.p
            self.mask = keep.to(z.dtype) / (1.0 - self.p)
        return z * self.mask.to(z.dtype)
