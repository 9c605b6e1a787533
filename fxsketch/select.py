"""The layer-selector language: which captured layers a tuning entry applies to.

A selector is one of:

* a ``str``: the record with exactly that name if one exists, else a regex searched in
  every name (a plain substring test when the string is not a valid regex);
* a ``list``/``tuple`` of such strings: the union of the entries, each of which must
  select at least one layer;
* a ``dict`` with keys ``pattern`` (regexes), ``type`` (op or module class names),
  ``contains`` (substrings), combined with AND, then optionally ``indices`` or ``range``
  picking among those matches counted in module order;
* a callable ``(LayerRecord) -> bool``.

Everything here is a pure function over :class:`~fxsketch.records.LayerRecord` lists, so
selectors can be resolved and their errors tested without capturing a model.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fxsketch.records import LayerRecord

__all__ = ["Selector", "SelectorIndexError", "describe_selector", "match_layers"]

Selector = str | Sequence[str] | Mapping[str, Any] | Callable[[LayerRecord], bool]

_CRITERIA_KEYS = ("pattern", "type", "contains")
_PICK_KEYS = ("indices", "range")
_VALID_KEYS = _CRITERIA_KEYS + _PICK_KEYS
_ACCEPTED_FORMS = (
    "a str (exact name or regex), a list/tuple of str, a dict with keys "
    + ", ".join(_VALID_KEYS)
    + ", or a callable (LayerRecord) -> bool"
)
_MAX_LISTED = 10
_MAX_CLOSE = 6
_MAX_DESCRIBED = 200

_Predicate = Callable[[LayerRecord], bool]


class SelectorIndexError(IndexError, ValueError):
    """An ``indices`` entry points outside the layers its selector matched.

    Subclasses both ``IndexError`` and ``ValueError`` so callers that treat every bad
    selector as a ``ValueError`` still catch it.
    """


def match_layers(
    records: Sequence[LayerRecord],
    selector: Selector,
    *,
    other_modules: Mapping[str, str] | None = None,
) -> list[str]:
    """Resolve ``selector`` against ``records`` and return the selected layer names.

    Args:
        records: the matchable layers of a captured model.
        selector: any selector form described in the module docstring.
        other_modules: names of the model's non-matchable modules mapped to their class
            names; only used to explain why a selector matched nothing.

    Returns:
        Qualified names in graph order (by ``graph_order``), without duplicates.

    Raises:
        TypeError: the selector, or a value inside a dict selector, has the wrong type.
        ValueError: the selector is malformed or matches no layer.
        SelectorIndexError: an index is out of range for the layers matched.
    """
    ctx = _Context(list(records), dict(other_modules or {}))
    return _in_graph_order(_resolve(ctx, selector))


def describe_selector(selector: Any) -> str:
    """Render a selector briefly for error messages (callables by their ``__name__``)."""
    if isinstance(selector, str):
        text = repr(selector)
    elif isinstance(selector, Mapping):
        text = "{" + ", ".join(f"{k}: {v!r}" for k, v in selector.items()) + "}"
    elif isinstance(selector, (list, tuple)):
        text = "[" + ", ".join(describe_selector(s) for s in selector) + "]"
    elif callable(selector):
        name = getattr(selector, "__name__", type(selector).__name__)
        text = f"<callable {name}>"
    else:
        text = repr(selector)
    if len(text) > _MAX_DESCRIBED:
        text = text[: _MAX_DESCRIBED - 3] + "..."
    return text


class _Context:
    """The records and non-matchable modules a selector is resolved against."""

    def __init__(self, records: list[LayerRecord], others: dict[str, str]) -> None:
        self.records = records
        self.others = others


# --------------------------------------------------------------------------- resolution


def _resolve(ctx: _Context, selector: Any) -> list[LayerRecord]:
    """Dispatch on the selector form; every branch raises when nothing matches."""
    if isinstance(selector, str):
        return _require(ctx, _match_str(ctx.records, _check_text(selector, "selector")), selector)
    if isinstance(selector, Mapping):
        return _match_dict(ctx, selector)
    if isinstance(selector, (list, tuple)):
        return _match_list(ctx, selector)
    if callable(selector):
        return _require(ctx, [r for r in ctx.records if selector(r)], selector)
    raise TypeError(
        f"unsupported selector {describe_selector(selector)} of type "
        f"{type(selector).__name__}; expected {_ACCEPTED_FORMS}"
    )


def _require(
    ctx: _Context,
    matched: list[LayerRecord],
    selector: Any,
    *,
    within: Any = None,
    detail: str = "",
) -> list[LayerRecord]:
    """Return ``matched`` unchanged, or raise the no-match ``ValueError`` when it is empty."""
    if matched:
        return matched
    raise ValueError(_no_match_message(ctx, selector, within=within, detail=detail))


def _match_str(records: list[LayerRecord], text: str) -> list[LayerRecord]:
    """A regex searched in the name (a substring test if it is not a valid regex): `fc1` also
    selects `fc10`, as the seed documents say; anchor it (`fc1$`) or use a list for exact names."""
    return [r for r in records if _text_matches(text, r.name)]


def _match_list(ctx: _Context, selector: Sequence[Any]) -> list[LayerRecord]:
    """Union of exact qualified names (`"fc1"` never selects `fc10`); an entry that names no layer
    is reported on its own, with the closest names."""
    if not selector:
        raise ValueError(f"empty selector list; expected {_ACCEPTED_FORMS}")
    chosen: list[LayerRecord] = []
    for entry in selector:
        if not isinstance(entry, str):
            raise TypeError(
                f"selector list entries must be str, got {describe_selector(entry)} "
                f"of type {type(entry).__name__} in {describe_selector(selector)}"
            )
        text = _check_text(entry, "selector list entry")
        chosen += _require(ctx, [r for r in ctx.records if r.name == text], entry, within=selector)
    return chosen


def _match_dict(ctx: _Context, spec: Mapping[str, Any]) -> list[LayerRecord]:
    """AND the criteria, then apply ``indices`` or ``range`` in module order."""
    _check_keys(spec)
    filters = _dict_filters(spec)
    matched = [r for r in ctx.records if all(f(r) for _, f in filters)]
    _require(ctx, matched, spec, detail=_criteria_counts(ctx.records, filters))
    ordered = sorted(matched, key=lambda r: (r.module_order, r.graph_order))
    if "indices" in spec:
        return _pick_indices(ordered, _int_list(spec["indices"]), spec)
    if "range" in spec:
        return _pick_range(ordered, spec["range"], spec)
    return matched


def _check_keys(spec: Mapping[str, Any]) -> None:
    """Reject empty dicts, unknown keys and ``indices`` combined with ``range``."""
    if not spec:
        raise ValueError(f"empty selector dict; valid keys are {', '.join(_VALID_KEYS)}")
    unknown = [k for k in spec if k not in _VALID_KEYS]
    if unknown:
        raise ValueError(
            f"unknown selector key(s) {', '.join(map(repr, unknown))} in "
            f"{describe_selector(spec)}; valid keys are {', '.join(_VALID_KEYS)}"
        )
    if "indices" in spec and "range" in spec:
        raise ValueError(
            f"'indices' and 'range' cannot be used together in {describe_selector(spec)}"
        )


def _dict_filters(spec: Mapping[str, Any]) -> list[tuple[str, _Predicate]]:
    """Build one predicate per criterion key present, in ``_CRITERIA_KEYS`` order."""
    filters: list[tuple[str, _Predicate]] = []
    if "pattern" in spec:
        regexes = [_compile_strict(p) for p in _str_list(spec["pattern"], "pattern")]
        filters.append(("pattern", lambda r: any(x.search(r.name) for x in regexes)))
    if "type" in spec:
        types = set(_str_list(spec["type"], "type"))
        filters.append(("type", lambda r: r.op_type in types or r.module_type in types))
    if "contains" in spec:
        subs = _str_list(spec["contains"], "contains")
        filters.append(("contains", lambda r: any(s in r.name for s in subs)))
    return filters


def _criteria_counts(records: list[LayerRecord], filters: list[tuple[str, _Predicate]]) -> str:
    """Say how many layers each criterion matches alone, to debug an empty AND."""
    if len(filters) < 2 or not records:
        return ""
    counts = ", ".join(f"{key} {sum(map(f, records))}" for key, f in filters)
    return f"layers matched by each criterion alone (they combine with AND): {counts}"


def _pick_indices(
    ordered: list[LayerRecord], indices: list[int], spec: Mapping[str, Any]
) -> list[LayerRecord]:
    """Pick positions (negative allowed) among the module-ordered matches."""
    n = len(ordered)
    for i in indices:
        if not -n <= i < n:
            raise SelectorIndexError(
                f"index {i} in selector {describe_selector(spec)} is out of range: "
                f"{n} layer(s) matched before indexing (valid indices {-n}..{n - 1})"
            )
    return [ordered[i] for i in indices]


def _pick_range(ordered: list[LayerRecord], rng: Any, spec: Mapping[str, Any]) -> list[LayerRecord]:
    """Slice the module-ordered matches with Python slice semantics."""
    picked = ordered[slice(*_range_bounds(rng))]
    if not picked:
        raise ValueError(
            f"range {list(rng)} in selector {describe_selector(spec)} selects none of the "
            f"{len(ordered)} layer(s) matched before slicing"
        )
    return picked


# --------------------------------------------------------------------------- validation


def _check_text(text: str, what: str) -> str:
    """Reject the empty string, which as a regex would silently select every layer."""
    if not text:
        raise ValueError(f"empty string {what}: it would match every layer")
    return text


def _str_list(value: Any, key: str) -> list[str]:
    """Normalize a dict value that is a str or a non-empty list/tuple of non-empty str."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise TypeError(f"selector key '{key}' takes a str or a list of str, got {value!r}")
    if not items:
        raise ValueError(f"selector key '{key}' has an empty list")
    return [_check_text(v, f"in selector key '{key}'") for v in items]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_list(value: Any) -> list[int]:
    """Normalize ``indices``: an int or a non-empty list/tuple of ints."""
    items = [value] if _is_int(value) else value
    if not isinstance(items, (list, tuple)) or not all(_is_int(v) for v in items):
        raise TypeError(f"selector key 'indices' takes an int or a list of int, got {value!r}")
    if not items:
        raise ValueError("selector key 'indices' has an empty list")
    return list(items)


