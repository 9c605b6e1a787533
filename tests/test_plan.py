"""Plans: their files and entries, checked before any capture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsketch
from fxsketch.plan import MAX_DEPTH, Entry


def test_a_plan_nested_thousands_of_levels_deep_is_a_clear_error(tmp_path):
    (tmp_path / "deep.json").write_text('{"0": {"method": "svd", "low_rank": ' + "[" * 100000 + "]" * 100000 + "}}")
    with pytest.raises(ValueError, match=r"nested too deeply to be a plan"):
        fxsketch.load_plan(tmp_path / "deep.json")
    nested: dict = {}
    cursor = nested
    for _ in range(100000):
        cursor["x"] = cursor = {}
    with pytest.raises(ValueError, match=rf"parameter 'low_rank' is nested more than {MAX_DEPTH} levels deep"):
        fxsketch.rewrite(nn.Sequential(nn.Linear(4, 4)), {"0": {"method": "svd", "low_rank": nested}},
                         torch.randn(2, 4))


def test_an_entry_fills_in_its_kinds_defaults_and_names_unknown_parameters():
    entry = Entry.of({"method": "sketch", "low_rank": 4}, "fc")
    assert entry.as_dict() == {"method": "sketch", "num_terms": 1, "low_rank": 4}
    with pytest.raises(ValueError, match=r"plan entry 'fc': \['rank'\] are not parameters of method 'svd'"):
        Entry.of({"method": "svd", "rank": 4}, "fc")
