"""fxsketch.tuner's configs (`SkAutoTuner/Configs.py`): LightningTune's tuple shorthand and Optuna
distributions, configs from YAML and JSON files, and `"auto"` spaces for Conv2d and same-shape groups."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from torch import nn

from fxsketch.nn import SKConv2d, SKLinear
from fxsketch.tuner import (
    Categorical,
    Int,
    LayerConfig,
    OptunaSearch,
    SKAutoTuner,
    TuningConfigs,
)
from conftest import accuracy, trained_mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tuple_shorthand_and_optuna_distributions_work_in_tuner_configs():
    """Issue 9 item 6: shorthand and Optuna distributions are accepted wherever a spec is, SKAutoTuner included."""
    space = {"num_terms": ("categorical", [1, 2]),
             "low_rank": optuna.distributions.IntDistribution(4, 16, step=4)}
    tuner = SKAutoTuner(trained_mlp(), TuningConfigs([LayerConfig(["fc2"], space)]), accuracy,
                        OptunaSearch(n_trials=5, seed=0))
    (config,) = tuner.getConfigs()
    assert config.params == {"num_terms": Categorical([1, 2]), "low_rank": Int(4, 16, step=4)}
    tuner.tune()
    frame = tuner.get_results_dataframe()
    assert set(frame["num_terms"]) <= {1, 2} and set(frame["low_rank"]) <= {4, 8, 12, 16}
    assert tuner.replace_without_tuning().fc2.low_rank == 4
    with_lr = SKAutoTuner(trained_mlp(), TuningConfigs([LayerConfig(["fc2"], {
        "low_rank": ("int", 4, 8), "learning_rate": ("loguniform", 1e-4, 1e-2)})]),
        lambda model, params: accuracy(model), OptunaSearch(n_trials=2, seed=0))
    with_lr.tune()
    assert all(1e-4 <= lr <= 1e-2 for lr in with_lr.get_results_dataframe()["learning_rate"])



@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_tuner_configs_load_from_yaml_and_json_files(tmp_path, suffix):
    """LightningTune's config-driven style: the tuner's configs can be a YAML or JSON spec file."""
    spec = {"layers": [{"layer_names": ["fc1", "fc2"],
                        "params": {"num_terms": [1, 2], "low_rank": {"type": "int", "low": 8, "high": 32,
                                                                      "step": 8}}}]}
    path = tmp_path / f"spec.{suffix}"
    if suffix == "yaml":
        yaml = pytest.importorskip("yaml")
        path.write_text(yaml.safe_dump(spec))
    else:
        path.write_text(json.dumps(spec))
    tuner = SKAutoTuner(trained_mlp(), str(path), accuracy, OptunaSearch(n_trials=2, seed=0))
    (config,) = tuner.getConfigs()
    assert config.layer_names == ("fc1", "fc2") and config.params["low_rank"] == Int(8, 32, step=8)
    assert set(tuner.tune()) == {"fc1", "fc2"}



class Wide(nn.Module):
    """A Conv2d and four Linear layers of two shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 32, 3, padding=1)
        self.a1, self.a2 = nn.Linear(128, 128), nn.Linear(128, 128)
        self.b1, self.b2 = nn.Linear(128, 64), nn.Linear(128, 64)

    def forward(self, x):
        x = torch.relu(self.conv(x)).mean((2, 3))
        x = x.repeat(1, 4)
        x = self.a2(torch.relu(self.a1(x)))
        return self.b1(x) + self.b2(x)



def test_auto_params_cover_conv2d_and_group_same_shape_layers():
    """tuner-api.rst "How auto works": Linear and Conv2d get spaces, layers of one shape share one
    (listed together in getConfigs), the ranges follow the dimensions, the first values are cheaper than dense."""
    tuner = SKAutoTuner(Wide(), TuningConfigs([LayerConfig({"type": ["Linear", "Conv2d"]}, "auto")]), lambda m: 1.0)
    configs = list(tuner.getConfigs())
    by_layers = {c.layer_names: c for c in configs}
    assert set(by_layers) == {("conv",), ("a1", "a2"), ("b1", "b2")}  # smart grouping by shape
    for config in configs:
        assert set(config.params) == {"num_terms", "low_rank"} and config.separate
    assert by_layers[("a1", "a2")].params != by_layers[("b1", "b2")].params  # ranges follow the dimensions
    built = tuner.replace_without_tuning()
    assert isinstance(built.conv, SKConv2d) and isinstance(built.a1, SKLinear)
    for name in ("a1", "b1"):
        dense = dict(Wide().named_modules())[name].weight.numel()
        layer = built.get_submodule(name)
        assert layer.rank * (layer.in_features + layer.out_features) < dense  # cheaper than dense
