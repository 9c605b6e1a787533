"""A model captured at batch size 1 serves every batch size (torch.export would otherwise fix the
batch to 1 for good), or, when it cannot take another batch, the capture says so."""

from __future__ import annotations

import logging

import torch
from torch import nn

import fxsketch


class Branchy(nn.Module):
    """Shape-dependent control flow: symbolic_trace cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 8:
            x = self.fc(x)
        return self.out(torch.relu(x))


class OnlyOne(Branchy):
    """Takes exactly one row (a reshape to the feature width)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).reshape(4)


def test_a_model_exported_at_batch_one_runs_every_batch_after_capture_and_rewrite():
    torch.manual_seed(0)
    model = Branchy().eval()
    gm = fxsketch.capture(model, torch.randn(1, 8))
    assert gm.meta["fxsketch_tracer"] == "export"
    plan = {"fc": {"method": "svd", "low_rank": 8}}
    rewritten = fxsketch.rewrite(model, plan, torch.randn(1, 8))
    for batch in (1, 3, 17):
        x = torch.randn(batch, 8)
        assert torch.allclose(gm(x), model(x), atol=1e-6)
        assert torch.allclose(rewritten(x), model(x), atol=1e-5)  # rank 8 of 8: exact up to rounding


def test_a_model_that_only_takes_batch_one_is_captured_at_batch_one_with_a_warning(caplog):
    model = OnlyOne().eval()
    x = torch.randn(1, 8)
    with caplog.at_level(logging.WARNING, logger="fxsketch.capture"):
        gm = fxsketch.capture(model, x)
    assert torch.allclose(gm(x), model(x))
    assert "only runs at batch 1" in caplog.text and "batch of 2 or more" in caplog.text
