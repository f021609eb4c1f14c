"""Shareable searches: the state of a search as URL query parameters, and back.

The region travels at feature-grid resolution (one byte per cell), which is exactly what the search uses, so
a colleague opening the link gets the same hits. Parsing is lenient: a damaged parameter is dropped and
reported, never an error page.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, MutableMapping

import numpy as np

from dashboard.metadata import MetadataFilter
from dashboard.two_tier import MODES

DEFAULT_K = 20
MAX_K = 500


@dataclass(frozen=True)
class SearchState:
    cache: str | None = None
    image_id: int | None = None
    region: np.ndarray | None = None  # (H, W) weights in [0, 1] on the feature grid
    k: int = DEFAULT_K
    flt: MetadataFilter = field(default_factory=MetadataFilter)
    per_group: str | None = None
    exclude_query: bool = True
    mode: str = "auto"  # dashboard.two_tier.MODES
    layer: str | None = None  # of a multi-layer cache; None = its first
    view: str = "hits"  # VIEWS: the top hits of one layer, or the Layers view (every layer's)


VIEWS = ("hits", "layers")


def encode_region(weights: np.ndarray) -> str:
    quantized = np.clip(np.rint(np.asarray(weights, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
    return f"{quantized.shape[0]}x{quantized.shape[1]}:{quantized.tobytes().hex()}"


def decode_region(text: str) -> np.ndarray:
    shape, _, data = text.partition(":")
    h, _, w = shape.partition("x")
    h, w = int(h), int(w)
    raw = bytes.fromhex(data)
    if not (0 < h <= 256 and 0 < w <= 256) or len(raw) != h * w:
        raise ValueError(f"region {shape} does not match its {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8).reshape(h, w).astype(np.float32) / 255.0


def to_params(state: SearchState) -> dict[str, str]:
    params: dict[str, str] = {}
    if state.cache:
        params["cache"] = state.cache
    if state.image_id is not None:
        params["image"] = str(state.image_id)
    if state.region is not None and np.any(state.region > 0):
        params["region"] = encode_region(state.region)
    if state.k != DEFAULT_K:
        params["k"] = str(state.k)
    if not state.flt.is_empty():
        params["filters"] = json.dumps(
            {"equals": state.flt.equals, "ranges": state.flt.ranges, "contains_any": state.flt.contains_any},
            default=str, separators=(",", ":"),
        )
    if state.per_group:
        params["per"] = state.per_group
    if not state.exclude_query:
        params["self"] = "1"
    if state.mode != "auto":
        params["mode"] = state.mode
    if state.layer:
        params["layer"] = state.layer
    if state.view != "hits":
        params["view"] = state.view
    return params


def from_params(params: Mapping[str, Any]) -> tuple[SearchState, list[str]]:
    """The state in `params`, and a note for each parameter that had to be ignored."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    readers = {
        "cache": lambda v: ("cache", str(v)),
        "image": lambda v: ("image_id", _non_negative(int(v))),
        "region": lambda v: ("region", decode_region(str(v))),
        "k": lambda v: ("k", min(MAX_K, max(1, int(v)))),
        "filters": lambda v: ("flt", _parse_filter(str(v))),
        "per": lambda v: ("per_group", str(v)),
        "self": lambda v: ("exclude_query", str(v) not in ("1", "true")),
        "mode": lambda v: ("mode", _search_mode(str(v))),
        "layer": lambda v: ("layer", str(v)),
        "view": lambda v: ("view", _one_of(str(v), VIEWS)),
    }
    for name, read in readers.items():
        if name not in params:
            continue
        raw = params[name]
        raw = raw[-1] if isinstance(raw, list) else raw
        try:
            key, value = read(raw)
            values[key] = value
        except (ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
            problems.append(f"ignored the link's `{name}` parameter ({exc})")
    return SearchState(**values), problems


@dataclass(frozen=True)
class PageLink:
    """What a page's address held when the session first opened the page: the fields a search link shares
    (`state`), every parameter as text for the page's own ones (Compare's two caches, Dataset's page), and a note
    for each parameter that had to be ignored."""

    state: SearchState
    params: dict[str, str]
    problems: list[str]

    def number(self, name: str, lowest: int, highest: int) -> int | None:
        """An integer parameter, or None when it is absent, not a number or out of [lowest, highest]."""
        try:
            value = int(self.params[name])
        except (KeyError, ValueError):
            return None
        return value if lowest <= value <= highest else None


def link_once(session: MutableMapping[str, Any], key: str, params: Mapping[str, Any]) -> tuple[PageLink, bool]:
    """The page's link, parsed the first time the session opens the page (later reruns keep what the widgets
    changed); True that first time, when the page reports the link's problems."""
    if key in session:
        return session[key], False
    state, problems = from_params(params)
    raw = {str(name): str(value[-1] if isinstance(value, list) else value) for name, value in params.items()}
    session[key] = PageLink(state, raw, problems)
    return session[key], True


def _search_mode(value: str) -> str:
    return _one_of(value, MODES)


def _one_of(value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"not one of {', '.join(choices)}")
    return value


def _non_negative(value: int) -> int:
    if value < 0:
        raise ValueError("negative id")
    return value


def _parse_filter(text: str) -> MetadataFilter:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("filters must be an object")

    def mapping(key: str) -> dict[str, Any]:
        part = data.get(key, {})
        if not isinstance(part, dict):
            raise ValueError(f"{key} must be an object")
        return part

    ranges = {str(c): (lo, hi) for c, (lo, hi) in mapping("ranges").items()}
    return MetadataFilter(
        equals={str(c): list(v) for c, v in mapping("equals").items()},
        ranges=ranges,
        contains_any={str(c): list(v) for c, v in mapping("contains_any").items()},
    )
