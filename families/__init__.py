"""One declaration per model family, and the registry that matches a config.json to one of them.

Adding a family is adding one module here that defines `FAMILY`; the registry finds it by scanning this package.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Mapping

from .declaration import (
    AllLayers,
    ConfigError,
    Experts,
    Family,
    FirstKDense,
    IntervalRange,
    LayerList,
    LayerTypes,
    Router,
    SharedExperts,
    SparseStep,
    StackedExperts,
    config_value,
)


class UnknownFamily(LookupError):
    """No declaration matches a config (or a --family name)."""


def _load() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "declaration":
            continue
        fam = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if isinstance(fam, Family):
            found[fam.name] = fam
    return found


REGISTRY: dict[str, Family] = _load()


def get(name: str) -> Family:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownFamily(f"unknown family {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def detect(cfg: Mapping[str, Any]) -> Family:
    """The family whose model_type matches, else the one whose architectures match."""
    mt = cfg.get("model_type")
    for fam in REGISTRY.values():
        if mt in fam.model_types:
            return fam
    for fam in REGISTRY.values():
        if fam.matches(cfg):
            return fam
    archs = ", ".join(cfg.get("architectures") or []) or "none"
    raise UnknownFamily(
        f"no family matches model_type {mt!r} (architectures: {archs}); pass --family NAME "
        f"(known: {', '.join(sorted(REGISTRY))})"
    )


__all__ = [
    "AllLayers",
    "ConfigError",
    "Experts",
    "Family",
    "FirstKDense",
    "IntervalRange",
    "LayerList",
    "LayerTypes",
    "REGISTRY",
    "Router",
    "SharedExperts",
    "SparseStep",
    "StackedExperts",
    "UnknownFamily",
    "config_value",
    "detect",
    "get",
]
