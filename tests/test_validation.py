"""Bad input raises a clear exception (naming the argument) before any work is done."""
from __future__ import annotations

import pytest
import torch

import fpsolve


class CountingMap:
    """z -> 0.5 z (+ x), counting calls; every argument error must come before the first call."""

    def __init__(self):
        self.calls = 0

    def __call__(self, z, x=None):
        self.calls += 1
        return 0.5 * z if x is None else 0.5 * z + x


Z0 = torch.zeros(3, 2)
X = torch.ones(3, 2)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(max_iter=0), (ValueError,), "max_iter"),
        (dict(max_iter=-5), (ValueError,), "max_iter"),
        (dict(max_iter=2.5), (ValueError, TypeError), "max_iter"),
        (dict(max_iter=10.0), (ValueError, TypeError), "max_iter"),
        (dict(max_iter="10"), (ValueError, TypeError), "max_iter"),
        (dict(max_iter=True), (ValueError, TypeError), "max_iter"),
        (dict(atol=-1e-6), (ValueError,), "atol"),
        (dict(rtol=-1e-4), (ValueError,), "rtol"),
        (dict(rtol=float("nan")), (ValueError,), "rtol"),
        (dict(atol=float("inf")), (ValueError,), "atol"),
        (dict(rtol="1e-4"), (ValueError, TypeError), "rtol"),
        (dict(atol=0.0, rtol=0.0), (ValueError,), "atol.*rtol|rtol.*atol"),
        (dict(rtol=0), (ValueError,), "atol.*rtol|rtol.*atol"),   # atol defaults to 0
        (dict(solver="newton"), (ValueError,), "solver"),
        (dict(solver="Anderson"), (ValueError,), "solver"),
        (dict(solver=fpsolve.Anderson), (TypeError,), "solver|Anderson"),
        (dict(solver=object()), (TypeError,), "solver"),
        (dict(solver=None), (ValueError, TypeError), "solver"),
        (dict(backward="adjoint"), (ValueError,), "backward"),
        (dict(backward=""), (ValueError,), "backward"),
        (dict(halting="never"), (ValueError,), "halting"),
        (dict(halting=None), (ValueError, TypeError), "halting"),
        (dict(norm="l1"), (ValueError,), "norm"),
        (dict(norm=2), (ValueError, TypeError), "norm"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, tuple) else None,
)
def test_bad_options_raise_before_f_is_called(kwargs, exc, match):
    f = CountingMap()
    with pytest.raises(exc, match=match):
        fpsolve.solve(f, Z0, X, **kwargs)
    assert f.calls == 0


@pytest.mark.parametrize(
    "x",
    [
        torch.ones(4, 2),                                   # another batch size
        torch.ones(2, 2),
        torch.tensor(1.0),                                  # 0-dim
        (torch.ones(3, 2), torch.ones(5, 1)),               # one tuple entry off
        [torch.ones(3, 2), torch.ones(2)],
        {"a": torch.ones(3, 2), "b": torch.ones(7, 2)},     # one dict entry off
    ],
    ids=["B4", "B2", "0dim", "tuple", "list", "dict"],
)
def test_x_with_another_batch_size_raises(x):
    f = CountingMap()
    with pytest.raises(ValueError, match=r"x"):
        fpsolve.solve(lambda z, x: f(z), Z0, x)
    assert f.calls == 0


def test_x_batch_error_message_names_the_sizes():
    with pytest.raises(ValueError, match=r"4.*3|3.*4"):
        fpsolve.solve(lambda z, x: z, Z0, torch.ones(4, 2))


def test_x_of_an_unsupported_type_raises():
    f = CountingMap()
    with pytest.raises(TypeError, match="x"):
        fpsolve.solve(lambda z, x: f(z), Z0, "not a tensor")
    with pytest.raises(TypeError, match="x"):
        fpsolve.solve(lambda z, x: f(z), Z0, 3.0)
    assert f.calls == 0


@pytest.mark.parametrize(
    "z0, exc, match",
    [
        ([[0.0, 0.0]], TypeError, "z0"),                      # a nested list of floats
        (torch.zeros(3, 2, dtype=torch.int64), TypeError, "z0"),
        (torch.tensor(0.0), ValueError, "z0"),
        ((), TypeError, "z0"),
        ((torch.zeros(3, 2), torch.zeros(4, 2)), ValueError, "z0"),
        ((torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.float64)), ValueError, "z0"),
        (None, TypeError, "z0"),
    ],
    ids=["list-of-floats", "int", "0dim", "empty-tuple", "tuple-batch", "tuple-dtype", "none"],
)
def test_bad_z0_raises(z0, exc, match):
    f = CountingMap()
    with pytest.raises(exc, match=match):
        fpsolve.solve(f, z0)
    assert f.calls == 0


def test_non_finite_z0_raises():
    z0 = torch.zeros(3, 2)
    z0[1, 0] = float("nan")
    with pytest.raises(ValueError, match="z0"):
        fpsolve.solve(lambda z: 0.5 * z, z0)


def test_f_not_callable_raises():
    with pytest.raises(TypeError, match="f"):
        fpsolve.solve(3.0, Z0)


