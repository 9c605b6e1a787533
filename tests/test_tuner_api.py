"""fxsketch.tuner's public surface: names, import paths, config types, selectors, ModelVisualizer."""

from __future__ import annotations

import inspect
import pathlib
import re
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsketch
import fxsketch as pr
import fxsketch.tuner as tuner_pkg
from fxsketch.tuner import (
    Categorical, Float, Int, LayerConfig, ModelVisualizer, OptunaSearch, SearchAlgorithm, SKAutoTuner, TuningConfigs,
)
from conftest import SimpleModel

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEEDS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "seeds"
SEED_DOCS = ("tuner-api.rst", "tuner-api-v2.rst", "skautotuner-readme.md", "autotuner-guide-legacy.rst")
ALWAYS_1 = lambda model: 1.0  # noqa: E731


# --------------------------------------------------------------------------- names and imports


def test_exports_exactly_the_seed_names():
    assert sorted(tuner_pkg.__all__) == sorted([
        "SKAutoTuner", "LayerConfig", "TuningConfigs", "Categorical", "Int", "Float", "SearchAlgorithm",
        "OptunaSearch", "ModelVisualizer"])
    # the spec types are fxsketch's own, not copies
    assert (Categorical, Int, Float, LayerConfig, TuningConfigs) == (
        fxsketch.Categorical, fxsketch.Int, fxsketch.Float, fxsketch.LayerConfig, fxsketch.TuningConfigs)


def test_documented_import_lines():
    from fxsketch.tuner import (  # noqa: F401
        SKAutoTuner, LayerConfig, TuningConfigs, Categorical, Int, Float, SearchAlgorithm, OptunaSearch,
        ModelVisualizer)
    from fxsketch.tuner.SkAutoTuner import SKAutoTuner as S, TuningConfigs as T, LayerConfig as L
    from fxsketch.tuner.SkAutoTuner.Configs import (  # noqa: F401
        Categorical as C, Float as F_, Int as I, LayerNameResolver, ParamsResolver)
    from fxsketch.tuner.SkAutoTuner.Searching import OptunaSearch as O, SearchAlgorithm as SA

    assert (S, T, L, C, I, O, SA) == (SKAutoTuner, TuningConfigs, LayerConfig, Categorical, Int, OptunaSearch,
                                     SearchAlgorithm)
    assert callable(LayerNameResolver) and callable(ParamsResolver)


def _seed_imports() -> list[str]:
    lines = []
    for name in SEED_DOCS:
        text = (SEEDS / name).read_text()
        lines += re.findall(r"from panther[\w.]* import \(.*?\n\s*\)", text, re.S)
        lines += re.findall(r"^\s*(from panther[\w.]* import [^(\n]+|import panther(?: as \w+)?)\s*$", text, re.M)
    return [line.strip().replace("panther", "fxsketch") for line in lines]


@pytest.mark.skipif(not SEEDS.is_dir(), reason="the seed documents (../shared/seeds) are not beside the repo")
def test_every_import_line_of_the_seed_documents_works_after_the_import_change():
    lines = _seed_imports()
    assert len(lines) >= 15
    for line in lines:
        exec(compile(line, "<seed import>", "exec"), {})


def test_SkAutoTuner_is_a_package_and_callable():
    from fxsketch.tuner import SkAutoTuner
    from fxsketch.tuner.legacy import LegacyAutoTuner

    assert isinstance(SkAutoTuner, types.ModuleType)
    assert SkAutoTuner.SKAutoTuner is SkAutoTuner.autotuner.SKAutoTuner is tuner_pkg.SKAutoTuner
    assert SkAutoTuner.Configs.LayerNameResolver and SkAutoTuner.Searching.OptunaSearch is OptunaSearch
    legacy = SkAutoTuner(parameter_bounds={"x": (0, 3)}, objective_function=lambda x: -abs(x - 2),
                         n_initial_points=2, n_iterations=2)
    assert isinstance(legacy, LegacyAutoTuner)
    assert legacy.optimize()[0]["x"] in range(4)


