"""Issue 19 (trust, round 3): one regression test per defect fixed, each failing on the code
before its fix. Item 1 (a diverged row's gradient) is property (vii) of tests/test_invariants.py."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

import fpsolve
from fpsolve import Status

F64 = torch.float64


def test_item4_a_one_class_readout_is_rejected():
    f = lambda z, x: 0.5 * z + x  # noqa: E731
    x = torch.ones(3, 2)
    for crit in (fpsolve.Stable(lambda z: z[:, 0]), fpsolve.OutputKL(lambda z: z[:, :1], tol=1e-3)):
        with pytest.raises(ValueError, match="C >= 2"):
            fpsolve.solve(f, torch.zeros(3, 2), x, criterion=crit)


def test_item5_output_kl_with_masked_logits_halts():
    mask = torch.tensor([0.0, 0.0, float("-inf")])
    readout = lambda z: 5 * z + mask  # noqa: E731
    f = lambda z, x: 0.8 * z + x  # noqa: E731
    x = torch.tensor([[0.1, -0.1, 0.0]])
    sol = fpsolve.solve(f, torch.zeros(1, 3), x, criterion=fpsolve.OutputKL(readout, tol=1e-4), max_iter=200)
    assert sol.status.tolist() == [int(Status.HALTED)] and int(sol.iterations) < 50
    r = next(iter(fpsolve.stream(f, [x], slots=2, criterion=fpsolve.OutputKL(readout, tol=1e-4), max_iter=200)))
    assert r.status == Status.HALTED and r.iterations == int(sol.iterations)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64])
def test_item6_a_halt_head_needs_a_floating_logit(dtype):
    head = lambda z: (z[:, 0] > 100).to(dtype)  # noqa: E731
    with pytest.raises(TypeError, match="floating logit"):
        fpsolve.solve(lambda z, x: 0.5 * z + x, torch.zeros(2, 2), torch.ones(2, 2), criterion=fpsolve.HaltHead(head))


def test_item7_stream_matches_dict_batches_by_key():
    f = lambda z, x: 0.5 * z + x["a"] - x["b"]  # noqa: E731
    first = {"a": torch.full((2, 1), 2.0), "b": torch.zeros(2, 1)}
    later = {"b": torch.zeros(2, 1), "a": torch.full((2, 1), 1.0)}   # other key order
    sol = fpsolve.solve_stream(f, [first, later], slots=2, z0=torch.zeros(1, 1), rtol=1e-8)
    torch.testing.assert_close(sol.z, torch.tensor([[4.0], [4.0], [2.0], [2.0]]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="keys"):
        fpsolve.solve_stream(f, [first, {"a": torch.ones(2, 1), "c": torch.ones(2, 1)}], slots=2, z0=torch.zeros(1, 1))


Pair = collections.namedtuple("Pair", ["u", "v"])


@pytest.mark.parametrize("halting", ["sample", "batch"])
def test_item12_namedtuple_inputs_and_states(halting):
    x = Pair(torch.linspace(0.1, 1, 4).reshape(4, 1), torch.ones(4, 1))
    z0 = Pair(torch.zeros(4, 1), torch.zeros(4, 1))
    sol = fpsolve.solve(lambda z, x: Pair(0.5 * z.u + x.u, 0.25 * z.v + x.v), z0, x, halting=halting, rtol=1e-8)
    assert isinstance(sol.z, Pair)
    torch.testing.assert_close(sol.z.u, 2 * x.u, atol=1e-6, rtol=0)
    got = fpsolve.solve_stream(lambda z, x: 0.5 * z + x.u, [x], slots=2, z0=torch.zeros(1, 1), rtol=1e-8)
    torch.testing.assert_close(got.z, 2 * x.u, atol=1e-6, rtol=0)


def test_item13_numpy_integers_everywhere_numbers_are_taken():
    sol = fpsolve.solve(lambda z, x: 0.5 * z + x, torch.zeros(2, 2), torch.ones(2, 2), max_iter=np.int64(30),
                        check_every=np.int32(2))
    assert sol.converged.all()
    with pytest.raises(ValueError, match="max_iter must be an integer >= 1; got 0"):
        fpsolve.solve(lambda z, x: z, torch.zeros(1, 1), torch.ones(1, 1), max_iter=np.int64(0))


def test_item14_a_criterion_verdict_of_the_wrong_shape_is_a_clear_error():
    class Column:
        def init(self, z, b, device):
            return ()

        def check(self, z, fz, state):
            return torch.ones(z.shape[0], 1, dtype=torch.bool), ()

        def reset(self, state, fresh):
            return state

    for halting in ("sample", "batch"):
        with pytest.raises(ValueError, match=r"bool tensor \[B\]"):
            fpsolve.solve(lambda z, x: 0.5 * z + x, torch.zeros(3, 2), torch.ones(3, 2), criterion=Column(), halting=halting)
    with pytest.raises(ValueError, match=r"bool tensor \[B\]"):
        list(fpsolve.stream(lambda z, x: 0.5 * z + x, [torch.ones(3, 2)], slots=2, criterion=Column()))


def test_item15_stream_argument_errors_come_at_the_call():
    with pytest.raises(ValueError, match="slots"):
        fpsolve.stream(lambda z, x: z, [torch.ones(2, 1)], slots=0)   # no next() needed
    with pytest.raises(TypeError, match="rtoll"):
        fpsolve.stream(lambda z, x: z, [torch.ones(2, 1)], rtoll=1e-3)
    with pytest.raises(TypeError, match="unknown"):
        fpsolve.solve_stream(lambda z, x: z, [torch.ones(2, 1)], rtoll=1e-3)
    with pytest.raises(TypeError, match="z0"):
        list(fpsolve.stream(lambda z, x: z, [torch.ones(2, 1)], z0={"h": torch.zeros(1, 1)}))


def test_item16_an_empty_stream_keeps_the_state_structure():
    sol = fpsolve.solve_stream(lambda z, x: z, [], z0=(torch.zeros(1, 2, dtype=F64), torch.zeros(1, 3, dtype=F64)))
    assert isinstance(sol.z, tuple) and sol.z[0].shape == (0, 2) and sol.z[1].dtype == F64
    sol = fpsolve.solve_stream(lambda z, x: z, [torch.zeros(0, 5)])
    assert sol.z.shape == (0, 5) and sol.status.numel() == 0


def test_item17_a_deq_shows_the_options_in_force():
    readout = lambda z: torch.stack((z[:, 0], -z[:, 0]), 1)  # noqa: E731
    layer = fpsolve.DEQ(lambda z, x: 0.5 * z + x, criterion=fpsolve.Residual(rtol=1e-6, norm="inf"), check_every=2)
    text = repr(layer)
    assert "rtol=1e-06" in text and "norm='inf'" in text and "check_every=2" in text and "rtol=0.0001" not in text
    layer = fpsolve.DEQ(lambda z, x: 0.5 * z + x, criterion=fpsolve.Stable(readout),
                        correction=fpsolve.Correction(passes=(2,)))
    assert "Stable(" in repr(layer) and "Correction(" in repr(layer)


def test_item8_diagnose_judges_with_the_criterions_own_tolerance_and_norm():
    x = torch.rand(3, 2, dtype=F64)
    report = fpsolve.diagnose(lambda z, x: 0.5 * z + x, torch.zeros_like(x), x,
                              criterion=fpsolve.Residual(rtol=1e-12, norm="inf"), restarts=0)
    assert report.options["rtol"] == 1e-12 and report.options["norm"] == "inf"
    assert (report.solution.residual <= 1e-12 * 4).all()


@pytest.mark.parametrize("steps, every", [(4, 2), (None, 3)])
def test_item3_checkpointed_unroll_recomputes_with_the_forwards_dropout_mask(steps, every):
    """A DEQ with SharedDropout called twice before backward: the recomputation of the first
    call's checkpointed passes uses that call's mask, not the one the module holds by then."""
    def grads(checkpoint):
        torch.manual_seed(0)
        block = fpsolve.LoopedTransformerBlock(16, heads=2, dropout=0.3).double()
        layer = fpsolve.DEQ(block, backward=fpsolve.Unroll(steps=steps, checkpoint=checkpoint), max_iter=8)
        x1, x2 = torch.randn(2, 3, 5, 16, dtype=F64)
        z1, _ = layer(x1)
        layer(x2)                                   # a second forward draws new masks
        z1.pow(2).sum().backward()
        return torch.cat([p.grad.flatten() for p in layer.parameters() if p.grad is not None])

    plain, checkpointed = grads(None), grads(every)
    torch.testing.assert_close(checkpointed, plain, rtol=1e-10, atol=1e-12)


def test_item9_an_f_that_writes_into_its_input_is_a_clear_error():
    relu = torch.nn.ReLU(inplace=True)
    f = lambda z, x: 0.5 * relu(z) + x  # noqa: E731
    x = torch.randn(4, 3)
    for halting in ("sample", "batch"):
        for solver in ("fixed_point", "anderson"):
            with pytest.raises(ValueError, match="in place"):
                fpsolve.solve(f, torch.randn(4, 3), x, halting=halting, solver=solver)
    with pytest.raises(ValueError, match="in place"):   # a write at a later pass only
        fpsolve.solve(lambda z, x: 0.5 * (z.clamp_(max=10) if z.abs().sum() > 0 else z) + x, torch.zeros(4, 3), x)
    for solver in ("fixed_point", "anderson"):
        with pytest.raises(ValueError, match="in place"):
            list(fpsolve.stream(f, [x], slots=2, solver=solver))
    z0 = torch.randn(4, 3)                              # an out-of-place f is untouched
    assert fpsolve.solve(lambda z, x: 0.5 * torch.relu(z) + x, z0, x.abs()).converged.all()


def test_item13_numpy_scalars_in_the_norm_bounds():
    layer = fpsolve.spectral_bound(torch.nn.Linear(4, 4), np.float32(0.8), power_iterations=np.int64(3))
    assert abs(fpsolve.lipschitz_bounds(layer)[""] - 0.8) < 1e-6
    fpsolve.frobenius_bound(torch.nn.Linear(4, 4), np.float64(0.5))
    with pytest.raises(ValueError, match="power_iterations"):
        fpsolve.spectral_bound(torch.nn.Linear(4, 4), 0.8, power_iterations=np.int64(0))
