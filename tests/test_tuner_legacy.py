"""The older guide (autotuner-guide-legacy.rst): `SkAutoTuner(parameter_bounds=..., objective_function=...)`
and its examples, which build models from `pr.nn.SKLinear`, on the digits instead of MNIST downloads
(64 input features instead of 784; fewer trials, epochs and batches)."""

from __future__ import annotations

import gc
import math
import resource
import time
from functools import lru_cache

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.optim as optim
from torch.utils.data import DataLoader, Subset, TensorDataset

import fxsketch as pr
from fxsketch.tuner import SkAutoTuner
from fxsketch.tuner.legacy import LegacyAutoTuner
from conftest import accuracy, digits, fit

pytestmark = pytest.mark.usefixtures("one_thread")


def sketched_mlp(num_terms: int, low_rank: int, width: int = 64) -> nn.Sequential:
    """The guide's two-layer SKLinear model, sized for the digits."""
    return nn.Sequential(
        pr.nn.SKLinear(64, width, num_terms=int(num_terms), low_rank=int(low_rank)),
        nn.ReLU(),
        pr.nn.SKLinear(width, 10, num_terms=max(1, int(num_terms) // 2), low_rank=max(8, int(low_rank) // 2)),
    )


# --------------------------------------------------------------------------- the guide's examples


def test_simple_linear_layer_optimization():
    def evaluate_linear_layer(num_terms, low_rank):
        model = sketched_mlp(num_terms, low_rank)
        torch.manual_seed(0)
        fit(model, epochs=1, max_batches=8)
        return accuracy(model)

    tuner = SkAutoTuner(parameter_bounds={"num_terms": (2, 16), "low_rank": (16, 128)},
                        objective_function=evaluate_linear_layer, n_initial_points=3, n_iterations=2)
    best_params, best_score = tuner.optimize()
    assert isinstance(tuner, LegacyAutoTuner)
    assert 2 <= best_params["num_terms"] <= 16 and 16 <= best_params["low_rank"] <= 128
    assert isinstance(best_params["num_terms"], int) and isinstance(best_params["low_rank"], int)
    assert best_score > 0.5  # trained from a random start on real data
    print(f"Best parameters found:\n  num_terms: {best_params['num_terms']}\n  low_rank: {best_params['low_rank']}"
          f"\n  Best accuracy: {best_score:.4f}")


class SketchedDigitsNet(nn.Module):
    """The guide's SketchedMNISTNet for 8×8 digits."""

    def __init__(self, layer1_terms, layer1_rank, layer2_terms, layer2_rank):
        super().__init__()
        self.flatten = nn.Flatten()
        self.layer1 = pr.nn.SKLinear(64, 128, num_terms=int(layer1_terms), low_rank=int(layer1_rank))
        self.relu1 = nn.ReLU()
        self.dropout1 = nn.Dropout(0.2)
        self.layer2 = pr.nn.SKLinear(128, 64, num_terms=int(layer2_terms), low_rank=int(layer2_rank))
        self.relu2 = nn.ReLU()
        self.dropout2 = nn.Dropout(0.2)
        self.layer3 = pr.nn.SKLinear(64, 10, num_terms=2, low_rank=16)

    def forward(self, x):
        x = self.flatten(x)
        x = self.dropout1(self.relu1(self.layer1(x)))
        x = self.dropout2(self.relu2(self.layer2(x)))
        return self.layer3(x)


def prepare_digits_data():
    """The guide's prepare_mnist_data on the digits: subsets and loaders."""
    x, y, xv, yv = digits()
    train_subset = Subset(TensorDataset(x, y), range(0, 500))
    test_subset = Subset(TensorDataset(xv, yv), range(0, 300))
    return (DataLoader(train_subset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)),
            DataLoader(test_subset, batch_size=64, shuffle=False))


def evaluate_digits_model(layer1_terms, layer1_rank, layer2_terms, layer2_rank):
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = SketchedDigitsNet(layer1_terms, layer1_rank, layer2_terms, layer2_rank).to(device)
    train_loader, test_loader = prepare_digits_data()
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(model.parameters(), lr=0.001 * 5)
    model.train()
    for _epoch in range(2):
        for batch_idx, (data, target) in enumerate(train_loader):
            optimizer.zero_grad()
            loss = criterion(model(data), target)
            loss.backward()
            optimizer.step()
            if batch_idx > 3:
                break
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for data, target in test_loader:
            _, predicted = torch.max(model(data).data, 1)
            total += target.size(0)
            correct += (predicted == target).sum().item()
    del model
    return correct / total


def test_complete_digits_autotuning_pipeline():
    tuner = SkAutoTuner(
        parameter_bounds={"layer1_terms": (2, 12), "layer1_rank": (16, 96), "layer2_terms": (2, 8),
                          "layer2_rank": (12, 64)},
        objective_function=evaluate_digits_model, n_initial_points=3, n_iterations=2)
    best_params, best_score = tuner.optimize()
    assert list(best_params) == ["layer1_terms", "layer1_rank", "layer2_terms", "layer2_rank"]
    assert best_score == max(p["score"] for p in tuner.get_evaluation_history())
    assert best_score > 0.3


def train_and_evaluate_model(model: nn.Module) -> float:
    fit(model, epochs=1, max_batches=6)
    return accuracy(model)


def test_multi_objective_optimization():
    def multi_objective_evaluation(num_terms, low_rank):
        device = torch.device("cpu")
        model = sketched_mlp(num_terms, low_rank).to(device)
        acc = train_and_evaluate_model(model)
        model.eval()
        dummy_input = torch.randn(64, 64, device=device)
        with torch.no_grad():
            for _ in range(2):
                model(dummy_input)
        start_time = time.time()
        with torch.no_grad():
            for _ in range(5):
                model(dummy_input)
        inference_time = (time.time() - start_time) / 5
        speed_score = 1.0 / (inference_time + 1e-6)
        normalized_speed = min(speed_score / 1000, 1.0)
        return 0.7 * acc + 0.3 * normalized_speed

    multi_obj_tuner = SkAutoTuner(parameter_bounds={"num_terms": (1, 20), "low_rank": (8, 256)},
                                  objective_function=multi_objective_evaluation, n_initial_points=3, n_iterations=1)
    best_params, best_score = multi_obj_tuner.optimize()
    assert 0 < best_score <= 1.0 and set(best_params) == {"num_terms", "low_rank"}


def estimate_parameter_count(num_terms, low_rank):
    layer_configs = [(64, 64), (64, 10)]
    return sum(2 * num_terms * low_rank * (i + o) for i, o in layer_configs)


def test_memory_constrained_optimization():
    """The guide measures process memory with psutil; `resource` (stdlib) stands in for it here."""

    def memory_constrained_evaluation(num_terms, low_rank, max_memory_gb=4.0):
        estimated_memory = estimate_parameter_count(int(num_terms), int(low_rank)) * 4 / (1024**3)
        if estimated_memory > max_memory_gb:
            return 0.0
        try:
            initial_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            model = sketched_mlp(int(num_terms), int(low_rank))
            acc = train_and_evaluate_model(model)
            memory_used = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - initial_memory) / (1024**3)
            if memory_used > max_memory_gb:
                return 0.0
            memory_efficiency = max_memory_gb / (memory_used + 0.1)
            return acc * min(memory_efficiency, 2.0)
        finally:
            if "model" in locals():
                del model
            gc.collect()

    memory_tuner = SkAutoTuner(parameter_bounds={"num_terms": (1, 8), "low_rank": (8, 64)},
                               objective_function=lambda nt, lr: memory_constrained_evaluation(nt, lr, max_memory_gb=2.0),
                               n_initial_points=3, n_iterations=1)
    best_params, best_score = memory_tuner.optimize()
    assert 0 < best_score <= 2.0
    assert memory_constrained_evaluation(10**6, 10**4, max_memory_gb=2.0) == 0.0  # early rejection