def test_pr_nn_sklinear_import_path():
    import fxsketch as pr

    layer = pr.nn.SKLinear(64, 32, num_terms=2, low_rank=8)
    assert layer(torch.randn(5, 64)).shape == (5, 32)
    assert "num_terms=2" in repr(layer) and "low_rank=8" in repr(layer)


# --------------------------------------------------------------------------- config types (docs)


def test_layer_and_tuning_configs_doc_examples():
    config = LayerConfig(layer_names=["fc1", "fc2"],
                         params={"num_terms": Categorical([1, 2, 3]), "low_rank": Int(16, 128, step=16)},
                         separate=True, copy_weights=True)
    configs = TuningConfigs([
        LayerConfig(layer_names=["encoder.*"], params={"num_terms": Categorical([1, 2, 3])}),
        LayerConfig(layer_names=["decoder.*"], params={"num_terms": Categorical([2, 4, 8])}),
    ])
    assert len(configs) == 2 and isinstance(configs[0], LayerConfig) and "encoder" in str(configs[0])
    assert [c.params["num_terms"].choices for c in configs] == [(1, 2, 3), (2, 4, 8)]
    assert len(configs.add(config)) == 3 and len(configs) == 2
    assert len(configs.remove(0)) == 1 and configs.replace(1, config)[1] is config
    assert configs.clone() == configs and len(configs.merge(TuningConfigs([config]))) == 3
    assert len(configs.filter(lambda c: 8 in c.params["num_terms"].choices)) == 1
    assert all(not c.separate for c in configs.map(
        lambda c: LayerConfig(c.layer_names, c.params, separate=False)))
    legacy = {"num_terms": [1, 2, 3], "low_rank": [8, 16, 32, 64]}
    modern = {"num_terms": Categorical([1, 2, 3]), "low_rank": Categorical([8, 16, 32, 64])}
    assert LayerConfig(["fc1"], legacy).params == LayerConfig(["fc1"], modern).params


def test_param_spec_doc_examples_and_documented_errors():
    for spec in (Categorical([1, 2, 3, 4]), Categorical(["relu", "gelu", "silu"]), Categorical([True, False]),
                 Int(1, 100), Int(8, 512, step=8), Int(1, 1000, log=True), Float(0.0, 1.0),
                 Float(1e-5, 1e-1, log=True), Float(0.1, 1.0, step=0.1)):
        assert spec.first() is not None
    bad = [lambda: Categorical([]), lambda: Int(5, 1), lambda: Int(1, 5, step=0), lambda: Int(0, 5, log=True),
           lambda: Float(1.0, 0.0), lambda: Float(0.0, 1.0, step=0.0), lambda: Float(0.0, 1.0, log=True)]
    for make in bad:
        with pytest.raises(ValueError):
            make()


# --------------------------------------------------------------------------- selectors


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(torch.relu(self.attention(x)))


