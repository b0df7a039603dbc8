"""Train a DEQ classifier on the 8x8 digits, with implicit, phantom and unrolled gradients.

    python examples/train_deq.py                       # all three modes, about a minute on CPU
    python examples/train_deq.py --modes implicit --epochs 30
    python examples/train_deq.py --modes implicit,phantom --correction   # each mode without and with

The data is scikit-learn's `load_digits` (1797 images of 8x8 pixels, 10 classes), which ships
inside the scikit-learn package: nothing is downloaded. The model is

    x (64 pixels) -> encoder Linear(64, H) -> u
    z* = tanh(W z* + u)        solved by fpsolve.DEQ (Anderson, rtol 1e-4, at most 30 passes)
    logits = head Linear(H, 10)(z*)

W carries the spectral-norm recipe of docs/training.md (torch's own spectral_norm
parametrisation times a gain of 0.9), so the block stays a contraction whatever the optimiser
does. Each mode starts from the same initial weights and sees the same batches.

Reported per mode: test accuracy, mean forward iterations and mean backward iterations per
epoch (implicit: the adjoint solve's own iterations, from `sol.adjoint`; phantom: its k
steps; unroll: the recorded forward passes), wall time of training, and the most memory kept
for backward in one training step: the distinct storages autograd saves, parameters and data
left out (counted with torch.autograd.graph.saved_tensors_hooks). A figure of loss, accuracy
and iterations over training is written to docs/figures/train_deq.png.

`--correction` trains each mode twice, without and with fixed-point correction: the DEQ hands
back its iterates at `--correction-passes` (fpsolve.Correction, each with one phantom step) and
the loss adds the cross-entropy of the head on each, weighted gamma^(n-i) as in DEQ-Flow
(the final state weighs 1).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import fpsolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {
    "implicit": fpsolve.Implicit(),
    "phantom": fpsolve.Phantom(steps=5, damping=0.8),
    "unroll": fpsolve.Unroll(),
}


# ---------------------------------------------------------------------------------------
# data and model
# ---------------------------------------------------------------------------------------

def load_data(seed: int):
    """The digits, scaled to [0, 1], split 75/25 (stratified); float32 tensors."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype("float32") / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.25,
                                              stratify=digits.target, random_state=seed)
    as_t = lambda a, dt: torch.as_tensor(a, dtype=dt)  # noqa: E731
    return (as_t(x_tr, torch.float32), as_t(y_tr, torch.int64),
            as_t(x_te, torch.float32), as_t(y_te, torch.int64))


class Cell(nn.Module):
    """The block f(z, u) = tanh(gain * W z + u), with ||W||_2 held at 1 by spectral_norm."""

    def __init__(self, width: int, gain: float = 0.9) -> None:
        super().__init__()
        self.lin = spectral_norm(nn.Linear(width, width))
        self.gain = gain

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.gain * self.lin(z) + u)


class DEQClassifier(nn.Module):
    def __init__(self, width: int, backward, correction=None, gain: float = 0.9) -> None:
        super().__init__()
        self.enc = nn.Linear(64, width)
        self.deq = fpsolve.DEQ(Cell(width, gain), solver="anderson", backward=backward,
                               rtol=1e-4, max_iter=30, correction=correction)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor):
        z, sol = self.deq(self.enc(x))
        return self.head(z), sol


# ---------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------

@dataclass
class History:
    mode: str
    loss: List[float] = field(default_factory=list)          # mean training loss per epoch
    test_acc: List[float] = field(default_factory=list)
    early_acc: List[List[float]] = field(default_factory=list)   # per epoch: at each correction pass
    fwd_iters: List[float] = field(default_factory=list)     # mean per sample, per epoch
    bwd_iters: List[float] = field(default_factory=list)
    epoch_seconds: List[float] = field(default_factory=list)
    peak_saved_bytes: int = 0
    not_converged: int = 0          # forward samples that ended MAX_ITER/DIVERGED in training
    adjoint_not_converged: int = 0  # implicit only: adjoint samples that did not converge


def backward_iterations(backward, sol: fpsolve.Solution) -> float:
    """Mean per-sample iterations of the backward pass of one step."""
    if isinstance(backward, fpsolve.Implicit):
        return float(sol.adjoint.iterations.double().mean())
    if isinstance(backward, fpsolve.Phantom):
        return float(backward.steps)
    return float(sol.iterations.double().mean())   # Unroll(): every recorded forward pass


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    logits, _ = model(x)
    model.train()
    return float((logits.argmax(dim=1) == y).double().mean())