@pytest.mark.parametrize(
    "f, match",
    [
        (lambda z: z[:, :1], "shape"),
        (lambda z: z.unsqueeze(1), "shape"),
        (lambda z: z[:2], "shape"),
        (lambda z: z.T, "shape"),
        (lambda z: z.double(), "dtype"),
        (lambda z: z.half(), "dtype"),
        (lambda z: z.to("meta"), "device"),
    ],
    ids=["narrower", "extra-dim", "fewer-rows", "transposed", "float64", "float16", "meta-device"],
)
def test_f_returning_another_shape_dtype_or_device_raises(f, match):
    calls = []

    def g(z):
        calls.append(1)
        return f(z)

    with pytest.raises(ValueError, match=match):
        fpsolve.solve(g, torch.zeros(3, 2), rtol=1e-6, max_iter=50)
    assert len(calls) == 1, "the output check must come on the first call, before iterating"


def test_state_on_meta_device_with_f_returning_cpu_raises():
    with pytest.raises(ValueError, match="device"):
        fpsolve.solve(lambda z: torch.zeros(3, 2), torch.zeros(3, 2, device="meta"))


def test_x_on_another_device_raises():
    f = CountingMap()
    with pytest.raises(ValueError, match="device"):
        fpsolve.solve(lambda z, x: f(z), Z0, torch.ones(3, 2, device="meta"))
    assert f.calls == 0


@pytest.mark.parametrize(
    "f",
    [
        lambda z: 0.5 * z[0],                      # a tensor instead of a tuple
        lambda z: (0.5 * z[0],),                   # wrong length
        lambda z: (0.5 * z[0], z[1], z[1]),        # wrong length
        lambda z: (0.5 * z[0], z[1][:, :2]),       # one leaf with another shape
        lambda z: (0.5 * z[0], z[1].double()),     # one leaf with another dtype
        lambda z: (0.5 * z[0], None),              # a leaf that is not a tensor
    ],
    ids=["tensor", "short", "long", "leaf-shape", "leaf-dtype", "leaf-none"],
)
def test_f_returning_another_structure_raises(f):
    calls = []

    def g(z):
        calls.append(1)
        return f(z)

    z0 = (torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises((TypeError, ValueError), match=r"f\(z|f must"):
        fpsolve.solve(g, z0, rtol=1e-6)
    assert len(calls) == 1


def test_f_returning_a_non_tensor_raises():
    with pytest.raises(TypeError, match="tensor"):
        fpsolve.solve(lambda z: z.tolist(), torch.zeros(3, 2))


# --- solver objects ------------------------------------------------------------------------

@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (fpsolve.Anderson, dict(bogus=1), "bogus"),
        (fpsolve.Anderson, dict(memory=3), "memory"),
        (fpsolve.Broyden, dict(m=3), "m"),
        (fpsolve.Broyden, dict(bogus=1), "bogus"),
        (fpsolve.FixedPointIteration, dict(beta=0.5), "beta"),
        (fpsolve.FixedPointIteration, dict(tol=1e-3), "tol"),
    ],
)
def test_unknown_solver_options_are_a_type_error(cls, kwargs, match):
    with pytest.raises(TypeError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: fpsolve.Anderson(m=0), "m"),
        (lambda: fpsolve.Anderson(m=-2), "m"),
        (lambda: fpsolve.Anderson(m=2.5), "m"),
        (lambda: fpsolve.Anderson(beta=0.0), "beta"),
        (lambda: fpsolve.Anderson(beta=-0.5), "beta"),
        (lambda: fpsolve.Anderson(beta=5.0), "beta"),
        (lambda: fpsolve.Anderson(regularization=-1.0), "regularization"),
        (lambda: fpsolve.Broyden(memory=0), "memory"),
        (lambda: fpsolve.Broyden(memory=1.5), "memory"),
        (lambda: fpsolve.FixedPointIteration(damping=0.0), "damping"),
        (lambda: fpsolve.FixedPointIteration(damping=-1.0), "damping"),
        (lambda: fpsolve.FixedPointIteration(damping=3.0), "damping"),
    ],
    ids=["anderson-m0", "anderson-m-neg", "anderson-m-float", "anderson-beta0", "anderson-beta-neg",
         "anderson-beta-big", "anderson-reg-neg", "broyden-mem0", "broyden-mem-float",
         "fp-damping0", "fp-damping-neg", "fp-damping-big"],
)
def test_bad_solver_option_values_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("solver, option", [(fpsolve.Anderson(), "m"), (fpsolve.Broyden(), "memory"),
                                            (fpsolve.FixedPointIteration(), "damping")])
def test_solver_objects_are_immutable(solver, option):
    before = getattr(solver, option)
    with pytest.raises(AttributeError):
        setattr(solver, option, 2)
    assert getattr(solver, option) == before


def test_solver_objects_compare_and_hash_by_value():
    assert fpsolve.Anderson(m=3) == fpsolve.Anderson(m=3)
    assert fpsolve.Anderson(m=3) != fpsolve.Anderson(m=4)
    assert hash(fpsolve.Broyden(memory=4)) == hash(fpsolve.Broyden(memory=4))


def test_default_solver_options():
    assert fpsolve.Anderson().m == 5
    assert fpsolve.FixedPointIteration().damping == 1.0
