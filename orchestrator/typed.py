"""Plain values to typed dataclasses, with one-line errors: what the job config and the sweep config share.

A value comes from YAML or from a ``key=value`` command-line item. :func:`parse_value` reads the item's text,
:func:`coerce` converts either kind to the field's type, and :func:`build` makes the dataclass, turning every bad key
or value into a :class:`ConfigError` that names it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad key or value; the message is one line naming it and what would be valid."""


def check(ok: bool, key: str, value: Any, valid: str) -> None:
    """ConfigError ``key=value is invalid; expected <valid>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid; expected {valid}")


def load_yaml(path: str | Path, what: str = "config file") -> Any:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} {str(p)!r} not found")
    return yaml.safe_load(p.read_text()) or {}


def split_override(item: str, example: str) -> tuple[str, str]:
    """``"section.key=value"`` → ``("section.key", "value")``, both stripped; ``example`` shows the form."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. {example})")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


def field_types(cls) -> dict[str, Any]:
    """Each field of the dataclass ``cls`` and its (resolved) type."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def parse_value(text: str, tp) -> Any:
    """A command-line string for a field of type ``tp``: as given for ``str`` fields, else read as YAML (numbers,
    booleans, null, containers). YAML 1.1 reads 1e-4 as a string: :func:`coerce` converts by type afterwards."""
    if tp is str or not text:
        return text
    return yaml.safe_load(text)


def coerce(value: Any, tp, key: str) -> Any:
    """``value`` as type ``tp`` (bool, int, float, str, unions, lists and tuples of them; a comma-separated string
    for a sequence); ConfigError naming ``key`` when it is not one."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp), key)
    if tp is Any:
        return value
    if tp is bool:
        return _coerce_bool(value, key)
    if tp in (int, float):
        return _coerce_number(value, tp, key)
    if tp is str:
        if isinstance(value, bool):  # yaml's `true` in a str field (e.g. use_gpu=true)
            return "true" if value else "false"
        return str(value)
    if origin in (tuple, list):
        seq = value.split(",") if isinstance(value, str) else value
        if not isinstance(seq, list | tuple):
            raise ConfigError(f"{key}={value!r} is not a list")
        args = typing.get_args(tp)
        items = [coerce(v, args[0] if args else Any, key) for v in seq]
        return tuple(items) if origin is tuple else items
    return value


def _coerce_union(value: Any, args: tuple, key: str) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return coerce(value, arg, key)
        except ConfigError as e:
            errors.append(e)
    raise errors[0]


def _coerce_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigError(f"{key}={value!r} is not a boolean; use true or false")


def _coerce_number(value: Any, tp: type, key: str) -> int | float:
    try:
        number = tp(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or (tp is int and isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{key}={value!r} is not {'an integer' if tp is int else 'a number'}")
    return number


def build(cls, values: dict[str, Any], section: str, kind: str = "config"):
    """``cls(**values)`` with each value coerced to its field's type; ConfigError (one line) for a key ``cls`` lacks
    (``unknown <kind> key <section>.<key>``) or a value it rejects."""
    fields = field_types(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown {kind} key {section}.{unknown[0]}; valid {section} keys: {', '.join(sorted(fields))}"
        )
    try:
        return cls(**{k: coerce(v, fields[k], f"{section}.{k}") for k, v in values.items()})
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