def _range_bounds(rng: Any) -> tuple[int | None, ...]:
    """Validate ``range`` as ``[start, end]`` or ``[start, end, step]``."""
    if not isinstance(rng, (list, tuple)) or len(rng) not in (2, 3):
        raise ValueError(
            f"selector key 'range' takes [start, end] or [start, end, step], got {rng!r}"
        )
    if not all(v is None or _is_int(v) for v in rng):
        raise TypeError(f"selector key 'range' takes ints (or None), got {rng!r}")
    if len(rng) == 3 and rng[2] == 0:
        raise ValueError(f"selector key 'range' has step 0: {rng!r}")
    return tuple(rng)


def _compile_strict(pattern: str) -> re.Pattern[str]:
    """Compile a dict ``pattern``; unlike the plain-str form there is no substring fallback."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid regex {pattern!r} in selector key 'pattern': {exc}") from None


def _text_matches(term: str, text: str) -> bool:
    """Regex search of ``term`` in ``text``, or a substring test if ``term`` is no regex."""
    try:
        return re.search(term, text) is not None
    except re.error:
        return term in text


# --------------------------------------------------------------------------- ordering


def _in_graph_order(chosen: list[LayerRecord]) -> list[str]:
    """Sort by ``graph_order`` (stable) and drop repeated names."""
    ordered = sorted(chosen, key=lambda r: r.graph_order)
    return list(dict.fromkeys(r.name for r in ordered))


# --------------------------------------------------------------------------- messages


def _no_match_message(ctx: _Context, selector: Any, *, within: Any, detail: str) -> str:
    """Explain an empty match: closest names, available types, unsupported modules."""
    head = f"selector {describe_selector(selector)}"
    if within is not None:
        head += f" (in {describe_selector(within)})"
    lines = [head + " matched no layer."]
    if not ctx.records:
        lines.append("the model has no Linear or Conv2d layer, the only layers fxsketch rewrites.")
    else:
        lines += [line for line in (detail, _names_line(ctx.records, selector)) if line]
        lines += _types_lines(ctx.records, selector)
    hint = _unsupported_hint(ctx.others, selector)
    if hint:
        lines.append(hint)
    return "\n  ".join(lines)


def _names_line(records: list[LayerRecord], selector: Any) -> str:
    """Closest layer names to the selector's text, else the first available names."""
    names = _in_graph_order(records)
    close = _close_names(_name_terms(selector), names)
    if close:
        return "closest layer names: " + ", ".join(close)
    more = len(names) - _MAX_LISTED
    suffix = f" (and {more} more)" if more > 0 else ""
    return "available layers: " + ", ".join(names[:_MAX_LISTED]) + suffix


