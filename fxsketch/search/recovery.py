"""Distilling only the plan returned (`CalibrationOptions(recover_at="finish")`).

Distilling every candidate costs `recover_steps` training steps a trial. Instead the search
measures once which share of a plan's accuracy loss distillation wins back (`recovery_rate`, one
probe plan distilled), judges the trials as fitted against the bar lowered to match
(`working_threshold`), and distills only the plan it would return (`finish_recovered`): that plan
is checked against the real bar, and when it falls short more accurate plans are tried, the last
one a plan that meets the bar as fitted.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import optuna
from torch import nn

from fxsketch import study_format as keys
from fxsketch.metrics import TrialFailed, call_metric
from fxsketch.result import Result
from fxsketch.search.context import TrialContext
from fxsketch.search.evaluate import plan_key
from fxsketch.search.finish import finish, time_result
from fxsketch.search.warm import probe_plan

__all__ = ["recovery_rate", "won_back", "working_threshold", "finish_recovered", "SAFETY", "SAFETY_MEASURED", "PROBE_SHARE",
           "RETRIES"]

log = logging.getLogger(__name__)

SAFETY = 0.7  # of the recovery measured on the probe the working bar counts on
SAFETY_MEASURED = 0.9  # ... of the recovery measured on a plan found at the working bar
MAX_RATE = 0.9  # the most of its loss a plan is expected to win back, whatever was measured
PROBE_SHARE = 0.5  # of the allocatable FLOPs: the probe plan's allocation
RETRIES = 2  # distilled plans tried before the last resort (the best plan meeting the bar as fitted)


def recovery_rate(ctx: TrialContext, study: optuna.Study, dense_accuracy: float) -> float:
    """The share of its accuracy loss (against the dense model) that a plan wins back when
    distilled, measured on `probe_plan` at `PROBE_SHARE` of the FLOPs (two calls of `accuracy_fn`
    and one distillation), between 0 and `MAX_RATE`; 0 when there is nothing to probe. Kept in the
    study, so a resumed search does not measure it again."""
    plan = probe_plan(ctx, list(ctx.units.values()), PROBE_SHARE)
    if not plan:
        log.info("no low-rank plan to measure distillation on: the trials are judged against the bar itself")
        return 0.0
    recovery = ctx.job.calibration
    basis = {"plan": plan_key(plan), "steps": recovery.recover_steps, "lr": recovery.recover_lr,
             "schedule": recovery.recover_schedule}
    held = study.user_attrs.get(keys.RECOVERY)
    if isinstance(held, dict) and held.get("basis") == basis:
        return float(held["rate"])
    try:
        fitted = call_metric(ctx.accuracy_fn, ctx.build(plan, recover=False), "accuracy_fn")
        distilled = call_metric(ctx.accuracy_fn, ctx.build(plan, recover=True), "accuracy_fn")
    except TrialFailed as exc:
        raise RuntimeError(f"measuring what distillation wins back (on the allocation at {PROBE_SHARE:.0%} "
                           f"of the FLOPs) failed: {exc}") from exc
    rate = won_back(dense_accuracy, fitted, distilled)
    study.set_user_attr(keys.RECOVERY, {"basis": basis, "rate": rate, "fitted": fitted, "distilled": distilled})
    message = (f"distillation ({recovery.recover_steps} steps) on the allocation at {PROBE_SHARE:.0%} of the FLOPs: "
               f"accuracy {fitted:.4f} -> {distilled:.4f}, {rate:.0%} of the loss won back")
    log.info(message)
    if ctx.job.verbose:
        print(message)
    return rate


def won_back(dense_accuracy: float, fitted: float, distilled: float) -> float:
    """The share of the accuracy a plan lost as fitted that distillation won back, between 0 and
    `MAX_RATE` (0 when it lost nothing)."""
    lost = dense_accuracy - fitted
    return min(max((distilled - fitted) / lost, 0.0), MAX_RATE) if lost > 0 else 0.0


def working_threshold(threshold: float, dense_accuracy: float, rate: float, safety: float = SAFETY) -> float:
    """The bar a fitted plan must meet for its distilled version to be expected at `threshold`:
    a plan losing `loss` as fitted loses about `loss·(1 − rate)` distilled; `safety` of the rate
    is counted on. The bar itself when it is at or above the dense accuracy."""
    if not rate or not math.isfinite(dense_accuracy) or threshold >= dense_accuracy:
        return threshold
    return dense_accuracy - (dense_accuracy - threshold) / (1.0 - safety * rate)


def finish_recovered(ctx: TrialContext, study: optuna.Study, dense_accuracy: float, threshold: float) -> Result:
    """`finish` for trials judged against a working bar below `threshold`: the plan chosen at the
    working bar is distilled and checked against `threshold`. When it falls short, the share of
    its loss it won back sets the next bar (`SAFETY_MEASURED` of it counted on; always above the
    plan that fell short), `RETRIES` distilled plans in all; last, the plan chosen at `threshold`
    itself, as fitted."""
    bar, held = ctx.threshold, study.user_attrs.get(keys.RECOVERY)
    notes = [f"distillation won back {held['rate']:.0%} of what the probe plan lost ({held['fitted']:.4f} -> "
             f"{held['distilled']:.4f}): the trials were judged as fitted against {bar:.4f}"] if held else []
    try:
        for attempt in range(RETRIES + 1):
            bar = threshold if attempt == RETRIES else min(bar, threshold)
            ctx.job = dataclasses.replace(ctx.job, accuracy_threshold=bar)
            result = finish(ctx, study, dense_accuracy)
            if bar >= threshold or not result.plan:
                if attempt:
                    log.warning("no distilled plan met the bar: returning the best plan found that meets it as fitted")
                result.notes.extend(notes)
                return result
            distilled = ctx.build(result.plan, share=False, recover=True)
            try:
                accuracy = call_metric(ctx.accuracy_fn, distilled, "accuracy_fn")
            except TrialFailed as exc:
                raise RuntimeError(f"checking the distilled plan failed: {exc}") from exc
            message = (f"the plan found at the working bar {bar:.4f} ({len(result.plan)} entries, "
                       f"{result.speedup:.2f}x): accuracy {result.accuracy:.4f} as fitted, {accuracy:.4f} distilled")
            log.info(message)
            if ctx.job.verbose:
                print(message)
            result.validation.append({"layers": len(result.plan), "dropped": None, "accuracy": accuracy,
                                      "source": f"distilled {ctx.job.calibration.recover_steps} steps"})
            if accuracy >= threshold:
                return _distilled_result(ctx, result, distilled, accuracy, threshold, notes + [message])
            notes.append(message + f": below {threshold:.4f}")
            rate = won_back(dense_accuracy, result.accuracy, accuracy)
            bar = max(working_threshold(threshold, dense_accuracy, rate, SAFETY_MEASURED),
                      math.nextafter(result.accuracy, math.inf))
    finally:
        ctx.job = dataclasses.replace(ctx.job, accuracy_threshold=threshold)
    raise AssertionError("unreachable: the last bar is the threshold")


def _distilled_result(ctx: TrialContext, result: Result, module: nn.Module, accuracy: float, threshold: float,
                      notes: list[str]) -> Result:
    """`result` with the distilled `module`, its accuracy, and its speed timed again."""
    measured = time_result(ctx, result.plan, module)
    return dataclasses.replace(result, graph_module=module, accuracy=accuracy, notes=result.notes + notes,
                               accuracy_threshold=threshold,
                               measured_speedup=measured,
                               speedup=measured.median if measured is not None else result.speedup)
