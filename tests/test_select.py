"""Tests for the layer-selector language in fxsketch.select."""

from __future__ import annotations

import functools
import random

import pytest

from fxsketch.records import LayerRecord
from fxsketch.select import SelectorIndexError, describe_selector, match_layers


def _rec(
    name: str, module_order: int, graph_order: int, op: str = "Linear", module: str | None = None
) -> LayerRecord:
    shape = (8, 4, 3, 3) if op == "Conv2d" else (8, 4)
    return LayerRecord(
        name, op, module or op, shape, module_order=module_order, graph_order=graph_order
    )


# Module order and graph order deliberately disagree:
#   module order: conv, query, out_proj, encoder.fc1, encoder.fc10,
#                 decoder.fc1, decoder.fc2, head_weight
#   graph order:  conv, encoder.fc10, encoder.fc1, out_proj, query,
#                 decoder.fc2, decoder.fc1, head_weight
RECORDS = [
    _rec("conv", 0, 0, op="Conv2d"),
    _rec("encoder.attention.query", 1, 4),
    _rec("encoder.attention.out_proj", 2, 3, module="NonDynamicallyQuantizableLinear"),
    _rec("encoder.fc1", 3, 2),
    _rec("encoder.fc10", 4, 1),
    _rec("decoder.fc1", 5, 6),
    _rec("decoder.fc2", 6, 5),
    _rec("head_weight", 7, 7, module="function"),
]

FLAT = [_rec("fc1", 0, 0), _rec("fc10", 1, 1), _rec("fc2", 2, 2)]

OTHERS = {"norm": "LayerNorm", "act": "ReLU", "encoder": "Encoder"}


def _error(selector, records=RECORDS, others=None, exc=ValueError) -> str:
    with pytest.raises(exc) as info:
        match_layers(records, selector, other_modules=others)
    return str(info.value)


# ----------------------------------------------------------------------------- str


def test_str_is_a_regex_even_when_it_is_a_name():
    assert match_layers(FLAT, "fc1") == ["fc1", "fc10"]
    assert match_layers(FLAT, "fc1$") == ["fc1"]
    assert match_layers(FLAT, "fc10") == ["fc10"]


def test_str_non_name_is_regex_search():
    assert match_layers(FLAT, "fc") == ["fc1", "fc10", "fc2"]
    assert match_layers(FLAT, "fc1$") == ["fc1"]
    assert match_layers(FLAT, r"fc\d0") == ["fc10"]
    assert match_layers(RECORDS, "encoder.*attention") == [
        "encoder.attention.out_proj",
        "encoder.attention.query",
    ]


def test_str_missing_exact_name_falls_back_to_pattern():
    records = [_rec("fc10", 0, 0), _rec("fc11", 1, 1), _rec("fc2", 2, 2)]
    assert match_layers(records, "fc1") == ["fc10", "fc11"]


def test_str_invalid_regex_is_substring():
    records = [_rec("layer[0].fc", 0, 0), _rec("layer1.fc", 1, 1), _rec("layer0.fc", 2, 2)]
    assert match_layers(records, "layer[") == ["layer[0].fc"]


def test_str_is_searched_not_anchored():
    assert match_layers(RECORDS, "coder") == [
        "encoder.fc10",
        "encoder.fc1",
        "encoder.attention.out_proj",
        "encoder.attention.query",
        "decoder.fc2",
        "decoder.fc1",
    ]


def test_empty_string_rejected():
    assert "empty" in _error("")
    assert "empty" in _error(["fc1", ""], records=FLAT)
    assert "empty" in _error({"pattern": ""})


# ----------------------------------------------------------------------------- list


def test_list_of_exact_names():
    assert match_layers(FLAT, ["fc2", "fc1"]) == ["fc1", "fc2"]
    assert match_layers(FLAT, ("fc1",)) == ["fc1"]


def test_list_entries_are_exact_names_in_graph_order():
    assert match_layers(RECORDS, ["decoder.fc1", "conv", "decoder.fc2"]) == ["conv", "decoder.fc2", "decoder.fc1"]
    assert match_layers(FLAT, ["fc1"]) == ["fc1"]  # never fc10


def test_list_entry_that_is_no_layer_name_is_an_error():
    message = _error(["decoder", "conv"])
    assert "'decoder'" in message and "decoder.fc1" in message


