"""Tests for the tuning-spec language in fxsketch.spec."""

from __future__ import annotations

import copy
import json
import math
import pickle
import sys
import warnings

import optuna
import pytest

from fxsketch.spec import (
    Categorical,
    Float,
    Int,
    LayerConfig,
    ParamSpec,
    TuningConfigs,
    as_param_spec,
    load_spec,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _layer(name: str = "encoder.*", **params) -> LayerConfig:
    return LayerConfig(name, params or {"low_rank": Int(8, 32, step=8)})


@pytest.fixture
def configs() -> TuningConfigs:
    return TuningConfigs([_layer("a"), _layer("b", num_terms=[1, 2]), _layer("c", rate=Float(0.1, 0.5))])


# --------------------------------------------------------------------------- Categorical


def test_categorical_stores_tuple_and_values():
    spec = Categorical([8, 16, 32])
    assert spec.choices == (8, 16, 32)
    assert spec.values() == [8, 16, 32]
    assert spec.first() == 8
    assert spec.to_dict() == {"type": "categorical", "choices": [8, 16, 32]}


def test_categorical_accepts_every_optuna_choice_type():
    assert Categorical([None, True, 1, 1.5, "x"]).choices == (None, True, 1, 1.5, "x")


def test_categorical_rejects_empty():
    with pytest.raises(ValueError, match="at least one choice"):
        Categorical([])


@pytest.mark.parametrize("bad", [[1, [2, 3]], [{"a": 1}], [object()], [(1, 2)]])
def test_categorical_rejects_non_scalar_choices(bad):
    with pytest.raises(ValueError, match=r"Categorical choice .* is not allowed"):
        Categorical(bad)


def test_categorical_rejects_string_as_choices():
    with pytest.raises(TypeError, match="list or tuple"):
        Categorical("abc")


def test_categorical_contains_keeps_bools_apart_from_ints():
    spec = Categorical([1, "a", None])
    assert spec.contains(1) and spec.contains("a") and spec.contains(None)
    assert not spec.contains(True)
    assert not spec.contains(2)
    assert not Categorical([True]).contains(1)


def test_categorical_is_frozen():
    with pytest.raises(AttributeError):
        Categorical([1]).choices = (2,)  # type: ignore[misc]


# --------------------------------------------------------------------------- Int


def test_int_values_and_dict():
    spec = Int(8, 64, step=8)
    assert spec.values() == [8, 16, 24, 32, 40, 48, 56, 64]
    assert spec.first() == 8
    assert spec.to_dict() == {"type": "int", "low": 8, "high": 64, "step": 8, "log": False}


def test_int_values_stop_at_last_grid_point_below_high():
    assert Int(0, 10, step=4).values() == [0, 4, 8]


def test_int_single_value_range():
    assert Int(5, 5).values() == [5]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"low": 8, "high": 4}, r"Int low \(8\) > high \(4\)"),
        ({"low": 1, "high": 4, "step": 0}, r"Int step must be >= 1, got 0"),
        ({"low": 1, "high": 4, "step": -2}, r"Int step must be >= 1"),
        ({"low": 0, "high": 4, "log": True}, r"log=True needs low > 0, got low=0"),
        ({"low": -3, "high": 4, "log": True}, r"log=True needs low > 0"),
        ({"low": 1, "high": 64, "step": 2, "log": True}, r"log=True needs step=1"),
    ],
)
def test_int_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Int(**kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"low": 1.5, "high": 4}, {"low": 1, "high": "4"}, {"low": True, "high": 4}]
)
def test_int_rejects_non_int_bounds(kwargs):
    with pytest.raises(TypeError, match="must be an integer"):
        Int(**kwargs)


def test_int_rejects_non_bool_log():
    with pytest.raises(TypeError, match="log must be True or False"):
        Int(1, 4, log=1)  # type: ignore[arg-type]


def test_int_contains():
    spec = Int(8, 64, step=8)
    assert spec.contains(8) and spec.contains(64) and spec.contains(32)
    assert not spec.contains(12)
    assert not spec.contains(72)
    assert not spec.contains(0)
    assert not spec.contains(16.0)
    assert not Int(0, 1).contains(True)


# --------------------------------------------------------------------------- Float


def test_float_continuous_values_is_none():
    spec = Float(0.0, 1.0)
    assert spec.values() is None
    assert spec.first() == 0.0
    assert spec.to_dict() == {"type": "float", "low": 0.0, "high": 1.0, "step": None, "log": False}


