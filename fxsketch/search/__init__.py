"""The search: an Optuna study over per-layer replacement choices under an accuracy constraint.

`optimize` checks its arguments into a `SearchJob`, prepares the trial context (`run.prepare`),
runs a strategy (`layerwise`, or `joint` whole-model trials, both through `evaluate`, and after the
`warm` start when there is calibration data), in this process or in workers (`parallel`), and
`finish`es: the chosen plan validated, backed off where needed, timed and reported.
"""

from fxsketch.search.api import SearchInterrupted, optimize

__all__ = ["optimize", "SearchInterrupted"]
