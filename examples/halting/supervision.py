"""The deep-supervision loss of a looped model, shared by the halting study's trunk training
(`halting.training.train_trunk`) and examples/hierarchical.py.

Unrolled gradients (backpropagation through every pass, what `fpsolve.Unroll(steps=None)`
computes for plain iteration) written as a loop, because the loss reads every pass. Per
sample, from pass `first` on, the binary cross-entropy of the readout against the labels
(averaged over open cells); after pass `settle_from`, a penalty on the relative step
||z_t - z_(t-1)||^2 / ||z_t||^2 per cell (averaged over open cells): a fixed-point penalty.
The sample's sum is divided by the number of supervised passes T + 1 - first.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F


def flat_state(z: Any) -> Tensor:
    """[B, L, D·levels]: a tuple state's levels side by side, per cell (a tensor as it is)."""
    return torch.cat(z, -1) if isinstance(z, tuple) else z


def deep_supervision_loss(model: Any, z: Any, x: Any, labels: Tensor, open_: Tensor, first: Tensor,
                          settle_from: Tensor, T: int, settle_weight: float) -> Tensor:
    """The mean over the batch of the per-sample loss above, after T passes of `model` from z.

    Args:
        model: f(z, x) -> the next state (a tensor or a tuple of [B, L, D] tensors), with
            `model.logits(z) -> [B, L]`.
        z: The starting state.
        x: The model's input.
        labels: [B, L] targets (bool or 0/1).
        open_: float [B, L]: 1 on the cells that count (open cells), 0 on walls.
        first: int [B]: the first supervised pass of each sample.
        settle_from: int [B]: the step after pass t is penalised when t > settle_from.
        T: The passes to run.
        settle_weight: The weight of the fixed-point penalty.
    """
    ce = settle = torch.zeros(labels.shape[0])
    for t in range(1, T + 1):
        z_new = model(z, x)
        bce = F.binary_cross_entropy_with_logits(model.logits(z_new), labels.float(), reduction="none")
        ce = ce + (t >= first).float() * (bce * open_).sum(1) / open_.sum(1)
        if t >= 2:
            new, old = flat_state(z_new), flat_state(z)
            step_sq = (new - old).pow(2).sum(-1) / new.pow(2).sum(-1).clamp_min(1e-6)
            settle = settle + (t > settle_from).float() * (step_sq * open_).sum(1) / open_.sum(1)
        z = z_new
    return ((ce + settle_weight * settle) / (T + 1 - first).float()).mean()
