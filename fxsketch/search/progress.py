"""What a running search shows: a progress bar on a terminal (`progress=`) and, with `verbose=True`,
one short line per trial. Both name units as a reader would ("layer fc1", "whole model") and
summarize a whole-model trial instead of listing its parameters."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fxsketch import study_format as keys

__all__ = ["describe_unit", "describe_values", "print_trial", "search_progress"]

SHOWN_PARAMS = 6  # a unit with more values than this is summarized, not listed


def describe_unit(unit: Any) -> str:
    """'layer fc1', 'layers a+b' (a group) or 'whole model'."""
    if unit == keys.WHOLE_MODEL:
        return "whole model"
    unit = str(unit)
    return f"layers {unit}" if "+" in unit else f"layer {unit}"


def describe_values(attrs: dict[str, Any]) -> str:
    """A trial's values in a line: a layer's own parameters, or a summary of a whole-model plan
    ("whole-model plan, 36 layers, FLOPs 0.50×")."""
    values = attrs.get(keys.ENTRY, {})
    if attrs.get(keys.UNIT) == keys.WHOLE_MODEL or len(values) > SHOWN_PARAMS:
        plan = attrs.get(keys.PLAN, values)
        flops = attrs.get(keys.FLOPS)
        ratio = f", FLOPs {flops:.2f}×" if flops is not None else ""
        return f"whole-model plan, {len(plan)} layers{ratio}"
    return ", ".join(f"{k}={v}" for k, v in values.items())


def print_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """An Optuna callback printing one line per finished trial (`verbose=True`)."""
    attrs = trial.user_attrs
    head = f"trial {trial.number:3d} {describe_unit(attrs.get(keys.UNIT))} [{describe_values(attrs)}]"
    if trial.state == optuna.trial.TrialState.COMPLETE:
        score = f" score={attrs[keys.SCORE]:.4f}" if keys.SCORE in attrs else ""
        source = attrs.get(keys.SPEED_SOURCE)
        print(f"{head} accuracy={attrs[keys.ACCURACY]:.4f} speed={attrs[keys.SPEED]:.3f}"
              f"{f' ({source})' if source else ''}{score}")
    else:
        print(f"{head} {trial.state.name.lower()}: {attrs.get(keys.NOTE, '')}")


@contextmanager
def search_progress(total: int, threshold: float | None, enabled: bool) -> Iterator[Any]:
    """A progress bar over `total` counted trials, showing the unit in progress and the best result
    so far; yields the Optuna callback that advances it (None when disabled)."""
    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[best]}"))
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("searching", total=total, best="")
        best: list[tuple[float, float]] = []  # (speed, accuracy) of the best trial that keeps the bar

        def update(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            attrs = trial.user_attrs
            accuracy, speed = attrs.get(keys.ACCURACY), attrs.get(keys.SPEED)
            if accuracy is not None and (threshold is None or accuracy >= threshold):
                if not best or speed > best[0][0]:
                    best[:] = [(speed, accuracy)]
            shown = f"best {best[0][0]:.2f}× at accuracy {best[0][1]:.4f}" if best else ""
            bar.update(task, advance=int(keys.REUSED not in attrs),
                       description=describe_unit(attrs.get(keys.UNIT)), best=shown)

        yield update
