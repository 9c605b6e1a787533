"""Every built tensor lives on the layer's device and in its dtype: the rewrite runs on a model on the
`meta` device (which stands in for CUDA on a CPU machine: any tensor made on the CPU by mistake
meets a meta tensor and fails), on CUDA when present, and keeps a bf16 or float64 model's dtype."""

from __future__ import annotations

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
