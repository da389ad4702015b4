"""Registry of plugin types, keyed by their upstream type names.

A plugin module decorates its class with `@register("queue-scorer")`; the config loader
(`epp.config`) instantiates plugins by type with `create(type, name, parameters)`.
Each registered class provides `from_params(name: str, params: dict) -> instance` and
raises `ValueError` with a readable message for a bad parameter.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar


_TYPES: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register(type_name: str) -> Callable[[T], T]:
    def deco(cls: T) -> T:
        if type_name in _TYPES and _TYPES[type_name] is not cls:
            raise RuntimeError(f"plugin type {type_name!r} registered twice")
        _TYPES[type_name] = cls
        cls.plugin_type = type_name  # type: ignore[attr-defined]
        return cls

    return deco


def create(type_name: str, name: str, params: dict[str, Any] | None) -> Any:
    cls = _TYPES.get(type_name)
    if cls is None:
        known = ", ".join(sorted(_TYPES)) or "none"
        raise ValueError(f"unknown plugin type {type_name!r} (known: {known})")
    return cls.from_params(name, dict(params or {}))  # type: ignore[attr-defined]


def known_types() -> list[str]:
    return sorted(_TYPES)