class EncoderDecoder(nn.Module):
    """encoder.layer0..5 and decoder.layer0..1 (attention + fc each), and an unsupported ConvTranspose2d."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Module()
        for i in range(6):
            self.encoder.add_module(f"layer{i}", Block())
        self.decoder = nn.Module()
        for i in range(2):
            self.decoder.add_module(f"layer{i}", Block())
        self.up = nn.ConvTranspose2d(1, 1, 2)
        self.head = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        for i in range(6):
            x = getattr(self.encoder, f"layer{i}")(x)
        for i in range(2):
            x = getattr(self.decoder, f"layer{i}")(x)
        return self.head(self.up(x.view(-1, 1, 4, 4)))


def _selected(selector, model=None) -> list[str]:
    tuner = SKAutoTuner(model or EncoderDecoder(), TuningConfigs([LayerConfig(selector, {"low_rank": [2]})]),
                        ALWAYS_1)
    return [name for c in tuner.getConfigs() for name in c.layer_names]


def test_documented_selectors_resolve():
    enc = [f"encoder.layer{i}.{p}" for i in range(6) for p in ("attention", "fc")]
    assert _selected("encoder") == enc
    assert _selected("encoder.*attention") == [f"encoder.layer{i}.attention" for i in range(6)]
    assert _selected(["encoder.layer0.fc", "decoder.layer1.fc"]) == ["encoder.layer0.fc", "decoder.layer1.fc"]
    assert _selected({"pattern": "encoder\\.layer[0-1]\\..*"}) == enc[:4]
    assert len(_selected({"type": "Linear"})) == 16
    assert _selected({"contains": "attention"})[-1] == "decoder.layer1.attention"
    assert _selected({"pattern": "encoder.*", "indices": [0, 2, 4]}) == [enc[0], enc[2], enc[4]]
    assert _selected({"type": "Linear", "range": [0, 6]}) == enc[:6]
    assert _selected({"type": "Linear", "range": [0, 12, 2]}) == enc[0:12:2]
    assert _selected({"pattern": "encoder.*", "type": "Linear", "indices": [0, 1, 2]}) == enc[:3]
    with pytest.raises(ValueError, match="cannot be used together"):
        _selected({"type": "Linear", "indices": [0], "range": [0, 2]})
    with pytest.raises(ValueError, match="matched no layer"):
        _selected("nonexistent")


class Numbered(nn.Module):
    """fc10 is defined before fc1 but called after it; `w` is a bare parameter used functionally."""

    def __init__(self) -> None:
        super().__init__()
        self.fc10 = nn.Linear(8, 8)
        self.fc1 = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return F.linear(self.fc10(self.fc1(x)), self.w)


def test_decision_list_entries_are_exact_names_and_strings_are_regexes():
    assert _selected(["fc1"], Numbered()) == ["fc1"]
    assert _selected("fc1", Numbered()) == ["fc1", "fc10"]  # a string is a regex searched in the name
    with pytest.raises(ValueError, match="exact names"):
        _selected(["fc"], Numbered())


def test_decision_indices_count_in_named_modules_order_then_functional_calls():
    assert _selected({"type": "Linear", "indices": [0]}, Numbered()) == ["fc10"]
    assert _selected({"type": "Linear", "indices": [1]}, Numbered()) == ["fc1"]
    assert _selected({"type": "Linear", "indices": [2]}, Numbered()) == ["w"]


def test_decision_unsupported_selected_types_stay_dense_with_one_warning():
    model = EncoderDecoder()
    with pytest.warns(UserWarning) as record:
        tuner = SKAutoTuner(model, TuningConfigs([
            LayerConfig({"type": ["Conv2d", "ConvTranspose2d"]}, {"num_terms": [1], "low_rank": [1]})]), ALWAYS_1)
    messages = [str(w.message) for w in record if "stay dense" in str(w.message)]
    assert len(messages) == 1 and "up (ConvTranspose2d)" in messages[0] and "Linear, Conv2d" in messages[0]
    assert [c.layer_names for c in tuner.getConfigs()] == [("head",)]
    out = tuner.replace_without_tuning()
    assert isinstance(out.get_submodule("up"), nn.ConvTranspose2d)
    assert isinstance(out.get_submodule("head"), fxsketch.SKConv2d)


def test_resolver_and_params_resolver():
    from fxsketch.tuner.SkAutoTuner.Configs import LayerNameResolver, ParamsResolver

    resolver = LayerNameResolver(SimpleModel())
    assert resolver.layer_names == ["fc1", "fc2", "fc3"]
    assert resolver.layer_type("fc2") == "Linear" and isinstance(resolver.get_layer("fc2"), nn.Linear)
    assert resolver.resolve({"type": "Linear", "indices": -1}) == ["fc3"]
    resolved = ParamsResolver(resolver).resolve(TuningConfigs([LayerConfig({"type": "Linear"}, "auto")]))
    assert all(set(c.params) == {"num_terms", "low_rank"} for c in resolved)
    # fc3 (128 -> 10) is a classifier head too narrow for any efficient rank to keep it: "auto" skips it
    assert [n for c in resolved for n in c.layer_names] == ["fc1", "fc2"]


# --------------------------------------------------------------------------- ModelVisualizer


class TransformerLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2)
        self.fc = nn.Linear(8, 8)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer0 = TransformerLayer()
        self.layer1 = TransformerLayer()


class MyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()


def test_model_visualizer_prints_the_documented_tree(capsys):
    ModelVisualizer.print_module_tree(MyModel())
    assert capsys.readouterr().out.splitlines() == [
        "model (MyModel)/",
        "└─ encoder (Encoder)/",
        "    ├─ layer0 (TransformerLayer)/",
        "    │   ├─ attention (MultiheadAttention)/",
        "    │   │   └─ out_proj (NonDynamicallyQuantizableLinear)",
        "    │   └─ fc (Linear)",
        "    └─ layer1 (TransformerLayer)/",
        "        ├─ attention (MultiheadAttention)/",
        "        │   └─ out_proj (NonDynamicallyQuantizableLinear)",
        "        └─ fc (Linear)",
    ]
    ModelVisualizer.print_module_tree(nn.Linear(2, 2), root_name="head")
    assert capsys.readouterr().out == "head (Linear)\n"


def test_printed_names_work_as_selectors():
    model = EncoderDecoder()
    names = [line.split("─ ")[1].split(" (")[0] for line in ModelVisualizer.module_tree(model).splitlines()[1:]]
    assert "fc" in names
    config = LayerConfig(layer_names=["encoder.layer0.fc", "encoder.layer1.fc"],
                         params={"num_terms": [1], "low_rank": [4]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tuner = SKAutoTuner(model, TuningConfigs([config]), ALWAYS_1)
    assert tuner.getConfigs()[0].layer_names == ("encoder.layer0.fc", "encoder.layer1.fc")
    assert isinstance(SearchAlgorithm, type)


# --------------------------------------------------------------------------- documented signatures, the migration page


def _defaults(obj) -> dict:
    return {n: p.default for n, p in inspect.signature(obj).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_documented_signatures_and_defaults():
    """tuner-api.rst's signatures: parameter order and every documented default."""
    params = list(inspect.signature(SKAutoTuner).parameters)
    assert params[:8] == ["model", "configs", "accuracy_eval_func", "search_algorithm", "verbose",
                          "accuracy_threshold", "optimization_eval_func", "num_runs_per_param"]
    assert _defaults(SKAutoTuner).items() >= {"search_algorithm": None, "verbose": False,
                                              "accuracy_threshold": None, "optimization_eval_func": None,
                                              "num_runs_per_param": 1}.items()
    assert list(inspect.signature(OptunaSearch).parameters)[:7] == [
        "n_trials", "sampler", "direction", "study_name", "storage", "load_if_exists", "seed"]
    assert _defaults(OptunaSearch).items() >= {"n_trials": 100, "sampler": None, "direction": "maximize",
                                               "study_name": None, "storage": None, "load_if_exists": False,
                                               "seed": None}.items()
    assert OptunaSearch().n_trials == 100
    assert list(inspect.signature(LayerConfig).parameters)[:4] == ["layer_names", "params", "separate",
                                                                  "copy_weights"]
    assert _defaults(LayerConfig).items() >= {"separate": True, "copy_weights": True}.items()
    assert _defaults(Int).items() >= {"step": 1, "log": False}.items()
    assert _defaults(Float).items() >= {"step": None, "log": False}.items()
    assert _defaults(ModelVisualizer.print_module_tree) == {"root_name": "model"}
    assert list(inspect.signature(pr.nn.SKLinear).parameters)[:5] == [
        "in_features", "out_features", "num_terms", "low_rank", "bias"]
    assert list(inspect.signature(pr.nn.SKConv2d).parameters)[:7] == [
        "in_channels", "out_channels", "kernel_size", "num_terms", "low_rank", "stride", "padding"]


def test_migration_page_lists_each_public_name_and_the_import_change():
    page = (ROOT / "docs" / "migrating-from-panther.md").read_text()
    assert "from fxsketch.tuner import" in page and "import fxsketch as pr" in page
    for name in ("SKAutoTuner", "LayerConfig", "TuningConfigs", "Categorical", "Int", "Float", "SearchAlgorithm",
                 "OptunaSearch", "ModelVisualizer", "LayerNameResolver", "ParamsResolver", "SkAutoTuner",
                 "SKLinear", "SKConv2d", "optmization_eval_func", "get_evaluation_history", "trusted=True",
                 "copy_weights=False", "LightningAccuracy"):
        assert name in page, name