def test_float_stepped_values_are_exact_grid():
    assert Float(0.0, 0.5, step=0.1).values() == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert Float(1, 2, step=0.25).values() == [1.0, 1.25, 1.5, 1.75, 2.0]


def test_float_bounds_are_converted_to_float():
    spec = Float(1, 4)
    assert isinstance(spec.low, float) and spec.high == 4.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"low": 1.0, "high": 0.5}, r"Float low \(1.0\) > high \(0.5\)"),
        ({"low": 0.0, "high": 1.0, "step": 0.0}, r"Float step must be > 0"),
        ({"low": 0.0, "high": 1.0, "step": -0.1}, r"Float step must be > 0"),
        ({"low": 0.0, "high": 1.0, "log": True}, r"log=True needs low > 0"),
        ({"low": 0.1, "high": 1.0, "step": 0.1, "log": True}, r"log=True cannot have a step"),
        ({"low": 0.0, "high": math.inf}, r"must be finite"),
        ({"low": math.nan, "high": 1.0}, r"must be finite"),
    ],
)
def test_float_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Float(**kwargs)


def test_float_rejects_string_bound_with_yaml_hint():
    with pytest.raises(TypeError, match=r"must be a number.*1\.0e-3"):
        Float("1e-3", 1.0)  # type: ignore[arg-type]


def test_float_contains():
    spec = Float(0.0, 1.0, step=0.1)
    assert spec.contains(0.3) and spec.contains(0.1 * 3) and spec.contains(1)
    assert not spec.contains(0.35)
    assert not spec.contains(1.1)
    assert not spec.contains("0.3")
    assert Float(1e-4, 1e-1, log=True).contains(3.3e-3)
    assert not Float(1e-4, 1e-1, log=True).contains(0.5)


# --------------------------------------------------------------------------- suggest


def test_suggest_with_fixed_trial_returns_the_fixed_values():
    trial = optuna.trial.FixedTrial({"rank": 24, "mode": "b", "rate": 0.25})
    assert Int(8, 64, step=8).suggest(trial, "rank") == 24
    assert Categorical(["a", "b"]).suggest(trial, "mode") == "b"
    assert Float(0.0, 1.0).suggest(trial, "rate") == 0.25