def _close_names(terms: list[str], names: list[str]) -> list[str]:
    """Names close to a term, comparing whole names then last components (``query``)."""
    close: list[str] = []
    for term in terms:
        close += difflib.get_close_matches(term, names, n=_MAX_CLOSE)
    if not close:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        near = {leaf for t in terms for leaf in difflib.get_close_matches(t, leaves)}
        close = [n for n in names if n.rsplit(".", 1)[-1] in near]
    return list(dict.fromkeys(close))[:_MAX_CLOSE]


def _types_lines(records: list[LayerRecord], selector: Any) -> list[str]:
    """List the matchable types, plus the closest ones to a requested ``type``."""
    available = list(dict.fromkeys([r.op_type for r in records] + [r.module_type for r in records]))
    lines = ["available types: " + ", ".join(available)]
    unknown = [t for t in _type_terms(selector) if t not in available]
    close = {t for term in unknown for t in difflib.get_close_matches(term, available)}
    if close:
        lines.append("closest types: " + ", ".join(t for t in available if t in close))
    return lines


def _unsupported_hint(others: dict[str, str], selector: Any) -> str:
    """Name the non-matchable modules the selector seems to be aiming at."""
    wanted = _other_module_predicate(selector)
    if wanted is None:
        return ""
    hits = [f"{name} ({cls})" for name, cls in others.items() if name and wanted(name, cls)]
    if not hits:
        return ""
    more = len(hits) - _MAX_LISTED
    listed = ", ".join(hits[:_MAX_LISTED]) + (f" and {more} more" if more > 0 else "")
    verb = "is" if len(hits) == 1 else "are"
    return f"fxsketch rewrites only Linear and Conv2d layers; {listed} {verb} not supported."


