"""The optimization report: trial history, accuracy–speed scatter with the feasible region, and
the per-layer table, as one self-contained HTML page (plotly) or a PNG (matplotlib)."""

from __future__ import annotations

import html
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from fxsketch.study_format import UNTIMED

if TYPE_CHECKING:
    from fxsketch.result import Result

__all__ = ["write_report"]

log = logging.getLogger(__name__)


def write_report(result: "Result", path: str | Path) -> Path:
    """Write the report to `path` (.html, or .png) and return the path written.

    HTML needs the `plot` extra (plotly); without it the report falls back to a PNG beside `path`
    (matplotlib), and says so.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        try:
            import plotly  # noqa: F401
        except ImportError:
            path = path.with_suffix(".png")
            log.warning("plotly is not installed (pip install 'fxsketch[plot]'): writing %s instead", path)
        else:
            path.write_text(_html(result), encoding="utf-8")
            return path
    _png(result, path)
    return path


def _speed_axis(result: "Result") -> str:
    """The trials' speed axis title, naming the objective the figures are (a FLOP ratio under
    `objective="flops"`, per-layer latency estimates, the user's speed_fn)."""
    sources = result.trials.get("speed_source", pd.Series(dtype=str))
    sources = sources[sources.astype(bool) & (sources != UNTIMED)]
    source = sources.mode()[0] if len(sources) else ""
    if source == "FLOP ratio":
        return "FLOP ratio vs dense (dense FLOPs over plan FLOPs)"
    return f"trial speed vs dense ({source})" if source else "trial speed vs dense"


def _points(result: "Result") -> pd.DataFrame:
    """Completed trials with where to draw them: `x` is the speed, or for a trial below the
    threshold that was never timed, its FLOP ratio (`untimed`)."""
    frame = result.trials
    done = frame[frame["state"] == "COMPLETE"].copy()
    threshold = result.accuracy_threshold
    done["feasible"] = True if threshold is None else done["accuracy"] >= threshold
    chosen = set()
    for layer, group in done[done["feasible"]].groupby("layer"):
        chosen.add(group.sort_values(["score", "accuracy"]).index[-1])
    done["chosen"] = done.index.isin(chosen)
    flops = done["flops"] if "flops" in done else pd.Series(math.nan, index=done.index)
    done["untimed"] = done["speed"].isna() & flops.notna() & (flops > 0)
    done["x"] = done["speed"].where(~done["untimed"], 1 / flops.where(flops > 0))
    return done


def _final(result: "Result") -> tuple[float, float] | None:
    """(speedup, accuracy) of the returned model, measured on the whole model; None without one."""
    if not result.plan or result.accuracy is None or not math.isfinite(result.speedup):
        return None
    return result.speedup, result.accuracy


GROUPS = (("feasible", "#2a9d8f", "circle"), ("below threshold", "#e76f51", "circle"),
          ("below threshold, not timed (at its FLOP ratio)", "#e76f51", "x"))


def _groups(points: pd.DataFrame) -> list[tuple[str, str, str, pd.DataFrame]]:
    masks = (points["feasible"], ~points["feasible"] & ~points["untimed"], ~points["feasible"] & points["untimed"])
    return [(name, color, symbol, points[mask]) for (name, color, symbol), mask in zip(GROUPS, masks)]


