"""LoopedTransformerBlock: its attention mask (stored and per call) and its argument checks."""
import pytest
import torch

import fpsolve


def chain_mask(L: int) -> torch.Tensor:
    """True = blocked: token i sees only itself and i-1."""
    i = torch.arange(L)
    return ~((i[:, None] == i[None, :]) | (i[:, None] == i[None, :] + 1))


def test_per_call_mask_equals_stored_mask():
    torch.manual_seed(0)
    z, x = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    stored = fpsolve.LoopedTransformerBlock(8, heads=2, attn_mask=chain_mask(5)).eval()
    plain = fpsolve.LoopedTransformerBlock(8, heads=2).eval()
    plain.load_state_dict(stored.state_dict())
    torch.testing.assert_close(plain(z, x, attn_mask=chain_mask(5)), stored(z, x))
    assert not torch.allclose(plain(z, x), stored(z, x))          # the mask does change the output


def test_mask_stops_information_and_per_call_mask_overrides_stored_one():
    torch.manual_seed(0)
    L = 6
    block = fpsolve.LoopedTransformerBlock(8, heads=2, attn_mask=chain_mask(L)).eval()
    z, x = torch.randn(1, L, 8), torch.randn(1, L, 8)
    z2 = z.clone()
    z2[0, -1] += torch.randn(8)                                    # perturb the last token
    # with the chain mask, tokens 0..L-2 never see token L-1
    torch.testing.assert_close(block(z, x)[0, :-1], block(z2, x)[0, :-1])
    # a per-call mask of "see everything" overrides it: token 0 now sees the last token
    full = torch.zeros(L, L, dtype=torch.bool)
    assert not torch.allclose(block(z, x, attn_mask=full)[0, 0], block(z2, x, attn_mask=full)[0, 0])


def test_block_converges_under_fpsolve():
    torch.manual_seed(0)
    block = fpsolve.LoopedTransformerBlock(16, heads=2).eval()
    x = torch.randn(4, 7, 16)
    with torch.no_grad():
        sol = fpsolve.solve(block, torch.zeros_like(x), x, solver="fixed_point", rtol=1e-5, max_iter=200)
    assert bool(sol.converged.all())
    torch.testing.assert_close(block(sol.z, x), sol.z, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=10, heads=3), "divisible"),
    (dict(dim=8, heads=2, residual_scale=0.0), "residual_scale"),
    (dict(dim=8, heads=2, attn_mask=torch.zeros(4, 4)), "boolean"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fpsolve.LoopedTransformerBlock(**kwargs)