def evaluate_model_function(num_terms, low_rank):
    """A cheap stand-in for the guide's unnamed evaluation: accuracy after a short training."""
    torch.manual_seed(0)
    return train_and_evaluate_model(sketched_mlp(num_terms, low_rank, width=32))


def test_progressive_tuning_strategy():
    broad_tuner = SkAutoTuner(parameter_bounds={"num_terms": (1, 32), "low_rank": (8, 512)},
                              objective_function=lambda nt, lr: evaluate_model_function(min(nt, 4), min(lr, 32)),
                              n_initial_points=3, n_iterations=1)
    broad_best_params, broad_best_score = broad_tuner.optimize()
    margin_terms, margin_rank = 4, 32
    refined_bounds = {
        "num_terms": (max(1, broad_best_params["num_terms"] - margin_terms), broad_best_params["num_terms"] + margin_terms),
        "low_rank": (max(8, broad_best_params["low_rank"] - margin_rank), broad_best_params["low_rank"] + margin_rank),
    }
    refined_tuner = SkAutoTuner(parameter_bounds=refined_bounds,
                                objective_function=lambda nt, lr: evaluate_model_function(min(nt, 4), min(lr, 32)),
                                n_initial_points=2, n_iterations=1)
    refined_best_params, refined_best_score = refined_tuner.optimize()
    for name, (low, high) in refined_bounds.items():
        assert low <= refined_best_params[name] <= high
    assert max(refined_best_score, broad_best_score) > 0.3


