"""Test-wide setup and the small models and data several test modules share.

Triton kernels run under its CPU interpreter (set before triton is imported). Test modules import the
helpers below with `from conftest import ...` (pytest puts `tests/` on `sys.path` and imports this file
as the module `conftest`, so every test module shares one copy of the cached data and trained models);
`one_thread` is a fixture, taken with `pytestmark = pytest.mark.usefixtures("one_thread")`.
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("TRITON_INTERPRET", "1")

import optuna  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import fxsketch  # noqa: E402
from fxsketch import LayerConfig  # noqa: E402
from fxsketch.measure import Speedup  # noqa: E402
from fxsketch.nn import LowRankLinear  # noqa: E402


@pytest.fixture
def one_thread():
    """Run a test on one intra-op torch thread: the tiny matmuls of the tuner tests only lose from
    threading on a shared 2-core machine, and on a shared machine foreign load stalls multi-threaded
    GEMMs 10-30x, unevenly between calls, which timings must not see."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- a saved artifact in a fresh process


def loaded_in_fresh_process(path, x: torch.Tensor, expected: torch.Tensor, tmp_path, then: str = "") -> str:
    """Load the `.pt2` at `path` with `fxsketch.load` in a new Python process, check that it maps
    `x` to `expected` (float32 tolerances), run `then` there (`m` is the module) and return its
    standard output; the child's failure fails the caller's test with its stderr."""
    ref = tmp_path / "fresh_process_reference.pt"
    torch.save((x, expected), ref)
    code = textwrap.dedent(f"""
        import torch, fxsketch
        m = fxsketch.load({str(path)!r})
        x, y = torch.load({str(ref)!r})
        with torch.no_grad():
            out = m(x)
        assert out.shape == y.shape, out.shape
        torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-5)
    """) + textwrap.dedent(then)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def int8_loads_in_fresh_process(gm: torch.fx.GraphModule, x: torch.Tensor, tmp_path, ops: set[str]) -> None:
    """Save `gm` (traced at `x`) as `.pt2`, check that the program holds `ops`, and load it in a new
    process: it maps a batch of another size as `gm` does and keeps its int8 tensors as int8."""
    path = tmp_path / "int8.pt2"
    program = fxsketch.save(gm, path, x)
    assert ops <= {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    x7 = torch.randn(7, x.shape[-1])
    with torch.no_grad():
        out = loaded_in_fresh_process(path, x7, gm(x7), tmp_path,
                                      "print(sorted({str(t.dtype) for t in m.state_dict().values()}))")
    assert "torch.int8" in out


# --------------------------------------------------------------------------- the rank-6 MLP of the search tests


def mlp(seed: int = 0) -> nn.Module:
    """An MLP whose weights are rank 6 plus noise, so low ranks fail and moderate ranks pass."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            out, inp = layer.weight.shape
            layer.weight.copy_(torch.randn(out, 6) @ torch.randn(6, inp) / inp**0.5 + 0.02 * torch.randn(out, inp))
    return model


MLP_X = torch.randn(128, 32, generator=torch.Generator().manual_seed(1))


def agreement(model: nn.Module, x: torch.Tensor = MLP_X):
    """Accuracy = agreement with the dense model's predictions on `x` (1.0 for the dense model)."""
    with torch.no_grad():
        ref = model(x).argmax(1)

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return (m(x).argmax(1) == ref).float().mean().item()

    return accuracy


def replaced(m: nn.Module) -> int:
    """How many LowRankLinear layers `m` holds."""
    return sum(isinstance(s, LowRankLinear) for s in m.modules())


def run_search(model=None, spec=None, **kw):
    """`fxsketch.optimize` on `mlp()` (or `model`): flops, threshold 0.8, 4 trials, seed 0, Linears 0 and 2."""
    model = model if model is not None else mlp()
    args = dict(example_inputs=MLP_X, accuracy_fn=agreement(model), accuracy_threshold=0.8,
                objective="flops", n_trials=4, seed=0)
    args.update(kw)
    spec = spec if spec is not None else LayerConfig({"type": "Linear", "range": [0, 2]}, params="auto")
    return fxsketch.optimize(model, spec, **args)


# --------------------------------------------------------------------------- the calibration tests' model and data

D, OUT = 48, 40


def calib_data(n, seed, shift=0.0):
    """Inputs on a 10-dimensional subspace plus a little noise (and an optional mean): anisotropic, like activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(10, D, generator=torch.Generator().manual_seed(99))
    return torch.randn(n, 10, generator=g) @ mix + 0.05 * torch.randn(n, D, generator=g) + shift


CALIB, HELD_OUT = calib_data(1500, 1), calib_data(500, 2)


def calib_mlp():
    """48 → 40 → 40 → 6 with tanh, seed 0."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, OUT), nn.Tanh(), nn.Linear(OUT, OUT), nn.Tanh(), nn.Linear(OUT, 6)).eval()


def rel_error(module, model, x=HELD_OUT):
    """‖module(x) − model(x)‖² / ‖model(x)‖²."""
    with torch.no_grad():
        ref = model(x)
        return float((module(x) - ref).square().sum() / ref.square().sum())


def layer_error(replacement, dense, x):
    """E‖(W − Ŵ)x‖² / E‖Wx‖² with the bias taken out of both."""
    with torch.no_grad():
        ref = dense(x) - dense.bias
        return float((replacement(x) - dense(x)).square().sum() / ref.square().sum())


def calib_setup():
    """`calib_mlp()`, its capture on 8 rows of `CALIB`, and its layer records by name."""
    model = calib_mlp()
    gm = fxsketch.capture(model, CALIB[:8])
    records = {r.name: r for r in fxsketch.find_layers(gm)}
    return model, gm, records


def held_out_agreement(model):
    """Accuracy = agreement with `model`'s predictions on `HELD_OUT`."""
    return agreement(model, HELD_OUT)


class Tokens(nn.Module):
    """A token model with an `attention_mask` input, like HF encoders: (N, L, D) → (N, L, 6)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(D, OUT), nn.Linear(OUT, 6)

    def forward(self, x, attention_mask):
        return self.fc2(torch.tanh(self.fc1(x))) * attention_mask.unsqueeze(-1)


def tokens():
    """A padded batch for `Tokens`: (2, 7, D) inputs and their attention mask (5 and 3 real tokens)."""
    x = calib_data(2 * 7, 3).reshape(2, 7, D)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0]])
    return x, mask


# --------------------------------------------------------------------------- the timing tests' wide MLP


def wide_mlp(seed: int = 0) -> nn.Module:
    """512-wide layers whose middle weight is rank 8 plus noise: rank 1 loses the predictions, 64 keeps them."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)).eval()
    with torch.no_grad():
        model[2].weight.copy_(torch.randn(512, 8) @ torch.randn(8, 512) / 512**0.5 + 0.001 * torch.randn(512, 512))
    return model


WIDE_X = torch.randn(256, 256, generator=torch.Generator().manual_seed(2))


def fake_speedup(median: float, spread: float = 0.02, stable: bool = True, busy: float = 0.0) -> Speedup:
    """A made-up whole-model measurement: `median` with an IQR of ±`spread` over 7 rounds."""
    return Speedup(median, median - spread, median + spread, 7, stable, 1e-3, 1e-3 / median, busy)


# --------------------------------------------------------------------------- scikit-learn's digits and small trained models
# (the fxsketch.tuner and fxsketch.lightning tests; trained once per process and handed out as copies)


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
