"""`DEQ`: an nn.Module that solves its block's fixed point; and a Jacobian-norm penalty."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._checks import as_bool, as_int, check_transforms, usable_start
from ._options import DEQ_DEFAULTS, Options
from ._solution import Solution
from ._solve import solve_with
from ._tree import ShapeError, StateLayout
from .blocks import SharedDropout


def jacobian_penalty(f: Callable[..., Any], z: Any, x: Any = None, samples: int = 1,
                     normalize: bool = False) -> Tensor:
    """Hutchinson estimate of ||∂f/∂z||_F² per sample at z, differentiable (for the loss).

    E_v ||vᵀ J||² with v ~ N(0, I) equals ||J||_F²; `samples` probes are averaged. Penalising
    it keeps the block contractive during training (Bai et al., "Stabilizing Equilibrium
    Models by Jacobian Regularization", ICML 2021). `DEQ(jacobian_penalty=k)` calls it for you.

    Normalisation: by default the estimate is the sum over the Jacobian's entries, ||J||_F²,
    which grows with the state size n (the number of entries of one sample's state, every
    part of a tuple state counted). `normalize=True` divides it by n, the mean squared entry
    per state coordinate ||J||_F² / n: the scale of torchdeq's `jac_reg`, whose value is the
    batch mean of this (so a weight tuned for `jac_reg` carries over unchanged, where with
    `normalize=False` it would act n times stronger).

    Args:
        f: The map, `f(z, x)` (`f(z)` when x is None).
        z: Where to take the Jacobian (usually the solution): a tensor `[B, ...]` or a
            tuple/list of such (then J is the Jacobian of the whole state, every part included).
            It is detached: the estimate's gradient reaches f's parameters and x, not z.
        x: f's input, or None.
        samples: The number of random probes averaged (an integer >= 1).
        normalize: Divide each sample's estimate by its state size n (torchdeq's scale).

    Returns:
        `[B]`: the estimate per sample, with a graph to f's parameters (for `loss.backward()`).

    Raises:
        TypeError: `samples` not an integer, `normalize` not a bool, or z or f's output of the
            wrong kind.
        ValueError: `samples` < 1, or f returning another shape than z.

    Example:
        ```python
        A = torch.tensor([[0.3, 0.4], [0.0, 0.5]])
        z = torch.randn(4, 2)
        est = fpsolve.jacobian_penalty(lambda z: z @ A.T, z, samples=2000)
        assert torch.allclose(est, torch.full((4,), float(A.pow(2).sum())), rtol=0.1)   # ||A||_F² = 0.5
        per_entry = fpsolve.jacobian_penalty(lambda z: z @ A.T, z, samples=2000, normalize=True)
        assert torch.allclose(per_entry, torch.full((4,), 0.25), rtol=0.1)              # 0.5 / n, n = 2
        ```
    """
    samples = as_int("samples", samples)
    normalize = as_bool("normalize", normalize)
    state = StateLayout(z)
    zs = tuple(t.detach().requires_grad_() for t in state.leaves)
    arg = zs[0] if state.container is None else state.container(zs)
    with torch.enable_grad():
        out = f(arg, x) if x is not None else f(arg)
        state.check_output(out)
        outs = (out,) if state.container is None else tuple(out)
        total = zs[0].new_zeros(state.batch)
        for _ in range(samples):
            probes = tuple(torch.randn_like(o) for o in outs)
            grads = torch.autograd.grad(outs, zs, probes, create_graph=True, retain_graph=True,
                                        allow_unused=True)
            for g in grads:
                if g is not None:
                    total = total + g.pow(2).reshape(g.shape[0], -1).sum(dim=1)
    total = total / samples
    if normalize:
        total = total / sum(math.prod(t.shape[1:]) for t in zs)   # entries of one sample's state
    return total


_SHAPE_WORDS = ("shape", "size", "dimension", "channels", "broadcast", "expand")


def _is_shape_error(err: BaseException) -> bool:
    """The block returned another shape (fpsolve's `ShapeError`), or rejected the state's
    shape itself: a RuntimeError from a matmul, view, norm or broadcast that did not fit."""
    if isinstance(err, ShapeError):
        return True
    if type(err) is RuntimeError:
        text = str(err).lower()
        return any(w in text for w in _SHAPE_WORDS)
    return False


def _add_note(err: BaseException, note: str) -> None:
    """Context for the user's own exception, keeping its type (notes need Python >= 3.11)."""
    if hasattr(err, "add_note"):
        err.add_note(note)


class DEQ(nn.Module):
    """A deep-equilibrium layer: `z, sol = layer(x, z0=None)` solves z = block(z, x).

    `block`'s parameters are this module's parameters. Options are those of `fpsolve.solve`
    (`criterion=` included: e.g. `fpsolve.Stable(readout)` halts on a settled read-out), and
    are all validated here, not at the first forward. It works under `torch.no_grad()`, on
    any device and inside `DistributedDataParallel`; each forward resets the block's
    `SharedDropout` masks. `layer.last_solution` keeps the last forward's `Solution`, detached.

    Args:
        block: An `nn.Module` or a function, called as `block(z, x)`.
        solver: As for `solve`: "fixed_point", "anderson", "broyden" or a solver object.
        backward: As for `solve`: "implicit", "phantom", "unroll", "none" or an object.
        atol: Absolute tolerance.
        rtol: Relative tolerance.
        max_iter: The most evaluations of block per sample (default 30 here).
        halting: "sample" or "batch" (a block that mixes samples, e.g. BatchNorm).
        norm: "l2" or "inf".
        record: Keep the residual history in `sol.trace`.
        jacobian_penalty: k > 0: in grad mode, `sol.jacobian_penalty` holds the per-sample
            Hutchinson estimate of ||∂f/∂z||_F² at the solution (k probes), to add to the loss.
        jacobian_normalize: Divide that estimate by the state size, as torchdeq's `jac_reg`
            does (see `fpsolve.jacobian_penalty(normalize=True)`).
        criterion: None or a criterion object, as for `solve`.
        check_every: As for `solve`.
        min_iter: As for `solve`: no sample stops by its criterion before this many passes.
        correction: None or a `fpsolve.Correction(passes=...)`: `sol.path` holds the iterates
            at those passes, each with a phantom gradient, for a fixed-point-correction loss
            (docs/training.md).
        eval_max_iter: None, or the most evaluations per sample when the layer is in eval mode
            (`layer.eval()`; torchdeq's `eval_f_max_iter`); `max_iter` holds in training mode.

    Raises:
        TypeError: `block` not callable, or an option of the wrong type.
        ValueError: an unknown name, a bad tolerance, `max_iter` or `eval_max_iter`, or
            `jacobian_penalty` < 0.

    Example:
        ```python
        class Block(torch.nn.Module):   # f(z, x) = tanh(W z) + x with ||W||_2 <= 0.8: a contraction
            def __init__(self):
                super().__init__()
                self.lin = fpsolve.spectral_bound(torch.nn.Linear(4, 4), 0.8)
            def forward(self, z, x):
                return torch.tanh(self.lin(z)) + x
        layer = fpsolve.DEQ(Block(), max_iter=40)
        z, sol = layer(torch.randn(8, 4))   # z0 defaults to zeros shaped like x
        z.pow(2).mean().backward()           # implicit gradient to the block's parameters
        assert bool(sol.converged.all()) and all(p.grad is not None for p in layer.parameters())
        ```
    """

    #: The last forward's Solution, detached (safe to keep and to deepcopy); its `adjoint` is
    #: set when that forward's implicit backward runs. `layer.last_solution.stats()` after
    #: `loss.backward()` is one row for a logger.
    last_solution: Optional[Solution] = None

    def __init__(
        self,
        block: Union[nn.Module, Callable[..., Any]],
        *,
        solver: Any = "anderson",
        backward: Any = "implicit",
        atol: float = 0.0,
        rtol: float = 1e-4,
        max_iter: int = 30,
        halting: str = "sample",
        norm: str = "l2",
        record: bool = False,
        jacobian_penalty: int = 0,
        criterion: Any = None,
        check_every: Optional[int] = None,
        min_iter: Optional[int] = None,
        correction: Any = None,
        jacobian_normalize: bool = False,
        eval_max_iter: Optional[int] = None,
    ) -> None:
        super().__init__()
        if not callable(block):
            raise TypeError(f"block must be an nn.Module or a function f(z, x); got {type(block).__name__}.")
        self.block = block
        # Every option is normalised now, once (not at the first forward, not at every forward).
        self.settings = Options.make("DEQ", DEQ_DEFAULTS, dict(
            solver=solver, backward=backward, atol=atol, rtol=rtol, max_iter=max_iter, halting=halting,
            norm=norm, record=record, criterion=criterion, check_every=check_every, min_iter=min_iter,
            correction=correction))
        self.jacobian_penalty = as_int("jacobian_penalty (probes)", jacobian_penalty, minimum=0)
        self.jacobian_normalize = as_bool("jacobian_normalize", jacobian_normalize)
        self.eval_max_iter = None if eval_max_iter is None else as_int("eval_max_iter", eval_max_iter)
        #: The options in eval mode: `settings` with max_iter = eval_max_iter (validated the same way).
        self.eval_settings = self.settings
        if self.eval_max_iter is not None:
            try:
                self.eval_settings = Options.make("DEQ", DEQ_DEFAULTS, dict(self.settings.given, max_iter=self.eval_max_iter))
            except (TypeError, ValueError) as err:
                raise type(err)(f"eval_max_iter={self.eval_max_iter}: {err}") from None

    @property
    def options(self) -> dict:
        """The options as given (numbers normalised), as keyword arguments of `fpsolve.solve`.

        Returns:
            A new dict each time (`self.settings` holds the normalised `Options` in force).
        """
        return dict(self.settings.given)

    @staticmethod
    def adapt_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> Dict[str, Any]:
        """`state_dict` with the keys of each DEQ's block filled in from the block's other name in `model`.

        A block kept as an attribute of the model and also given to `DEQ` (`self.func = Block()`,
        `self.deq = fpsolve.DEQ(self.func)`) is registered twice, so `model.state_dict()` holds
        its tensors twice (`func.*` and `deq.block.*`), while a checkpoint of a model without
        the DEQ wrapper, such as a torchdeq model (whose `get_deq` layer has no state), holds
        them once. For every `DEQ` in `model` whose block is an `nn.Module` also registered
        elsewhere in `model`, the names the checkpoint lacks are filled from the one it has (in
        either direction); every other key is kept as it is, so `model.load_state_dict(...)`
        with `strict=True` still reports anything else that is missing or unexpected.

        Args:
            model: The module to load into (the root whose `load_state_dict` is called).
            state_dict: The checkpoint's state dict (left unchanged).

        Returns:
            A new dict: the checkpoint's entries plus the filled-in ones (the same tensors).

        Example:
            ```python
            model = torch.nn.Module()
            model.func = torch.nn.Linear(3, 3)       # the block, kept as a torchdeq model keeps it
            model.deq = fpsolve.DEQ(model.func)      # ... and registered again inside the DEQ
            checkpoint = {"func.weight": torch.eye(3), "func.bias": torch.zeros(3)}   # saved without DEQ
            assert len(model.state_dict()) == 4      # func.* and deq.block.*
            model.load_state_dict(fpsolve.DEQ.adapt_state_dict(model, checkpoint))   # strict
            assert torch.equal(model.deq.block.weight, torch.eye(3))
            ```
        """
        out = dict(state_dict)
        names: Dict[int, list] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            names.setdefault(id(module), []).append(name)
        for module in model.modules():
            if not isinstance(module, DEQ) or not isinstance(module.block, nn.Module):
                continue
            prefixes = [n + "." if n else "" for n in dict.fromkeys(names.get(id(module.block), []))]
            held = {p: {k[len(p):]: v for k, v in state_dict.items() if k.startswith(p)} for p in prefixes}
            source = next((part for part in held.values() if part), None)
            if source is None:
                continue
            for p, part in held.items():
                if not part:
                    out.update({p + k: v for k, v in source.items()})
        return out

    def forward(self, x: Any, z0: Any = None) -> Tuple[Any, Solution]:
        """Solve z = block(z, x) for the batch x; returns `(z, sol)`.

        Args:
            x: The input: a tensor `[B, ...]`, or a tuple/list/dict of batch-first tensors.
            z0: The starting state; None: zeros shaped like x (x must then be one tensor
                shaped like the state).

        Returns:
            `sol.z` (differentiable as `backward` says) and the `Solution`.

        Raises:
            ValueError: z0 is None and x is not a tensor, or the block rejects (or changes)
                a state shaped like x: pass z0. Any error of `solve`, or the block's own.

        Example:
            ```python
            layer = fpsolve.DEQ(lambda z, x: 0.5 * torch.tanh(z) + x[0] * x[1])
            x = (torch.ones(2, 3), torch.full((2, 3), 0.5))
            z, sol = layer(x, z0=torch.zeros(2, 3))   # x is a tuple: z0 must be given
            assert z.shape == (2, 3) and bool(sol.converged.all())
            print(layer.last_solution.stats()["iterations_mean"])
            ```
        """
        check_transforms(self.settings.backward)
        for m in self.modules():          # SharedDropout: one mask per forward, every pass
            if isinstance(m, SharedDropout):
                m.reset()
        inferred = z0 is None
        if inferred:
            if not isinstance(x, Tensor):
                raise ValueError(
                    f"DEQ: x is a {type(x).__name__}, so the state's shape cannot be inferred; "
                    f"pass z0 (e.g. layer(x, z0=torch.zeros(B, width)))."
                )
            z0 = torch.zeros_like(x)
        elif torch.is_grad_enabled():
            z0 = usable_start(z0)     # a warm start made under inference_mode
        try:
            # Parametrizations (spectral_norm, ...) are computed once per forward, so f is the
            # same map at every pass (and cheaper); the graph still reaches the originals.
            with parametrize.cached():
                sol = solve_with(self.block, z0, x, self.settings if self.training else self.eval_settings)
        except Exception as err:
            # With z0 inferred, a block that rejects the state's shape on its first call (or
            # returns another shape) almost always means the state has another width than x.
            # Any other exception (a KeyError in the block, ...) reaches the caller as it is.
            if inferred and getattr(err, "_fpsolve_at_start", False) and _is_shape_error(err):
                raise ValueError(
                    f"DEQ: z0 defaulted to zeros shaped like x {tuple(x.shape)}, and the block "
                    f"rejected that shape or returned another one; pass z0 shaped like the "
                    f"state (layer(x, z0=...)). The block said: {err}"
                ) from err
            if inferred and getattr(err, "_fpsolve_at_start", False):
                _add_note(err, f"fpsolve.DEQ: raised by the block's first call, with z0 = zeros "
                               f"shaped like x {tuple(x.shape)}.")
            raise
        if self.jacobian_penalty and torch.is_grad_enabled():
            sol.jacobian_penalty = jacobian_penalty(self.block, sol.z, x, self.jacobian_penalty,
                                                    normalize=self.jacobian_normalize)
        self.last_solution = sol.detached()
        return sol.z, sol

    def extra_repr(self) -> str:
        text = self.settings.describe()
        if self.eval_max_iter is not None:
            text += f", eval_max_iter={self.eval_max_iter}"
        if self.jacobian_penalty:
            text += f", jacobian_penalty={self.jacobian_penalty}"
            if self.jacobian_normalize:
                text += ", jacobian_normalize=True"
        return text
