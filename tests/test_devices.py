"""Every built tensor lives on the layer's device and in its dtype: the rewrite runs on a model on the
`meta` device (which stands in for CUDA on a CPU machine: any tensor made on the CPU by mistake
meets a meta tensor and fails), on CUDA when present, and keeps a bf16 or float64 model's dtype."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import fxsketch

PLANS = {
    "svd": ({"0": {"method": "svd", "low_rank": 4}, "5": {"method": "svd", "low_rank": 4}}, {}),
    "sketch": ({"0": {"method": "sketch", "num_terms": 1, "low_rank": 2},
                "3": {"method": "sketch", "num_terms": 1, "low_rank": 4}}, {}),
    "whitened+sketch, calibrated": ({"0": {"method": "whitened_svd", "low_rank": 4},
                                     "3": {"method": "sketch", "num_terms": 1, "low_rank": 4},
                                     "5": {"method": "svd", "low_rank": 4}}, {"calibrate": True}),
    "sequential": ({"0": {"method": "whitened_svd", "low_rank": 4}, "3": {"method": "svd", "low_rank": 8}},
                   {"calibrate": True, "sequential": True}),
    "fresh factors": ({"3": {"method": "svd", "low_rank": 4}, "5": {"method": "sketch", "num_terms": 1,
                                                                     "low_rank": 2}}, {"copy_weights": False}),
}
DEVICES = ["meta", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                   reason="needs a CUDA GPU"))]


def _model(device: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 32),
                          nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.randn(160, 3, 4, 4)  # more calibration rows than any layer has inputs: a well-posed fit
    return model.to(device, dtype), x.to(device, dtype)


def _rewrite(model, x, plan, options):
    options = dict(options)
    if options.pop("calibrate", False):
        options["calibration_data"] = [x, x + 1]
    return fxsketch.rewrite(model, plan, x, **options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(PLANS))
def test_the_rewrite_builds_every_tensor_on_the_models_device(device, case):
    model, x = _model(device)
    plan, options = PLANS[case]
    gm = _rewrite(model, x, plan, options)
    tensors = dict(gm.named_parameters()) | dict(gm.named_buffers())
    assert {name: t.device.type for name, t in tensors.items() if t.device.type != device} == {}
    out = gm(x)
    assert out.device.type == device and out.shape == (160, 10)
    assert all(p.device.type == device for p in model.parameters())  # the user's model stays where it was


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", sorted(PLANS))
def test_the_rewrite_keeps_the_models_dtype_and_matches_its_float64_reference(dtype, case):
    model, x = _model("cpu", dtype)
    plan, options = PLANS[case]
    gm = _rewrite(model, x, plan, options)
    tensors = dict(gm.named_parameters()) | dict(gm.named_buffers())
    assert {name: t.dtype for name, t in tensors.items() if t.dtype != dtype} == {}
    out = gm(x)
    assert out.dtype == dtype
    if options.get("copy_weights", True):  # the same plan built in float64 is the reference
        reference = _rewrite(model.to(torch.float64), x.to(torch.float64), plan, options)(x.to(torch.float64))
        tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-9
        scale = reference.abs().max()
        assert (out.to(torch.float64) - reference).abs().max() <= tolerance * scale


@pytest.mark.parametrize("device", DEVICES)
def test_calibration_statistics_live_on_the_models_device(device):
    model, x = _model(device)
    stats = fxsketch.calibrate(fxsketch.capture(model, x), [x, x + 1])
    wide = torch.float64 if device == "cpu" else torch.float32  # float64 only where it is cheap
    assert {name: (s.gram.device.type, s.gram.dtype) for name, s in stats.items()} == {
        name: (device, wide) for name in ("0", "3", "5")}


@pytest.mark.parametrize("device", DEVICES)
def test_distillation_trains_the_factors_where_they_are(device):
    model, x = _model(device)
    student = _rewrite(model, x, *PLANS["whitened+sketch, calibrated"])
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    fxsketch.distill(student, model, [x], steps=2)
    assert all(p.device.type == device for p in student.parameters())
    if device != "meta":  # meta tensors hold no values to compare
        assert any(not torch.equal(before[name], p) for name, p in student.named_parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_the_compile_backend_rewrites_a_model_on_its_device(device):
    model, x = _model(device)
    plan, _ = PLANS["svd"]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=fxsketch.backend(plan, inner="eager"))
    out = compiled(x)
    assert out.device.type == device and out.shape == (160, 10)
    if device != "meta":
        reference = fxsketch.rewrite(model, plan, x)(x)
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_factorizations_in_float32_statistics_match_the_float64_ones(monkeypatch):
    """On a GPU the statistics and factorizations run in float32 (`statistics_dtype`): the same
    calibrated plans built that way on the CPU agree with the float64 build."""
    model, x = _model("cpu")
    batches = [x, x + 1]
    plan = {"0": {"method": "whitened_svd", "low_rank": 4}, "3": {"method": "sketch", "num_terms": 1,
                                                                    "low_rank": 4},
            "5": {"method": "svd", "low_rank": 4}}
    reference = fxsketch.rewrite(model, plan, x, calibration_data=batches)(x)
    # `fxsketch.calibrate` names the function; the module is reached through importlib
    monkeypatch.setattr(importlib.import_module("fxsketch.calibrate"), "statistics_dtype", lambda device, dtype: torch.float32)
    stats = fxsketch.calibrate(fxsketch.capture(model, x), batches)
    assert {s.gram.dtype for s in stats.values()} == {torch.float32}
    out = fxsketch.rewrite(model, plan, x, calibration_data=batches)(x)
    assert float((out - reference).norm() / reference.norm()) < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_allocate_optimize_save_and_load_on_cuda(tmp_path):
    model, x = _model("cuda")
    batches = [x, x + 1]
    spec = fxsketch.LayerConfig(["3", "5"], params="auto")
    plan = fxsketch.allocate(model, spec, batches, budget=0.6, example_inputs=x)
    assert plan and all(name in ("3", "5") for name in plan)
    result = fxsketch.optimize(model, spec, example_inputs=x,
                               accuracy_fn=lambda m: 1.0 - float((m(x) - model(x)).norm() / model(x).norm()),
                               accuracy_threshold=0.5, n_trials=4, calibration_data=batches)
    assert all(p.device.type == "cuda" for p in result.model.parameters())
    path = fxsketch.save(result.model, tmp_path / "model.pt2", x)
    loaded = fxsketch.load(path)
    torch.testing.assert_close(loaded(x), result.model(x), rtol=1e-4, atol=1e-4)
