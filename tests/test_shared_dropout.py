"""SharedDropout: one mask per DEQ forward, so a block with dropout is still one map per solve."""
import torch
from torch import nn

import fpsolve


class Cell(nn.Module):
    def __init__(self, width: int, p: float) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        with torch.no_grad():
            self.lin.weight.mul_(0.5 / torch.linalg.matrix_norm(self.lin.weight, ord=2))
        self.drop = fpsolve.SharedDropout(p)

    def forward(self, z, x):
        return torch.tanh(self.drop(self.lin(z)) + x)


def test_block_with_shared_dropout_converges_in_training_mode():
    torch.manual_seed(0)
    layer = fpsolve.DEQ(Cell(16, 0.3), solver="fixed_point", rtol=1e-6, max_iter=200).train()
    x = torch.randn(8, 16)
    z, sol = layer(x)
    assert sol.converged.all()       # a fresh mask each pass would keep the residual ~0.3
    z.sum().backward()
    assert torch.isfinite(layer.block.lin.weight.grad).all()


def test_mask_is_redrawn_per_forward_and_shared_across_the_batch():
    torch.manual_seed(1)
    drop = fpsolve.SharedDropout(0.5).train()
    a = drop(torch.ones(4, 32))
    assert torch.equal(a[0], a[3])                  # the same mask for every sample
    assert torch.equal(drop(torch.ones(2, 32))[0], a[0])   # kept while the batch shrinks
    drop.reset()
    b = drop(torch.ones(4, 32))
    assert not torch.equal(a[0], b[0])              # a new forward, a new mask (p=0.5, 32 units)


def test_eval_mode_is_identity():
    drop = fpsolve.SharedDropout(0.5).eval()
    x = torch.randn(3, 5)
    assert torch.equal(drop(x), x)