def correction_loss(model: DEQClassifier, sol: fpsolve.Solution, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """Cross-entropy of the head on each kept iterate, weighted gamma^(n-i) (n: the states,
    the final one included, which the caller weighs 1): fixed-point correction."""
    n = len(sol.path) + 1
    return sum(gamma ** (n - 1 - i) * nn.functional.cross_entropy(model.head(z), y)
               for i, z in enumerate(sol.path))


@torch.no_grad()
def early_accuracy(model: DEQClassifier, x: torch.Tensor, y: torch.Tensor, passes) -> List[float]:
    """Test accuracy of the head on the iterate at each of `passes` (an early exit there),
    read from `sol.path` of one solve with the model's own options."""
    options = dict(model.deq.options, correction=fpsolve.Correction(passes=passes), backward="none")
    model.eval()     # (in training mode spectral_norm would take a power-iteration step)
    sol = fpsolve.solve(model.deq.block, torch.zeros(x.shape[0], model.head.in_features), model.enc(x),
                        **options)
    model.train()
    return [float((model.head(z).argmax(dim=1) == y).double().mean()) for z in sol.path]


def train(mode: str, data, args, progress: bool, corrected: bool = False) -> History:
    from tqdm import tqdm

    x_tr, y_tr, x_te, y_te = data
    backward = MODES[mode]
    torch.manual_seed(args.seed)             # the same initial weights for every mode
    correction = fpsolve.Correction(passes=args.correction_passes, steps=1) if corrected else None
    model = DEQClassifier(args.width, backward, correction, args.gain)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(args.seed)   # the same batches for every mode
    mode = f"{mode}+correction" if corrected else mode
    hist = History(mode)
    # Memory kept for backward: the distinct storages autograd saves in one training step,
    # parameters and data left out (they exist anyway). Storages are held until the step ends,
    # so a freed address cannot be reused and miscounted.
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set = set()
    kept: list = []
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in params:
            seen.add(key)
            kept.append(storage)
            saved[0] += storage.nbytes()
        return t

    bar = tqdm(range(args.epochs), desc=f"{mode:>8}", disable=not progress, leave=True)
    for _ in bar:
        t0 = time.perf_counter()
        perm = torch.randperm(x_tr.shape[0], generator=order)
        losses, fwd, bwd = [], [], []
        for i in range(0, x_tr.shape[0], args.batch):
            idx = perm[i:i + args.batch]
            saved[0] = 0
            xb = x_tr[idx]
            seen.add(xb.untyped_storage().data_ptr())
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logits, sol = model(xb)
                loss = nn.functional.cross_entropy(logits, y_tr[idx])
                if corrected:
                    loss = loss + correction_loss(model, sol, y_tr[idx], args.correction_gamma)
            opt.zero_grad()
            loss.backward()
            opt.step()
            hist.peak_saved_bytes = max(hist.peak_saved_bytes, saved[0])
            seen.clear(), kept.clear()
            hist.not_converged += int((~sol.converged).sum())
            if sol.adjoint is not None:
                hist.adjoint_not_converged += int((~sol.adjoint.converged).sum())
            losses.append(float(loss.detach()))
            fwd.append(float(sol.iterations.double().mean()))
            bwd.append(backward_iterations(backward, sol))
        hist.epoch_seconds.append(time.perf_counter() - t0)
        hist.loss.append(sum(losses) / len(losses))
        hist.fwd_iters.append(sum(fwd) / len(fwd))
        hist.bwd_iters.append(sum(bwd) / len(bwd))
        hist.test_acc.append(accuracy(model, x_te, y_te))
        if args.correction:
            hist.early_acc.append(early_accuracy(model, x_te, y_te, args.correction_passes))
        bar.set_postfix(loss=f"{hist.loss[-1]:.3f}", test_acc=f"{hist.test_acc[-1]:.3f}",
                        fwd=f"{hist.fwd_iters[-1]:.1f}", bwd=f"{hist.bwd_iters[-1]:.1f}")
    return hist


# ---------------------------------------------------------------------------------------
# report and figure
# ---------------------------------------------------------------------------------------

def report(histories: List[History]) -> List[str]:
    lines = [
        "| mode | test accuracy (final / best) | forward iterations (mean per epoch, first → last) "
        "| backward iterations (first → last) | training time (s) | s / epoch | kept for backward (KiB, largest step) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for h in histories:
        total = sum(h.epoch_seconds)
        lines.append(
            f"| {h.mode} | {h.test_acc[-1]:.3f} / {max(h.test_acc):.3f} | "
            f"{h.fwd_iters[0]:.1f} → {h.fwd_iters[-1]:.1f} | {h.bwd_iters[0]:.1f} → {h.bwd_iters[-1]:.1f} | "
            f"{total:.1f} | {total / len(h.epoch_seconds):.2f} | {h.peak_saved_bytes / 1024:.0f} |"
        )
    return lines


def early_report(histories: List[History], passes) -> List[str]:
    """Test accuracy on the iterate at each correction pass (an early exit), epoch 1 → last."""
    lines = ["| mode | " + " | ".join(f"test accuracy at pass {p} (epoch 1 → last)" for p in passes) + " |",
             "|---|" + "---:|" * len(passes)]
    for h in histories:
        cells = " | ".join(f"{h.early_acc[0][i]:.3f} → {h.early_acc[-1][i]:.3f}" for i in range(len(passes)))
        lines.append(f"| {h.mode} | {cells} |")
    return lines


def figure(histories: List[History], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = {"implicit": "tab:blue", "phantom": "tab:orange", "unroll": "tab:green"}
    for h in histories:
        ep = range(1, len(h.loss) + 1)
        c = colors.get(h.mode.split("+")[0])
        mk = dict(marker=".", markersize=4) if h.mode.endswith("+correction") else {}
        axes[0].plot(ep, h.loss, color=c, label=h.mode, **mk)
        axes[1].plot(ep, h.test_acc, color=c, label=h.mode, **mk)
        axes[2].plot(ep, h.fwd_iters, color=c, label=f"{h.mode} forward", **mk)
        axes[2].plot(ep, h.bwd_iters, color=c, linestyle="--", label=f"{h.mode} backward", **mk)
    axes[0].set(title="training loss", xlabel="epoch", yscale="log")
    axes[1].set(title="test accuracy", xlabel="epoch")
    axes[2].set(title="iterations per sample (mean)", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(loc="lower right")
    axes[2].legend(fontsize=7, ncol=1)
    fig.suptitle("DEQ classifier on sklearn digits (8x8): fpsolve backward modes")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> Dict[str, History]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="implicit,phantom,unroll",
                    help="comma-separated, from: " + ", ".join(MODES))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--figure", default=os.path.join(ROOT, "docs", "figures", "train_deq.png"),
                    help="where to save the figure ('' for none)")
    ap.add_argument("--json", default="", help="also write the histories to this JSON file")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--gain", type=float, default=0.9,
                    help="the cell's gain on the spectrally normalised W (above 1: may not contract)")
    ap.add_argument("--correction", action="store_true",
                    help="train each mode twice: without and with fixed-point correction")
    ap.add_argument("--correction-passes", default="3,6",
                    help="passes whose iterates get the correction loss (comma-separated)")
    ap.add_argument("--correction-gamma", type=float, default=0.8,
                    help="weight gamma^(n-i) of the i-th of n states (the final one weighs 1)")
    args = ap.parse_args(argv)
    args.correction_passes = tuple(int(p) for p in args.correction_passes.split(",") if p.strip())
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    torch.set_num_threads(args.threads)

    data = load_data(args.seed)
    print(f"digits: {data[0].shape[0]} training / {data[2].shape[0]} test images; width {args.width}, "
          f"batch {args.batch}, {args.epochs} epochs, Adam lr {args.lr}, {args.threads} thread(s)")
    runs = [(m, c) for m in modes for c in ((False, True) if args.correction else (False,))]
    histories = [train(m, data, args, progress=not args.no_progress, corrected=c) for m, c in runs]
    print("\n".join(report(histories)))
    if args.correction:
        print("\n".join(early_report(histories, args.correction_passes)))
    for h in histories:
        notes = f"{h.mode}: forward samples not converged during training: {h.not_converged}"
        if h.mode.startswith("implicit"):
            notes += f"; adjoint samples not converged: {h.adjoint_not_converged}"
        print(notes)
    if args.figure:
        figure(histories, args.figure)
        print(f"figure: {os.path.relpath(args.figure, ROOT)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([h.__dict__ for h in histories], fh, indent=1)
    return {h.mode: h for h in histories}


if __name__ == "__main__":
    main()
