"""A saved plan carries its fitted factors: `rewrite`, the compile backend and `fxsketch apply`
rebuild the optimized model bit for bit without calibration data, from plain tensors checked
against the plan's SHA-256 and read weights-only."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import fxsketch
from conftest import CALIB, calib_mlp


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    model = calib_mlp()
    x = CALIB[:8]
    spec = fxsketch.LayerConfig({"type": "Linear", "range": [0, 2]}, params={"low_rank": [2, 4, 8]})
    result = fxsketch.optimize(model, spec, example_inputs=x, accuracy_fn=lambda m: 1.0, n_trials=4,
                               calibration_data=[CALIB], progress=False,
                               calibration=fxsketch.CalibrationOptions(recover_steps=3),
                               search=fxsketch.SearchOptions(objective="flops", seed=0))
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    result.save_plan(path)
    return model, x, result, path


def test_the_plan_file_rebuilds_the_distilled_model_bit_for_bit_without_calibration(optimized):
    model, x, result, path = optimized
    assert result.plan and all(e["method"] == "whitened_svd" for e in result.plan.values())
    reference = json.loads(path.read_text())["fitted_factors"]
    assert sorted(reference["layers"]) == sorted(result.plan)
    rebuilt = fxsketch.rewrite(model, path, x)
    with torch.no_grad():
        assert torch.equal(rebuilt(CALIB), result.graph_module(CALIB))
        assert torch.equal(fxsketch.rewrite(model, result, x)(CALIB), result.graph_module(CALIB))
    with pytest.raises(ValueError, match="calibration"):  # fitting again needs the data
        fxsketch.rewrite(model, path, x, use_fitted=False)


@pytest.mark.parametrize("how", ["path", "result", "options"])
def test_the_compile_backend_runs_a_calibrated_plan(optimized, how):
    model, x, result, path = optimized
    torch._dynamo.reset()
    if how == "options":
        compiled = torch.compile(model, backend="fxsketch", options={"plan": str(path), "inner": "eager"})
    else:
        compiled = torch.compile(model, backend=fxsketch.backend(str(path) if how == "path" else result, "eager"))
    with torch.no_grad():
        torch.testing.assert_close(compiled(CALIB), result.graph_module(CALIB), rtol=1e-6, atol=1e-6)


def test_factors_that_do_not_match_the_plan_are_refused(optimized, tmp_path):
    model, x, result, path = optimized
    copy = tmp_path / "plan.json"
    copy.write_text(path.read_text())
    factors = tmp_path / "plan.factors.pt"
    factors.write_bytes(path.with_name("plan.factors.pt").read_bytes() + b"\0")
    with pytest.raises(ValueError, match="SHA-256"):
        fxsketch.rewrite(model, copy, x)
    factors.unlink()
    with pytest.raises(FileNotFoundError, match="not beside it"):
        fxsketch.rewrite(model, copy, x)


def test_a_factors_file_holding_code_is_refused_even_with_a_matching_hash(optimized, tmp_path):
    model, x, result, path = optimized

    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    factors = tmp_path / "plan.factors.pt"
    torch.save({"0\nB": Payload()}, factors)
    data = json.loads(path.read_text())
    data["fitted_factors"]["sha256"] = hashlib.sha256(factors.read_bytes()).hexdigest()
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="plain tensors"):
        fxsketch.rewrite(model, tmp_path / "plan.json", x)
