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
from ._replay import RECORDING, REPLAYING


class LoopedTransformerBlock(nn.Module):
    """A weight-tied transformer block built to settle when looped: one pass z -> f(z, x).

    f(z, x) = Norm(u + a·MLP(LN(u))) with u = z + x + a·Attn(LN(z + x)): pre-norm branches,
    the input injected at every pass, a small fixed residual scale a, and the state
    normalised at the end of each pass. States and inputs are `[B, L, dim]`. Its dropout is
    `SharedDropout` (one mask per `DEQ` forward), so f stays one map across passes.

    Args:
        dim: The width (divisible by `heads`).
        heads: Attention heads.
        mlp_ratio: The MLP's hidden width / dim (> 0).
        residual_scale: a, the scale of both branches (> 0).
        prenorm: LayerNorm before each branch (False: post-norm style branches on the raw state).
        normalize_state: LayerNorm of the state at the end of each pass.
        dropout: The `SharedDropout` probability of both branches, in [0, 1).
        attn_mask: An optional `[L, L]` boolean mask (True = may not attend), shared by all
            samples, e.g. to restrict attention to a cell's neighbours.

    Raises:
        TypeError: `dim` or `heads` not an integer, or a non-numeric scale, ratio or dropout.
        ValueError: `dim` not divisible by `heads`, a value out of range, or an `attn_mask`
            that is not a 2-D boolean tensor.

    Example:
        ```python
        block = fpsolve.LoopedTransformerBlock(dim=16, heads=2)
        layer = fpsolve.DEQ(block.eval(), max_iter=40, rtol=1e-3)
        x = torch.randn(2, 5, 16)   # [B, L, dim]
        z, sol = layer(x)
        assert z.shape == x.shape and bool(sol.converged.all())
        ```
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
        """One pass: the next state from the state z and the input x, both `[B, L, dim]`.

        Args:
            z: The state `[B, L, dim]`.
            x: The input `[B, L, dim]`, injected at every pass.
            attn_mask: Overrides the stored mask for this call (for inputs of several
                sequence lengths, each with its own `[L, L]` mask); None: the stored one.

        Returns:
            The next state, `[B, L, dim]`.

        Example:
            ```python
            block = fpsolve.LoopedTransformerBlock(dim=8, heads=2)
            z, x = torch.zeros(1, 3, 8), torch.randn(1, 3, 8)
            mask = ~torch.eye(3, dtype=torch.bool)   # each position attends to itself only
            assert block(z, x, attn_mask=mask).shape == (1, 3, 8)
            ```
        """
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

    Args:
        p: The probability of zeroing an entry, in [0, 1); kept entries are scaled by 1/(1-p).

    Raises:
        TypeError: `p` not a number.
        ValueError: `p` outside [0, 1).

    Example:
        ```python
        drop = fpsolve.SharedDropout(p=0.5).train()
        z = torch.ones(4, 6)
        assert torch.equal(drop(z), drop(2 * z) / 2)   # the same mask at every call
        drop.reset()                                    # a new mask at the next call
        assert torch.equal(drop.eval()(z), z)
        ```
    """

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        p = as_float("p", p)
        if p >= 1.0:
            raise ValueError(f"p must be in [0, 1); got {p!r}.")
        self.p = p
        self.mask: Optional[Tensor] = None

    def reset(self) -> None:
        """Forget the mask; the next training-mode call draws a new one.

        Example:
            ```python
            drop = fpsolve.SharedDropout(p=0.5)
            drop(torch.ones(2, 4))
            drop.reset()
            assert drop.mask is None
            ```
        """
        self.mask = None

    def forward(self, z: Tensor) -> Tensor:
        """z times the shared mask (drawn at the first call after `reset`); z itself in eval mode.

        Args:
            z: A batch-first tensor `[B, ...]`; the mask is `[1, ...]`, shared by all rows.

        Returns:
            The masked z (scaled by 1/(1-p)), or z in eval mode or with p = 0.
        """
        if not self.training or self.p == 0.0:
            return z
        if REPLAYING and self in REPLAYING[-1]:   # (a checkpoint recomputation: the forward's mask)
            return z * REPLAYING[-1][self].to(z.dtype)
        shape = (1,) + tuple(z.shape[1:])
        if self.mask is None or tuple(self.mask.shape) != shape or self.mask.device != z.device:
            keep = torch.rand(shape, device=z.device) >= self.p
            self.mask = keep.to(z.dtype) / (1.0 - self.p)
        if RECORDING:
            RECORDING[-1][self] = self.mask
        return z * self.mask.to(z.dtype)
