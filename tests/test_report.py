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