def _html(result: "Result") -> str:
    import plotly.graph_objects as go

    points = _points(result)
    history = go.Figure()
    for name, color, symbol, part in _groups(points):
        history.add_scatter(x=part["number"], y=part["x"], mode="markers", name=name, marker_color=color,
                            marker_symbol=symbol, text=part["layer"],
                            hovertemplate="trial %{x}<br>%{text}<br>%{y:.3f}")
    best = points[points["feasible"]].sort_values("number")
    history.add_scatter(x=best["number"], y=best["speed"].cummax(), mode="lines", name="best so far",
                        line_shape="hv", line_color="#264653")
    history.update_layout(title="Optimization history", xaxis_title="trial", yaxis_title=_speed_axis(result))
    scatter = go.Figure()
    for name, color, symbol, part in _groups(points[~points["chosen"]]):
        scatter.add_scatter(x=part["x"], y=part["accuracy"], mode="markers", name=name, marker_color=color,
                            marker_symbol=symbol, text=part["layer"],
                            hovertemplate="%{text}<br>%{x:.3f}<br>accuracy %{y:.4f}")
    chosen = points[points["chosen"]]
    scatter.add_scatter(x=chosen["speed"], y=chosen["accuracy"], mode="markers", name="chosen per layer",
                        marker=dict(symbol="star", size=14, color="#f4a261", line=dict(width=1, color="black")),
                        text=chosen["layer"], hovertemplate="%{text}<br>speed %{x:.3f}<br>accuracy %{y:.4f}")
    if result.pareto:
        front = sorted(result.pareto, key=lambda p: p.speed)
        scatter.add_scatter(x=[p.speed for p in front], y=[p.accuracy for p in front], mode="lines+markers",
                            name="Pareto front", line=dict(color="#264653", dash="dot"))
    final = _final(result)
    if final is not None:
        scatter.add_scatter(x=[final[0]], y=[final[1]], mode="markers", name="returned model (whole-model timing)",
                            marker=dict(symbol="diamond", size=16, color="#264653", line=dict(width=1, color="white")),
                            hovertemplate="returned model<br>speedup %{x:.3f}<br>accuracy %{y:.4f}")
    if result.accuracy_threshold is not None:
        # the two labels sit at opposite ends of the threshold line, so they never overlap
        scatter.add_hrect(y0=result.accuracy_threshold, y1=max(1.0, points["accuracy"].max()), fillcolor="#2a9d8f",
                          opacity=0.08, line_width=0, annotation_text="feasible region",
                          annotation_position="top right")
        scatter.add_hline(y=result.accuracy_threshold, line_dash="dash", annotation_text="threshold",
                          annotation_position="bottom left")
    scatter.update_layout(title="Accuracy and speed of every trial", xaxis_title=_speed_axis(result),
                          yaxis_title="accuracy")
    summary = html.escape(result.summary().split("\n\n")[0])  # the figures and notes, before the tables
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fxsketch report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>",
        "<h1>fxsketch report</h1>", f"<pre>{summary}</pre>",
        history.to_html(full_html=False, include_plotlyjs="inline"),
        scatter.to_html(full_html=False, include_plotlyjs=False),
        "<h2>Layers</h2>", result.layer_table().to_html(index=False),
        *(["<h2>Sensitivity</h2><p>Relative output error of each layer's factorization by rank (share of its "
           "full rank), and the smallest rank under each error.</p>", result.sensitivity.to_html(index=False)]
          if not result.sensitivity.empty else []),
        "</body></html>",
    ]
    return "\n".join(parts)


def _png(result: "Result", path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the report needs plotly (HTML) or matplotlib (PNG): pip install 'fxsketch[plot]'") from exc
    points = _points(result)
    table = result.layer_table()
    fig = plt.figure(figsize=(13, 8 + 0.3 * len(table)))
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 1 + 0.3 * len(table)])
    ax_h, ax_s, ax_t = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    for label, color, symbol, part in _groups(points):
        marker = "x" if symbol == "x" else "o"
        ax_h.scatter(part["number"], part["x"], c=color, label=label, s=18, marker=marker)
        ax_s.scatter(part["x"], part["accuracy"], c=color, label=label, s=18, marker=marker)
    best = points[points["feasible"]].sort_values("number")
    ax_h.step(best["number"], best["speed"].cummax(), where="post", color="#264653", label="best so far")
    chosen = points[points["chosen"]]
    ax_s.scatter(chosen["speed"], chosen["accuracy"], marker="*", s=180, c="#f4a261", edgecolors="black",
                 label="chosen per layer")
    if result.pareto:
        front = sorted(result.pareto, key=lambda p: p.speed)
        ax_s.plot([p.speed for p in front], [p.accuracy for p in front], ":o", c="#264653", label="Pareto front")
    final = _final(result)
    if final is not None:
        ax_s.scatter([final[0]], [final[1]], marker="D", s=90, c="#264653", edgecolors="white",
                     label="returned model (whole-model timing)")
    if result.accuracy_threshold is not None and not math.isnan(result.accuracy_threshold):
        ax_s.axhspan(result.accuracy_threshold, max(1.0, points["accuracy"].max()), color="#2a9d8f", alpha=0.08)
        ax_s.axhline(result.accuracy_threshold, ls="--", c="gray", label="threshold")
    ax_h.set(title="Optimization history", xlabel="trial", ylabel=_speed_axis(result))
    ax_s.set(title="Accuracy and speed of every trial", xlabel=_speed_axis(result), ylabel="accuracy")
    ax_h.legend(fontsize=8)
    ax_s.legend(fontsize=8)
    ax_t.axis("off")
    ax_t.table(cellText=table.astype(str).values, colLabels=list(table.columns), loc="upper center")
    ax_t.set_title("\n".join(result.summary().splitlines()[:4]), fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