def test_list_deduplicates_overlaps():
    result = match_layers(RECORDS, ["encoder.fc1", "decoder.fc1", "encoder.fc1"])
    assert result == ["encoder.fc1", "decoder.fc1"]


def test_list_empty_rejected():
    assert "empty" in _error([])
    assert "empty" in _error(())


def test_list_non_str_entry_rejected():
    msg = _error(["fc1", 3], records=FLAT, exc=TypeError)
    assert "3" in msg and "int" in msg


def test_list_entry_matching_nothing_reported():
    msg = _error(["fc1", "fc3"], records=FLAT)
    assert "'fc3'" in msg and "['fc1', 'fc3']" in msg


# ----------------------------------------------------------------------------- dict


def test_dict_pattern_str_and_list():
    assert match_layers(RECORDS, {"pattern": r"^decoder\."}) == ["decoder.fc2", "decoder.fc1"]
    both = match_layers(RECORDS, {"pattern": ["query$", "^conv"]})
    assert both == ["conv", "encoder.attention.query"]


def test_dict_pattern_is_regex_without_exact_priority():
    assert match_layers(FLAT, {"pattern": "fc1"}) == ["fc1", "fc10"]


def test_dict_pattern_invalid_regex_rejected():
    msg = _error({"pattern": "layer["})
    assert "invalid regex" in msg and "layer[" in msg


def test_dict_type_matches_op_type():
    assert match_layers(RECORDS, {"type": "Conv2d"}) == ["conv"]
    linear = match_layers(RECORDS, {"type": "Linear"})
    assert "encoder.attention.out_proj" in linear and "head_weight" in linear
    assert "conv" not in linear and len(linear) == 7


def test_dict_type_matches_module_type_subclass():
    assert match_layers(RECORDS, {"type": "NonDynamicallyQuantizableLinear"}) == [
        "encoder.attention.out_proj"
    ]
    assert match_layers(RECORDS, {"type": "function"}) == ["head_weight"]


def test_dict_type_list_is_or_and_exact():
    assert match_layers(RECORDS, {"type": ["function", "Conv2d"]}) == ["conv", "head_weight"]
    _error({"type": "Linea"})
    _error({"type": "linear"})


def test_dict_contains_is_substring_not_regex():
    records = [_rec("a.b", 0, 0), _rec("axb", 1, 1)]
    assert match_layers(records, {"contains": "a.b"}) == ["a.b"]
    assert match_layers(records, {"pattern": "a.b"}) == ["a.b", "axb"]
    both = match_layers(RECORDS, {"contains": ["query", "conv"]})
    assert both == ["conv", "encoder.attention.query"]


def test_dict_criteria_combine_with_and():
    selector = {"pattern": "encoder", "type": "NonDynamicallyQuantizableLinear"}
    assert match_layers(RECORDS, selector) == ["encoder.attention.out_proj"]
    assert match_layers(RECORDS, {"contains": "fc1", "pattern": "^decoder"}) == ["decoder.fc1"]
    assert match_layers(RECORDS, {"contains": "fc", "pattern": "encoder", "type": "Linear"}) == [
        "encoder.fc10",
        "encoder.fc1",
    ]


def test_dict_and_with_empty_intersection_reports_counts():
    msg = _error({"pattern": "decoder", "type": "Conv2d"})
    assert "matched no layer" in msg
    assert "pattern 2" in msg and "type 1" in msg
    assert "closest types" not in msg


# ----------------------------------------------------------------------------- indices


def test_indices_count_in_module_order():
    encoder = {"pattern": "^encoder"}
    # Graph order starts with encoder.fc10, module order with encoder.attention.query.
    assert match_layers(RECORDS, {**encoder, "indices": 0}) == ["encoder.attention.query"]
    assert match_layers(RECORDS, {**encoder, "indices": [2]}) == ["encoder.fc1"]


def test_indices_negative():
    encoder = {"pattern": "^encoder"}
    assert match_layers(RECORDS, {**encoder, "indices": -1}) == ["encoder.fc10"]
    assert match_layers(RECORDS, {**encoder, "indices": [-4]}) == ["encoder.attention.query"]


def test_indices_result_in_graph_order_without_duplicates():
    result = match_layers(RECORDS, {"pattern": "^encoder", "indices": [0, -1, 0, -4]})
    assert result == ["encoder.fc10", "encoder.attention.query"]


