"""Drafting policies by name, built from ``key=value`` arguments.

Every policy is a dataclass whose fields are its arguments; ``make_policy`` converts
strings to the field types and rejects unknown keys with a clear error.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping

from ..errors import PolicyArgumentError
from .base import Policy

POLICIES: dict[str, type[Policy]] = {}  # name -> class; every policy module adds itself (``@register``)


def register(cls: type[Policy]) -> type[Policy]:
    """Add a policy class to the registry under ``cls.name`` (the one way a policy is registered)."""
    POLICIES[cls.name] = cls
    return cls


def _convert(name: str, key: str, raw: object, typ: object) -> object:
    if not isinstance(raw, str):
        return raw
    origin = typing.get_origin(typ)
    if origin is typing.Union or str(typ).startswith(("int |", "float |", "str |", "bool |")):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        typ = args[0] if args else str
        if raw.lower() in ("none", "null", ""):
            return None
    try:
        if typ is bool or typ == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ in (int, "int"):
            return int(raw)
        if typ in (float, "float"):
            return float(raw)
    except ValueError:
        kind = getattr(typ, "__name__", typ)
        raise PolicyArgumentError(f"{name}: {key}={raw!r} is not a valid {kind}") from None
    return raw


def make_policy(name: str, args: Mapping[str, object] | None = None) -> Policy:
    """Build policy ``name`` with ``args`` (strings are converted to the field types).

    Raises:
        PolicyArgumentError: unknown policy, unknown key, or an invalid value.
    """
    _load_all()
    if name not in POLICIES:
        raise PolicyArgumentError(f"unknown policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    cls = POLICIES[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    kwargs = {}
    for key, raw in (args or {}).items():
        if key not in fields:
            raise PolicyArgumentError(
                f"{name}: unknown argument {key!r}; valid: {', '.join(fields) or '(none)'}")
        kwargs[key] = _convert(name, key, raw, hints.get(key, str))
    return cls(**kwargs)


def parse_policy_args(items: list[str] | None) -> dict[str, str]:
    """['k=5', 'h=0.3'] -> {'k': '5', 'h': '0.3'}."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PolicyArgumentError(f"policy argument {item!r} must look like key=value")
        out[key.strip()] = value.strip()
    return out


def _load_all() -> None:
    """Import every policy module so that each registers itself (no optional deps)."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in ("base",):
            importlib.import_module(f"{__name__}.{mod.name}")


__all__ = ["POLICIES", "Policy", "make_policy", "parse_policy_args", "register"]
