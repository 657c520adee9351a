"""Width plans: the channel count of every channel group, parsed from any form a user gives a width in.

A width is a multiplier (float), a choice index (int), per-stage choices (one multiplier or choice index per entry
of the supernet's ``stage_names``), a mapping of group name → channels, or a `WidthPlan`. `ResolvesWidths` turns
each into a validated plan for a supernet that provides its layout: ``widths``, ``group_names``, ``stage_names``,
``max_channels``, ``choice_plans``, ``_choice_by_channels``, ``_uniform_channels``, ``_channels_for_stage_widths``,
``_make_route`` and a ``_routes`` dict.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

_MAX_CACHED_ROUTES = 4096


class WidthPlan:
    """Explicit channel counts for every channel group of a supernet, in the supernet's group order.

    ``choice`` is the index of the width choice whose plan this is, or None for any other plan; it selects the BN
    statistics slot. Plans are immutable and hashable; make them with ``supernet.resolve_width``.
    """

    __slots__ = ("names", "channels", "choice")

    def __init__(self, names: tuple[str, ...], channels: tuple[int, ...], choice: int | None):
        self.names = names
        self.channels = channels
        self.choice = choice

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self.names, self.channels))

    def __getitem__(self, name: str) -> int:
        return self.channels[self.names.index(name)]

    def __eq__(self, other) -> bool:
        return isinstance(other, WidthPlan) and self.names == other.names and self.channels == other.channels

    def __hash__(self) -> int:
        return hash(self.channels)

    def __repr__(self) -> str:
        which = f"choice {self.choice}" if self.choice is not None else "custom"
        return f"WidthPlan({which}, {self.as_dict()})"


class ResolvesWidths:
    """Mixin of a supernet: width forms → `WidthPlan`, and each plan's route cached (see the module doc)."""

    @property
    def largest(self) -> WidthPlan:
        return self.choice_plans[-1]

    @property
    def smallest(self) -> WidthPlan:
        return self.choice_plans[0]

    def resolve_width(self, width: Any = None) -> WidthPlan:
        """Turn any accepted width form into a validated `WidthPlan` (ValueError naming the layer if it won't fit)."""
        return self._route(width).plan

    def _route(self, width: Any):
        """The supernet's route (its per-layer arguments, made by `_make_route`) of any width form, cached."""
        key = _cache_key(width)
        route = self._routes.get(key)
        if route is None:
            route = self._make_route(self._make_plan(width))
            if len(self._routes) >= _MAX_CACHED_ROUTES:  # searches visit many plans; keep the cache bounded
                self._routes.clear()
            self._routes[key] = route
        return route

    def _make_plan(self, width: Any) -> WidthPlan:
        if width is None:
            return self.largest
        if isinstance(width, WidthPlan):
            if width.names != self.group_names:
                raise ValueError("this WidthPlan was made for a supernet with other layers")
            return self._plan_from_channels(width.channels)
        if isinstance(width, bool):
            raise ValueError(f"width must be a multiplier, a choice index, per-stage choices or a plan, got {width}")
        if isinstance(width, int):
            if not -len(self.widths) <= width < len(self.widths):
                raise ValueError(f"width choice index {width} is out of range; there are {len(self.widths)} "
                                 f"choices {list(self.widths)}")
            return self.choice_plans[width]
        if isinstance(width, float):
            choice = self.choice_index(width)
            if choice is not None:
                return self.choice_plans[choice]
            return self._plan_from_channels(self._uniform_channels(self._check_multiplier(width, "width")))
        if isinstance(width, Mapping):
            return self._plan_from_mapping(width)
        if isinstance(width, Sequence) and not isinstance(width, str):
            if len(width) != len(self.stage_names):
                raise ValueError(f"per-stage widths need {len(self.stage_names)} entries {list(self.stage_names)}, "
                                 f"got {len(width)}")
            multipliers = []
            for name, w in zip(self.stage_names, width):
                if isinstance(w, bool) or not isinstance(w, (int, float)):
                    raise ValueError(f"per-stage width for '{name}' must be a multiplier or a choice index, got {w!r}")
                if isinstance(w, int):
                    if not 0 <= w < len(self.widths):
                        raise ValueError(f"per-stage width for '{name}': choice index {w} is out of range "
                                         f"0..{len(self.widths) - 1}")
                    w = self.widths[w]
                multipliers.append(self._check_multiplier(float(w), name))
            return self._plan_from_channels(self._channels_for_stage_widths(multipliers))
        raise ValueError(f"width must be a multiplier, a choice index, per-stage choices or a plan, got {width!r}")

    def _check_multiplier(self, w: float, name: str) -> float:
        if not 0 < w <= self.widths[-1] + 1e-9:
            raise ValueError(f"width multiplier for '{name}' is {w}; allowed: (0, {self.widths[-1]}]")
        return w

    def _plan_from_mapping(self, mapping: Mapping[str, Any]) -> WidthPlan:
        unknown = [k for k in mapping if k not in self.group_names]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown} in width plan; layers are {list(self.group_names)}")
        missing = [k for k in self.group_names if k not in mapping]
        if missing:
            raise ValueError(f"width plan lacks layer(s) {missing}")
        channels = []
        for name in self.group_names:
            value = mapping[name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"width plan value for layer '{name}' must be an integer channel count, "
                                 f"got {value!r}")
            channels.append(value)
        return self._plan_from_channels(tuple(channels))

    def _plan_from_channels(self, channels: tuple[int, ...]) -> WidthPlan:
        for name, c, m in zip(self.group_names, channels, self.max_channels):
            if not 1 <= c <= m:
                raise ValueError(f"width plan gives layer '{name}' {c} channels; allowed: 1..{m}")
        return WidthPlan(self.group_names, tuple(channels), self._choice_by_channels.get(channels))

    def choice_index(self, multiplier: float) -> int | None:
        """Index of the width choice equal to `multiplier`, or None."""
        for i, w in enumerate(self.widths):
            if abs(w - multiplier) < 1e-6:
                return i
        return None


def _cache_key(width: Any) -> Any:
    if isinstance(width, WidthPlan):
        return ("plan", width.names, width.channels)
    if isinstance(width, Mapping):
        return ("map", tuple(sorted((k, _hashable(v)) for k, v in width.items())))
    if isinstance(width, (list, tuple)):
        return ("seq", tuple((type(w).__name__, _hashable(w)) for w in width))
    return (type(width).__name__, _hashable(width))


def _hashable(value: Any) -> Any:
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)
