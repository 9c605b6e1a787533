"""Result.report: the HTML page, and the PNG fallback without plotly."""

from __future__ import annotations

import sys

import pytest
from conftest import run_search as _run



@pytest.fixture(scope="module")
def result():
    return _run(n_trials=8)


def test_html_report_holds_both_plots_and_the_layer_table(result, tmp_path):
    path = result.report(tmp_path / "report.html")
    text = open(path, encoding="utf-8").read()
    assert path.endswith(".html")
    assert text.count("plotly-graph-div") == 2  # history and accuracy-speed scatter
    assert "Optimization history" in text and "feasible region" in text and "threshold" in text
    assert "chosen per layer" in text
    for name in result.plan:
        assert f"<td>{name}</td>" in text
    assert "<script" in text and 'src="http' not in text  # self-contained: plotly.js inline


def test_png_fallback_without_plotly(result, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "plotly", None)
    path = result.report(tmp_path / "report.html")
    assert path.endswith("report.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "plotly is not installed" in caplog.text


def test_no_plotting_library_is_a_clear_error(result, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "plotly", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="fxsketch\\[plot\\]"):
        result.report(tmp_path / "report.html")


def test_the_report_draws_untimed_trials_at_their_flop_ratio_marks_the_result_and_names_the_objective(tmp_path):
    latency = _run(n_trials=10, objective="latency", accuracy_threshold=0.97)
    untimed = latency.trials[latency.trials["speed_source"] == "not timed (infeasible)"]
    assert len(untimed) and untimed["flops"].between(0, 1).all()  # below the bar: never timed, but costed
    text = open(latency.report(tmp_path / "latency.html"), encoding="utf-8").read()
    assert "below threshold, not timed (at its FLOP ratio)" in text
    assert ("returned model (whole-model timing)" in text) == bool(latency.plan)
    assert "FLOP ratio vs dense" not in text
    flops = _run(n_trials=6)
    text = open(flops.report(tmp_path / "flops.html"), encoding="utf-8").read()
    assert "FLOP ratio vs dense (dense FLOPs over plan FLOPs)" in text
    png = flops.report(tmp_path / "flops.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