def _other_module_predicate(selector: Any) -> Callable[[str, str], bool] | None:
    """A test on (module name, class name) mirroring the selector, or None if it has none."""
    if isinstance(selector, str):
        return lambda n, c: _text_matches(selector, n) or _text_matches(selector, c)
    if isinstance(selector, (list, tuple)):
        tests = [_other_module_predicate(s) for s in selector if isinstance(s, str)]
        return lambda n, c: any(t(n, c) for t in tests if t is not None)
    if not isinstance(selector, Mapping) or not any(k in selector for k in _CRITERIA_KEYS):
        return None
    patterns = _terms_of(selector, "pattern")
    types = _terms_of(selector, "type")
    subs = _terms_of(selector, "contains")
    return lambda n, c: (
        ("pattern" not in selector or any(_text_matches(p, n) for p in patterns))
        and ("type" not in selector or c in types)
        and ("contains" not in selector or any(s in n for s in subs))
    )


def _name_terms(selector: Any) -> list[str]:
    """The strings in a selector that are compared with layer names."""
    if isinstance(selector, str):
        return [selector]
    if isinstance(selector, (list, tuple)):
        return [s for s in selector if isinstance(s, str)]
    return _terms_of(selector, "pattern") + _terms_of(selector, "contains")


def _type_terms(selector: Any) -> list[str]:
    """The strings in a selector that are compared with layer types."""
    return _terms_of(selector, "type")


def _terms_of(selector: Any, key: str) -> list[str]:
    """The str values under ``key`` of a dict selector (empty for other forms)."""
    if not isinstance(selector, Mapping) or key not in selector:
        return []
    value = selector[key]
    return [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]
