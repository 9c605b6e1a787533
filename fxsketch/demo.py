"""The embedded default: a small MLP trained on scikit-learn's bundled digits, then optimized."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import track
from torch import nn

__all__ = ["DemoTask", "make_demo_task"]


@dataclass
class DemoTask:
    """A trained model with its validation data and an accuracy function."""

    model: nn.Module
    x_val: torch.Tensor
    y_val: torch.Tensor
    example_inputs: tuple[torch.Tensor]
    train_seconds: float
    calibration: list[torch.Tensor]  # training batches (never the validation digits)

    def accuracy(self, model: nn.Module) -> float:
        """Top-1 accuracy on the held-out digits."""
        with torch.no_grad():
            return (model(self.x_val).argmax(1) == self.y_val).float().mean().item()


def make_demo_task(hidden: int = 1024, epochs: int = 40, seed: int = 0, progress: bool = False) -> DemoTask:
    """Train a 64→hidden→hidden→10 MLP on the digits data (1797 8×8 images) in a few seconds
    (`progress`: a bar over the epochs on standard error)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the demo needs scikit-learn: pip install 'fxsketch[demo]'") from exc
    torch.manual_seed(seed)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(X), generator=g)
    train, val = perm[:1437], perm[1437:]
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    start = time.perf_counter()
    epochs_run = track(range(epochs), "training the demo MLP", console=Console(stderr=True), transient=True,
                       disable=not progress)
    for _ in epochs_run:
        order = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(order), 64):
            batch = order[i:i + 64]
            loss = nn.functional.cross_entropy(model(X[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    example = X[val].repeat(2, 1)  # a 720-row batch: the size the latency is measured at
    calibration = [X[train[i:i + 256]] for i in range(0, len(train), 256)]
    return DemoTask(model, X[val], y[val], (example,), time.perf_counter() - start, calibration)