def test_suggest_passes_step_and_log_to_optuna():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    int_spec, log_spec = Int(8, 64, step=8), Float(1e-4, 1e-1, log=True)
    step_spec, cat_spec = Float(0.0, 1.0, step=0.25), Categorical([1, "two", None])
    for _ in range(20):
        trial = study.ask()
        values = {
            "rank": int_spec.suggest(trial, "rank"),
            "lr": log_spec.suggest(trial, "lr"),
            "frac": step_spec.suggest(trial, "frac"),
            "kind": cat_spec.suggest(trial, "kind"),
        }
        assert values["rank"] % 8 == 0 and 8 <= values["rank"] <= 64
        assert 1e-4 <= values["lr"] <= 1e-1
        assert values["frac"] in step_spec.values()
        assert cat_spec.contains(values["kind"])
        study.tell(trial, 0.0)
    distributions = study.trials[0].distributions
    assert distributions["rank"] == optuna.distributions.IntDistribution(8, 64, step=8)
    assert distributions["lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    assert distributions["frac"] == optuna.distributions.FloatDistribution(0.0, 1.0, step=0.25)


# --------------------------------------------------------------------------- as_param_spec


def test_as_param_spec_returns_spec_as_is():
    spec = Int(1, 4)
    assert as_param_spec(spec) is spec


@pytest.mark.parametrize("legacy", [[8, 16, 32], (8, 16, 32)])
def test_as_param_spec_legacy_list_is_categorical(legacy):
    spec = as_param_spec(legacy)
    assert isinstance(spec, Categorical)
    assert spec == Categorical([8, 16, 32])


@pytest.mark.parametrize("value", [4, 0.5, "qr", True])
def test_as_param_spec_scalar_is_single_choice(value):
    assert as_param_spec(value) == Categorical([value])


@pytest.mark.parametrize(
    "spec",
    [
        Categorical(["a", None]),
        Int(1, 9, step=2),
        Int(2, 256, log=True),
        Float(0.0, 1.0, step=0.1),
        Float(1e-3, 1.0, log=True),
    ],
)
def test_as_param_spec_round_trips_to_dict(spec):
    data = spec.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert as_param_spec(data) == spec


def test_as_param_spec_dict_defaults():
    assert as_param_spec({"type": "int", "low": 1, "high": 3}) == Int(1, 3, step=1, log=False)
    assert as_param_spec({"type": "float", "low": 0, "high": 1}) == Float(0.0, 1.0)


def test_as_param_spec_unknown_type():
    with pytest.raises(ValueError, match=r"unknown param type 'normal'.*\['categorical', 'float', 'int'\]"):
        as_param_spec({"type": "normal", "low": 0, "high": 1})


def test_as_param_spec_missing_type():
    with pytest.raises(ValueError, match="lacks 'type'"):
        as_param_spec({"low": 0, "high": 1})


def test_as_param_spec_bad_keys_list_valid_ones():
    message = r"unknown keys \['choices'\].*valid keys are \['type', 'low', 'high', 'step', 'log'\]"
    with pytest.raises(ValueError, match=message):
        as_param_spec({"type": "int", "low": 0, "high": 1, "choices": [1]})


def test_as_param_spec_missing_required_keys():
    with pytest.raises(ValueError, match=r"needs keys \['high'\]"):
        as_param_spec({"type": "float", "low": 0.0})


@pytest.mark.parametrize("value", [None, object(), {1, 2}, b"x"])
def test_as_param_spec_rejects_other_types(value):
    with pytest.raises(TypeError, match="cannot use .* as a param spec: give a ParamSpec"):
        as_param_spec(value)


def test_param_spec_is_abstract():
    with pytest.raises(TypeError):
        ParamSpec()  # type: ignore[abstract]


# --------------------------------------------------------------------------- LayerConfig


def test_layer_config_normalizes_params_and_selector():
    names = ["a", "b"]
    config = LayerConfig(names, {"low_rank": [8, 16], "num_terms": Int(1, 3), "fixed": 2})
    assert config.layer_names == ("a", "b")
    assert config.params == {
        "low_rank": Categorical([8, 16]),
        "num_terms": Int(1, 3),
        "fixed": Categorical([2]),
    }
    assert config.separate is True and config.copy_weights is True
    names.append("c")
    assert config.layer_names == ("a", "b")


def test_layer_config_copies_dict_selector():
    selector = {"type": "Linear", "indices": [0, 1]}
    config = LayerConfig(selector, "auto")
    selector["indices"].append(2)
    assert config.layer_names == {"type": "Linear", "indices": [0, 1]}
    assert config.params == "auto"


def test_layer_config_accepts_callable_selector_and_empty_params():
    def selector(name: str) -> bool:
        return name.startswith("fc")

    config = LayerConfig(selector, {})
    assert config.layer_names is selector
    assert config.params == {}


@pytest.mark.parametrize("selector", [3, None, ["a", 1], {"a", "b"}])
def test_layer_config_rejects_bad_selector_types(selector):
    with pytest.raises(TypeError, match="layer_names"):
        LayerConfig(selector, "auto")


def test_layer_config_error_names_the_parameter():
    with pytest.raises(ValueError, match=r"params\['low_rank'\]: Int low \(8\) > high \(4\)"):
        LayerConfig("a", {"low_rank": {"type": "int", "low": 8, "high": 4}})
    with pytest.raises(ValueError, match=r"params\['num_terms'\]: Categorical needs at least one choice"):
        LayerConfig("a", {"num_terms": []})
    with pytest.raises(TypeError, match=r"params\['x'\]: cannot use None"):
        LayerConfig("a", {"x": None})


def test_layer_config_rejects_other_params_strings_and_types():
    with pytest.raises(ValueError, match="must be 'auto'"):
        LayerConfig("a", "automatic")
    with pytest.raises(TypeError, match="params must be 'auto' or a mapping"):
        LayerConfig("a", [1, 2])
    with pytest.raises(TypeError, match="separate must be True or False"):
        LayerConfig("a", "auto", separate="yes")  # type: ignore[arg-type]


def test_layer_config_round_trip():
    config = LayerConfig(
        ["enc.0", "enc.1"],
        {"low_rank": Int(8, 64, step=8), "mode": ["a", "b"], "rate": Float(0.1, 0.9)},
        separate=False,
    )
    data = config.to_dict()
    assert data == {
        "layer_names": ["enc.0", "enc.1"],
        "params": {
            "low_rank": {"type": "int", "low": 8, "high": 64, "step": 8, "log": False},
            "mode": {"type": "categorical", "choices": ["a", "b"]},
            "rate": {"type": "float", "low": 0.1, "high": 0.9, "step": None, "log": False},
        },
        "separate": False,
        "copy_weights": True,
    }
    assert LayerConfig.from_dict(json.loads(json.dumps(data))) == config
    auto = LayerConfig({"type": "Conv2d"}, "auto", copy_weights=False)
    assert LayerConfig.from_dict(auto.to_dict()) == auto


def test_layer_config_to_dict_rejects_callable_selector():
    with pytest.raises(ValueError, match="cannot serialize a callable"):
        LayerConfig(lambda name: True, "auto").to_dict()


def test_layer_config_from_dict_errors():
    with pytest.raises(ValueError, match=r"unknown layer config keys \['name'\].*valid keys are"):
        LayerConfig.from_dict({"layer_names": "a", "params": "auto", "name": "x"})
    with pytest.raises(ValueError, match="needs 'layer_names'"):
        LayerConfig.from_dict({"params": "auto"})
    with pytest.raises(ValueError, match="needs 'params'.*'auto'"):
        LayerConfig.from_dict({"layer_names": "a"})
    with pytest.raises(TypeError, match="must be a dict"):
        LayerConfig.from_dict(["a"])  # type: ignore[arg-type]


def test_layer_config_from_dict_defaults_flags():
    config = LayerConfig.from_dict({"layer_names": "a", "params": {"r": [1]}})
    assert config.separate is True and config.copy_weights is True


# --------------------------------------------------------------------------- TuningConfigs


def test_tuning_configs_basics(configs):
    assert len(configs) == 3
    assert [c.layer_names for c in configs] == ["a", "b", "c"]
    assert configs[0].layer_names == "a"
    assert configs[-1].layer_names == "c"
    assert isinstance(configs.configs, tuple)
    part = configs[1:]
    assert isinstance(part, TuningConfigs) and [c.layer_names for c in part] == ["b", "c"]


def test_tuning_configs_accepts_dicts():
    tc = TuningConfigs([{"layer_names": "a", "params": {"r": [1, 2]}}, _layer("b")])
    assert tc[0] == LayerConfig("a", {"r": Categorical([1, 2])})


def test_tuning_configs_rejects_bad_elements():
    with pytest.raises(TypeError, match=r"configs\[1\]: expected a LayerConfig or a dict, got str"):
        TuningConfigs([_layer("a"), "b"])
    with pytest.raises(TypeError, match="wrap a single config in a list"):
        TuningConfigs(_layer("a"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"configs\[0\]: unknown layer config keys"):
        TuningConfigs([{"layer_names": "a", "params": "auto", "bogus": 1}])


@pytest.mark.parametrize("index", [3, -4, 10])
def test_tuning_configs_bad_index(configs, index):
    with pytest.raises(IndexError, match=f"index {index} is out of range for TuningConfigs with 3 config"):
        configs[index]
    with pytest.raises(IndexError, match="out of range"):
        configs.remove(index)
    with pytest.raises(IndexError, match="out of range"):
        configs.replace(index, _layer("z"))


def test_tuning_configs_non_int_index(configs):
    with pytest.raises(TypeError, match="index must be an int"):
        configs["a"]  # type: ignore[index]
    with pytest.raises(TypeError, match="index must be an int"):
        configs.remove(True)


def test_tuning_configs_is_immutable(configs):
    with pytest.raises(AttributeError, match="immutable"):
        configs._configs = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        hash(configs)


def test_tuning_configs_edits_return_new_objects(configs):
    before = configs.to_dict()
    added = configs.add(_layer("d"))
    added_dict = configs.add({"layer_names": "e", "params": "auto"})
    removed = configs.remove(1)
    replaced = configs.replace(-1, _layer("z"))
    assert [c.layer_names for c in added] == ["a", "b", "c", "d"]
    assert added_dict[3] == LayerConfig("e", "auto")
    assert [c.layer_names for c in removed] == ["a", "c"]
    assert [c.layer_names for c in replaced] == ["a", "b", "z"]
    assert configs.to_dict() == before and len(configs) == 3


def test_tuning_configs_clone_is_deep(configs):
    tc = TuningConfigs([LayerConfig({"indices": [0, 1]}, "auto")])
    clone = tc.clone()
    assert clone == tc and clone is not tc
    assert clone[0] is not tc[0]
    clone[0].layer_names["indices"].append(5)
    assert tc[0].layer_names == {"indices": [0, 1]}


def test_tuning_configs_merge_filter_map(configs):
    other = TuningConfigs([_layer("x")])
    merged = configs.merge(other)
    assert [c.layer_names for c in merged] == ["a", "b", "c", "x"]
    assert [c.layer_names for c in configs.merge([_layer("y")])] == ["a", "b", "c", "y"]
    kept = configs.filter(lambda c: "low_rank" in c.params)
    assert [c.layer_names for c in kept] == ["a"]
    mapped = configs.map(lambda c: LayerConfig(c.layer_names, c.params, separate=False))
    assert all(c.separate is False for c in mapped)
    assert all(c.separate is True for c in configs) and len(other) == 1


def test_tuning_configs_map_requires_layer_config(configs):
    with pytest.raises(TypeError, match="must return a LayerConfig, got dict"):
        configs.map(lambda c: c.to_dict())


def test_tuning_configs_eq_and_repr(configs):
    assert configs == TuningConfigs(list(configs))
    assert configs != configs.remove(0)
    assert configs != "not a config"
    assert repr(TuningConfigs([LayerConfig("a", "auto")])) == (
        "TuningConfigs([LayerConfig(layer_names='a', params='auto', separate=True, copy_weights=True)])"
    )


def test_tuning_configs_round_trip_and_copy(configs):
    data = configs.to_dict()
    assert list(data) == ["layers"] and len(data["layers"]) == 3
    assert TuningConfigs.from_dict(json.loads(json.dumps(data))) == configs
    assert copy.deepcopy(configs) == configs
    assert pickle.loads(pickle.dumps(configs)) == configs


def test_tuning_configs_from_dict_names_failing_layer():
    bad = {"layer_names": "b", "params": {"r": {"type": "int", "low": 4, "high": 2}}}
    data = {"layers": [{"layer_names": "a", "params": "auto"}, bad]}
    with pytest.raises(ValueError, match=r"layers\[1\]: params\['r'\]: Int low \(4\) > high \(2\)"):
        TuningConfigs.from_dict(data)


# --------------------------------------------------------------------------- load_spec

_SPEC_DICT = {
    "layers": [
        {
            "layer_names": {"type": "Linear"},
            "params": {"low_rank": {"type": "int", "low": 8, "high": 32, "step": 8}, "num_terms": [1, 2]},
        },
        {"layer_names": ["conv1", "conv2"], "params": "auto", "separate": False},
    ]
}
_YAML_TEXT = """\
layers:
  - layer_names: {type: Linear}
    params:
      low_rank: {type: int, low: 8, high: 32, step: 8}
      num_terms: [1, 2]
  - layer_names: [conv1, conv2]
    params: auto
    separate: false
"""


def test_load_spec_in_memory_forms(configs):
    assert load_spec(configs) is configs
    single = _layer("a")
    assert load_spec(single) == TuningConfigs([single])
    mixed = load_spec([single, {"layer_names": "b", "params": "auto"}])
    assert mixed == TuningConfigs([single, LayerConfig("b", "auto")])
    assert load_spec((single,)) == TuningConfigs([single])
    loaded = load_spec(_SPEC_DICT)
    assert loaded[0].params["low_rank"] == Int(8, 32, step=8)
    assert loaded[0].params["num_terms"] == Categorical([1, 2])
    assert loaded[1].layer_names == ("conv1", "conv2") and loaded[1].separate is False


def test_load_spec_files(tmp_path):
    expected = load_spec(_SPEC_DICT)
    json_path = tmp_path / "spec.json"
    json_path.write_text(json.dumps(_SPEC_DICT))
    assert load_spec(json_path) == expected
    assert load_spec(str(json_path)) == expected
    for name in ("spec.yaml", "spec.YML"):
        (tmp_path / name).write_text(_YAML_TEXT)
        assert load_spec(tmp_path / name) == expected


def test_load_spec_round_trips_through_a_file(tmp_path, configs):
    path = tmp_path / "round.json"
    path.write_text(json.dumps(configs.to_dict()))
    assert load_spec(path) == configs


def test_load_spec_bad_dict_shapes():
    message = r"missing the 'layers' key \(found keys \['layer_names', 'params'\]\): expected \{'layers'"
    with pytest.raises(ValueError, match=message):
        load_spec({"layer_names": "a", "params": "auto"})
    with pytest.raises(ValueError, match=r"unexpected top-level keys \['version'\]"):
        load_spec({"layers": [], "version": 1})
    with pytest.raises(ValueError, match="'layers' must be a list"):
        load_spec({"layers": {"layer_names": "a"}})


@pytest.mark.parametrize("spec", [[], (), {"layers": []}, TuningConfigs([])])
def test_load_spec_rejects_empty(spec):
    with pytest.raises(ValueError, match="no layer configs"):
        load_spec(spec)


def test_load_spec_rejects_other_types():
    with pytest.raises(TypeError, match="cannot load a spec from int"):
        load_spec(3)


def test_load_spec_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_spec(path)


def test_load_spec_unsupported_suffix(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text("layers = []")
    with pytest.raises(ValueError, match=r"unsupported spec file type '\.toml'"):
        load_spec(path)


def test_load_spec_malformed_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"layers": [\n  {"layer_names": "a",,}\n]}')
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON at line 2, column \d+"):
        load_spec(path)


def test_load_spec_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("layers:\n  - layer_names: [a, b\n    params: auto\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: invalid YAML at line \d+, column \d+"):
        load_spec(path)


def test_load_spec_empty_file(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ValueError, match="empty.yaml: the file is empty"):
        load_spec(path)


def test_load_spec_file_content_errors_name_the_file(tmp_path):
    path = tmp_path / "spec.json"
    layer = {"layer_names": "a", "params": {"r": {"type": "int", "low": 9, "high": 1}}}
    path.write_text(json.dumps({"layers": [layer]}))
    message = r"spec\.json: layers\[0\]: params\['r'\]: Int low \(9\) > high \(1\)"
    with pytest.raises(ValueError, match=message):
        load_spec(path)
    path.write_text(json.dumps([{"layer_names": "a", "params": "auto"}]))
    with pytest.raises(TypeError, match=r"spec\.json: a spec must be a dict"):
        load_spec(path)


def test_load_spec_yaml_without_pyyaml(tmp_path, monkeypatch):
    path = tmp_path / "spec.yaml"
    path.write_text(_YAML_TEXT)
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(ImportError, match=r"pip install 'fxsketch\[yaml\]'"):
        load_spec(path)


def test_suggest_emits_no_warnings_for_grid_aligned_specs():
    trial = optuna.create_study().ask()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Int(8, 64, step=8).suggest(trial, "r")
        Float(0.0, 1.0, step=0.1).suggest(trial, "f")


@pytest.mark.parametrize("value,expected", [
    (("int", 8, 64), Int(8, 64)),
    (["int_log", 1, 1024], Int(1, 1024, log=True)),
    (("uniform", 0.0, 0.5), Float(0.0, 0.5)),
    (("loguniform", 1e-5, 1e-2), Float(1e-5, 1e-2, log=True)),
    (("discrete_uniform", 0.1, 1.0, 0.1), Float(0.1, 1.0, step=0.1)),
    (("categorical", ["relu", "gelu"]), Categorical(["relu", "gelu"])),
    (("int", "float"), Categorical(["int", "float"])),  # not shorthand: plain choices
])
def test_lightningtune_tuple_shorthand(value, expected):
    assert as_param_spec(value) == expected


def test_shorthand_with_wrong_arity_is_a_clear_error():
    with pytest.raises(ValueError, match="wrong number of values"):
        as_param_spec(("discrete_uniform", 0.1, 1.0))


def test_optuna_distributions_are_accepted():
    import optuna

    assert as_param_spec(optuna.distributions.IntDistribution(8, 64, step=8)) == Int(8, 64, step=8)
    assert as_param_spec(optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)) == Float(1e-4, 1e-1, log=True)
    assert as_param_spec(optuna.distributions.CategoricalDistribution(["a", "b"])) == Categorical(["a", "b"])


def test_a_spec_file_nested_thousands_of_levels_deep_is_a_clear_error(tmp_path):
    (tmp_path / "deep.json").write_text('{"layers": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(ValueError, match=r"deep.json: nested too deeply to be a spec"):
        load_spec(tmp_path / "deep.json")