def test_indices_module_order_ties_broken_by_graph_order():
    records = [_rec("b", 0, 5), _rec("a", 0, 1), _rec("c", 0, 3)]
    assert match_layers(records, {"indices": 0}) == ["a"]
    assert match_layers(records, {"indices": -1}) == ["b"]


def test_indices_out_of_range():
    for index in (4, -5):
        with pytest.raises(SelectorIndexError) as info:
            match_layers(RECORDS, {"pattern": "^encoder", "indices": [0, index]})
        msg = str(info.value)
        assert f"index {index}" in msg and "4 layer(s)" in msg
        assert isinstance(info.value, IndexError) and isinstance(info.value, ValueError)


def test_indices_alone_apply_to_all_records():
    assert match_layers(RECORDS, {"indices": [0, -1]}) == ["conv", "head_weight"]
    assert match_layers(RECORDS, {"indices": 1}) == ["encoder.attention.query"]


def test_indices_bad_values():
    _error({"indices": []})
    _error({"indices": "0"}, exc=TypeError)
    _error({"indices": True}, exc=TypeError)
    _error({"indices": [0, 1.0]}, exc=TypeError)


# ----------------------------------------------------------------------------- range


def test_range_start_end_in_module_order():
    # module order of encoder: query, out_proj, fc1, fc10
    assert match_layers(RECORDS, {"pattern": "^encoder", "range": [0, 2]}) == [
        "encoder.attention.out_proj",
        "encoder.attention.query",
    ]


def test_range_with_step():
    assert match_layers(RECORDS, {"pattern": "^encoder", "range": [0, 4, 2]}) == [
        "encoder.fc1",
        "encoder.attention.query",
    ]
    assert match_layers(RECORDS, {"pattern": "^encoder", "range": (3, None, -2)}) == [
        "encoder.fc10",
        "encoder.attention.out_proj",
    ]


def test_range_python_slice_semantics():
    last_two = match_layers(RECORDS, {"type": "Linear", "range": [-2, 100]})
    assert last_two == ["decoder.fc2", "head_weight"]
    tail = match_layers(RECORDS, {"range": [5, None]})
    assert tail == ["decoder.fc2", "decoder.fc1", "head_weight"]


def test_range_selecting_nothing():
    msg = _error({"pattern": "^decoder", "range": [5, 9]})
    assert "2 layer(s)" in msg


def test_range_malformed():
    assert "[start, end" in _error({"range": [1]})
    assert "[start, end" in _error({"range": [0, 1, 1, 1]})
    assert "[start, end" in _error({"range": 3})
    assert "step 0" in _error({"range": [0, 3, 0]})
    _error({"range": [0, "3"]}, exc=TypeError)


def test_indices_and_range_together_rejected():
    assert "cannot be used together" in _error({"pattern": "fc", "indices": 0, "range": [0, 1]})


# ----------------------------------------------------------------------------- dict keys


def test_unknown_key_rejected_with_valid_keys():
    msg = _error({"pattern": "fc", "names": ["fc1"], "typ": "Linear"})
    assert "'names'" in msg and "'typ'" in msg
    for key in ("pattern", "type", "contains", "indices", "range"):
        assert key in msg.split("valid keys")[1]


def test_empty_dict_rejected():
    assert "empty" in _error({})


def test_dict_value_types_checked():
    _error({"pattern": 3}, exc=TypeError)
    _error({"type": ["Linear", None]}, exc=TypeError)
    assert "empty list" in _error({"contains": []})


# ----------------------------------------------------------------------------- callable


def test_callable_selector():
    assert match_layers(RECORDS, lambda r: r.op_type == "Conv2d" or r.name.endswith("fc2")) == [
        "conv",
        "decoder.fc2",
    ]


def test_callable_sees_records():
    seen: list[str] = []

    def spy(record: LayerRecord) -> bool:
        seen.append(record.name)
        return record.module_order >= 6

    assert match_layers(RECORDS, spy) == ["decoder.fc2", "head_weight"]
    assert sorted(seen) == sorted(r.name for r in RECORDS)


def test_callable_matching_nothing_named_in_message():
    def wide_layers(record: LayerRecord) -> bool:
        return record.out_features > 1000

    assert "wide_layers" in _error(wide_layers)