class SketchedClassifier(nn.Module):
    """The model of the guide's SketchedLightningModule, without Lightning."""

    def __init__(self, num_terms=8, low_rank=64):
        super().__init__()
        self.model = nn.Sequential(
            pr.nn.SKLinear(64, 64, num_terms=num_terms, low_rank=low_rank), nn.ReLU(), nn.Dropout(0.2),
            pr.nn.SKLinear(64, 10, num_terms=max(1, num_terms // 2), low_rank=max(8, low_rank // 2)))

    def forward(self, x):
        return self.model(x.view(x.size(0), -1))


def test_lightning_integration():
    pl = pytest.importorskip("pytorch_lightning")
    x, y, xv, yv = digits()

    class SketchedLightningModule(pl.LightningModule):
        def __init__(self, num_terms=8, low_rank=64):
            super().__init__()
            self.net = SketchedClassifier(num_terms, low_rank)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            logits = self(batch[0])
            self.log("val_loss", nn.functional.cross_entropy(logits, batch[1]))
            self.log("val_acc", (logits.argmax(1) == batch[1]).float().mean())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    def evaluate_lightning_model(num_terms, low_rank):
        model = SketchedLightningModule(int(num_terms), int(low_rank))
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=5, enable_progress_bar=False,
                             enable_model_summary=False, logger=False, enable_checkpointing=False)
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=64), DataLoader(TensorDataset(xv, yv), 128))
        return trainer.callback_metrics["val_acc"].item()

    tuner = SkAutoTuner(parameter_bounds={"num_terms": (2, 16), "low_rank": (16, 128)},
                        objective_function=evaluate_lightning_model, n_initial_points=2, n_iterations=0)
    assert 0 <= tuner.optimize()[1] <= 1


# --------------------------------------------------------------------------- best practices


def create_model(num_terms, low_rank):
    return SketchedClassifier(num_terms, low_rank)


def train_one_epoch(model):
    fit(model, epochs=1, max_batches=3)


def validate_model(model):
    return accuracy(model)


def test_quick_evaluation_and_early_stopping():
    def quick_evaluation_for_tuning(num_terms, low_rank):
        model = create_model(int(num_terms), int(low_rank))
        fit(model, epochs=3, max_batches=3)  # quick_train(model, max_epochs=3, max_batches_per_epoch=50)
        _, _, xv, yv = digits()
        with torch.no_grad():  # quick_evaluate(model, validation_subset_size=500)
            return (model(xv[:500]).argmax(1) == yv[:500]).float().mean().item()

    def evaluation_with_early_stopping(num_terms, low_rank):
        model = create_model(int(num_terms), int(low_rank))
        best_val_acc, patience, patience_counter = 0, 3, 0
        for _epoch in range(20):
            train_one_epoch(model)
            val_acc = validate_model(model)
            if val_acc > best_val_acc:
                best_val_acc, patience_counter = val_acc, 0
            else:
                patience_counter += 1
            if patience_counter >= patience:
                break
        return best_val_acc

    torch.manual_seed(0)
    assert 0 < quick_evaluation_for_tuning(2, 16) <= 1
    assert evaluation_with_early_stopping(2, 16) > 0.5


