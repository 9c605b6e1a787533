"""Shared material of the fxsketch.tuner tests: scikit-learn's digits and small trained models.

The other `test_tuner_*` modules import from here (`from test_tuner_support import ...`); the
models are trained once per process and handed out as copies.
"""

from __future__ import annotations

import copy
import functools

import optuna
import pytest
import torch
from torch import nn

from fxsketch.nn import SKLinear


@pytest.fixture(autouse=True)
def one_thread():
    """Run each tuner test on one intra-op thread: the tiny matmuls here only lose from threading on a
    shared 2-core machine. Modules opt in with `from test_tuner_support import one_thread`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_val, y_val): the 1797 8×8 digits, scaled to [0, 1], split 1400 / 397."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def val_loader(batch_size: int = 128) -> torch.utils.data.DataLoader:
    """The validation digits as a DataLoader (what the seed examples iterate over)."""
    _, _, xv, yv = digits()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=batch_size)


def train_loader(batch_size: int = 100) -> torch.utils.data.DataLoader:
    """The training digits as a shuffled DataLoader (seeded)."""
    x, y, _, _ = digits()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))


class SimpleModel(nn.Module):
    """The seed's SimpleModel (fc1 → relu1 → fc2 → relu2 → fc3) sized for 8×8 digits."""

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, width)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(width, width)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 64)
        x = self.relu1(self.fc1(x))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


class ConvNet(nn.Module):
    """A small CNN with `conv1`, `conv2` (the README's layer names) for 1×8×8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 8, 8)
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


def fit(model: nn.Module, epochs: int = 15, lr: float = 1e-2, max_batches: int | None = None) -> nn.Module:
    """Train `model` on the digits with Adam; returns it in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for i, (xb, yb) in enumerate(train_loader()):
            if max_batches is not None and i >= max_batches:
                break
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@functools.lru_cache(maxsize=None)
def _trained(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return fit(SimpleModel())
    return fit(ConvNet(), epochs=8)


def trained_mlp() -> SimpleModel:
    """A copy of the SimpleModel trained on the digits (about 0.96 validation accuracy)."""
    return copy.deepcopy(_trained("mlp"))


def trained_convnet() -> ConvNet:
    """A copy of the ConvNet trained on the digits."""
    return copy.deepcopy(_trained("conv"))


def accuracy(model: nn.Module) -> float:
    """Top-1 accuracy on the validation digits."""
    _, _, xv, yv = digits()
    with torch.no_grad():
        return (model(xv).argmax(1) == yv).float().mean().item()


def size_speed(model: nn.Module) -> float:
    """A deterministic stand-in for throughput: 1e4 / number of parameters (smaller is faster)."""
    return 1e4 / sum(p.numel() for p in model.parameters())


def test_support_models_learn_the_digits() -> None:
    assert accuracy(trained_mlp()) > 0.9
    assert accuracy(trained_convnet()) > 0.6
    sk = nn.Sequential(SKLinear(64, 32, num_terms=2, low_rank=8), nn.ReLU(), SKLinear(32, 10, 1, 8))
    assert accuracy(fit(sk, epochs=5)) > 0.8  # the sketched layers train from a random start


def pruning_accuracy(search):
    """Validation accuracy that reports each batch to `search` and stops when it says prune."""
    def acc(model):
        correct = total = 0
        with torch.no_grad():
            for step, (xb, yb) in enumerate(val_loader(batch_size=100)):
                correct += (model(xb).argmax(1) == yb).sum().item()
                total += len(yb)
                search.report_intermediate(correct / total, step)
                if search.should_prune():
                    raise optuna.TrialPruned()
        return correct / total
    return acc