# ----------------------------------------------------------------------------- bad forms


@pytest.mark.parametrize("selector", [42, None, b"fc1", {"fc1"}, 1.5])
def test_unsupported_selector_type(selector):
    msg = _error(selector, exc=TypeError)
    assert "callable" in msg and "dict" in msg and type(selector).__name__ in msg


# ----------------------------------------------------------------------------- ordering


def test_result_sorted_by_graph_order_regardless_of_input_order():
    shuffled = RECORDS[:]
    random.Random(0).shuffle(shuffled)
    expected = [r.name for r in sorted(RECORDS, key=lambda r: r.graph_order)]
    assert match_layers(shuffled, ".") == expected
    assert match_layers(shuffled, {"indices": [1, 0]}) == ["conv", "encoder.attention.query"]


def test_duplicate_records_reported_once():
    records = FLAT + [_rec("fc1", 0, 0)]
    assert match_layers(records, ["fc1"]) == ["fc1"]


# ----------------------------------------------------------------------------- no-match messages


def test_no_match_names_closest_layers_and_types():
    msg = _error("encoder.fc3")
    assert "'encoder.fc3'" in msg and "matched no layer" in msg
    closest = msg.split("closest layer names:")[1].splitlines()[0]
    assert "encoder.fc1" in closest
    types = msg.split("available types:")[1].splitlines()[0]
    assert "Linear" in types and "Conv2d" in types


def test_no_match_closest_by_last_component():
    closest = _error("qeury").split("closest layer names:")[1].splitlines()[0]
    assert "encoder.attention.query" in closest


def test_no_match_without_close_names_lists_available():
    records = [_rec(f"blk{i}.proj", i, i) for i in range(15)]
    msg = _error("zzzzzz", records=records)
    assert "closest layer names" not in msg
    listed = msg.split("available layers:")[1].splitlines()[0]
    assert "blk0.proj" in listed and "blk9.proj" in listed and "blk10.proj" not in listed
    assert "and 5 more" in listed


def test_no_match_closest_types():
    msg = _error({"type": "linear"})
    assert "closest types: Linear" in msg


def test_no_match_mentions_unsupported_other_module_by_name():
    msg = _error("norm", others=OTHERS)
    assert "fxsketch rewrites only Linear and Conv2d layers" in msg
    assert "norm (LayerNorm) is not supported" in msg
    assert "ReLU" not in msg


def test_no_match_mentions_unsupported_other_module_by_type():
    msg = _error({"type": "LayerNorm"}, others=OTHERS)
    assert "norm (LayerNorm)" in msg and "only Linear and Conv2d" in msg
    msg = _error(["ReLU"], others=OTHERS)
    assert "act (ReLU)" in msg


def test_no_match_other_module_hint_respects_and():
    msg = _error({"pattern": "^act", "type": "LayerNorm"}, others=OTHERS)
    assert "not supported" not in msg


def test_no_match_without_other_module_hit_has_no_hint():
    msg = _error("dropout", others=OTHERS)
    assert "not supported" not in msg


def test_empty_records_message():
    for selector in ("fc1", {"indices": 0}, ["a"], lambda r: True):
        msg = _error(selector, records=[])
        assert "no Linear or Conv2d layer" in msg


def test_empty_records_still_mentions_other_modules():
    msg = _error("norm", records=[], others={"norm": "LayerNorm"})
    assert "no Linear or Conv2d layer" in msg and "norm (LayerNorm) is not supported" in msg


# ----------------------------------------------------------------------------- describe_selector


def test_describe_selector_forms():
    assert describe_selector("fc1") == "'fc1'"
    assert describe_selector(["fc1", "fc2"]) == "['fc1', 'fc2']"
    rendered = describe_selector({"pattern": "enc", "indices": [0, -1]})
    assert rendered == "{pattern: 'enc', indices: [0, -1]}"


def test_describe_selector_callables():
    def big_layers(record):
        return True

    assert "big_layers" in describe_selector(big_layers)
    assert "<lambda>" in describe_selector(lambda r: True)
    assert "partial" in describe_selector(functools.partial(big_layers))


def test_describe_selector_truncates():
    text = describe_selector(["x" * 50] * 20)
    assert len(text) <= 200 and text.endswith("...")