def test_cached_evaluation():
    calls = []

    def expensive_evaluation_function(num_terms, low_rank):
        calls.append((num_terms, low_rank))
        return -abs(num_terms - 2) - abs(low_rank - 3)

    @lru_cache(maxsize=128)
    def cached_evaluation(num_terms, low_rank):
        return expensive_evaluation_function(num_terms, low_rank)

    tuner = SkAutoTuner(parameter_bounds={"num_terms": (1, 3), "low_rank": (2, 4)},
                        objective_function=cached_evaluation, n_initial_points=5, n_iterations=15)
    best_params, best_score = tuner.optimize()
    assert len(tuner.get_evaluation_history()) == 20 and len(calls) <= 9  # repeats came from the cache
    assert best_score == 0 and best_params == {"num_terms": 2, "low_rank": 3}


def test_parallel_evaluation():
    from joblib import Parallel, delayed

    def generate_parameter_grid():
        return [{"num_terms": t, "low_rank": r} for t in (1, 2) for r in (8, 16)]

    def parallel_objective_wrapper(params_dict):
        return evaluate_model_function(**params_dict)

    param_combinations = generate_parameter_grid()
    results = Parallel(n_jobs=2, prefer="threads")(delayed(parallel_objective_wrapper)(p) for p in param_combinations)
    best_idx = max(range(len(results)), key=results.__getitem__)
    assert param_combinations[best_idx] in param_combinations and 0 < results[best_idx] <= 1


def test_analyzing_parameter_sensitivity():
    tuner = SkAutoTuner(parameter_bounds={"num_terms": (1, 4), "low_rank": (8, 32)},
                        objective_function=lambda nt, lr: nt * 0.1 + lr * 0.01, n_initial_points=4, n_iterations=4,
                        seed=0)  # 8 unseeded draws can correlate low_rank and score either way
    tuner.optimize()
    evaluations = tuner.get_evaluation_history()
    df = pd.DataFrame(evaluations)
    correlation_matrix = df.corr()
    assert list(df.columns) == ["num_terms", "low_rank", "score"] and len(df) == 8
    assert correlation_matrix.loc["low_rank", "score"] > 0
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, axes = plt.subplots(2, 2)
    axes[0, 0].scatter(df["num_terms"], df["score"])
    plt.close(fig)


# --------------------------------------------------------------------------- the legacy decisions


def test_decision_objective_gets_values_positionally_in_bounds_order_and_ints_stay_ints():
    seen = []

    def objective(a, b, c):
        seen.append((a, b, c))
        return a - c

    tuner = SkAutoTuner(parameter_bounds={"a": (1, 3), "b": (0.5, 2), "c": (4, 4)}, objective_function=objective,
                        n_initial_points=3, n_iterations=3, seed=0)
    best_params, best_score = tuner.optimize()
    assert len(seen) == 6
    assert all(isinstance(a, int) and isinstance(b, float) and c == 4 for a, b, c in seen)  # inclusive bounds
    assert all(1 <= a <= 3 and 0.5 <= b <= 2 for a, b, _ in seen)
    assert best_score == max(a - c for a, _, c in seen)  # maximized
    history = tuner.get_evaluation_history()
    assert [(h["a"], h["b"], h["c"]) for h in history] == seen and all("score" in h for h in history)


def test_decision_random_start_then_tpe():
    tuner = SkAutoTuner(parameter_bounds={"x": (0.0, 1.0)}, objective_function=lambda x: -(x - 0.3) ** 2,
                        n_initial_points=4, n_iterations=6, seed=0)
    tuner.optimize()
    assert len(tuner.study.trials) == 10
    sampler = tuner.study.sampler
    assert type(sampler).__name__ == "TPESampler" and sampler._n_startup_trials == 4


def test_legacy_bad_inputs():
    objective = lambda x: x  # noqa: E731
    for bounds in ({}, {"x": (1,)}, {"x": (3, 1)}):
        with pytest.raises(ValueError):
            SkAutoTuner(parameter_bounds=bounds, objective_function=objective)
    with pytest.raises(TypeError):
        SkAutoTuner(parameter_bounds={"x": ("a", "b")}, objective_function=objective)
    with pytest.raises(TypeError):
        SkAutoTuner(parameter_bounds={"x": (0, 1)}, objective_function=None)
    with pytest.raises(ValueError):
        SkAutoTuner(parameter_bounds={"x": (0, 1)}, objective_function=objective, n_initial_points=0)
    nan = SkAutoTuner(parameter_bounds={"x": (0, 1)}, objective_function=lambda x: math.nan, n_initial_points=2,
                      n_iterations=0)
    with pytest.raises(RuntimeError, match="no evaluation"):
        nan.optimize()
