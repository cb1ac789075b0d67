"""Checked construction of the configuration dataclasses from untrusted mappings (YAML files, JSON, flags).

Unknown keys are errors naming the closest valid key; values are checked against the field annotations (``lr:
fast`` is an error, not a crash at step 1) and the harmless mismatches are converted: an integer where a float is
expected, a list where a tuple is expected, and a number PyYAML left as a string (``lr: 1e-3`` is a string in
YAML 1.1, which wants ``1.0e-3``).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError

__all__ = ['check_keys', 'check_values', 'from_mapping']


def check_keys(kind: type, doc: Mapping[str, Any], where: str) -> None:
    """Raise :class:`ConfigError` for the first key of ``doc`` that is not a field of dataclass ``kind``."""
    names = [f.name for f in dataclasses.fields(kind)]
    for key in doc:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f'did you mean {close[0]!r}?' if close else f'valid keys: {", ".join(names)}'
            raise ConfigError(f'{where}: unknown key {key!r}; {hint}')


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return ' or '.join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return 'null'
    if origin is not None:
        return {dict: 'a mapping', tuple: 'a list', list: 'a list'}.get(origin, str(origin))
    return {bool: 'true/false', int: 'an integer', float: 'a number', str: 'a string'}.get(tp, getattr(
        tp, '__name__', str(tp)))


_NO = object()


def _convert(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp``, or ``_NO`` when it cannot be one."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        for arg in sorted(args, key=lambda a: a is not type(value)):  # an exact type match first
            got = _convert(value, arg)
            if got is not _NO:
                return got
        return _NO
    if tp is type(None):
        return None if value is None else _NO
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        if isinstance(value, bool):
            return _NO
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _NO
        return _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    if origin is dict or tp is dict:
        return dict(value) if isinstance(value, Mapping) else _NO
    if origin is tuple or origin is list:
        if not isinstance(value, (list, tuple)):
            return _NO
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [Any]
        items = [_convert(v, args[0]) for v in value]
        if any(v is _NO for v in items):
            return _NO
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, (tp, Mapping)) else _NO
    return value


def check_values(kind: type, doc: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``doc`` with every value checked against (and converted to) the annotation of its field in ``kind``.

    Raises:
        ConfigError: a value of the wrong type, naming the key, the expected type and the value.
    """
    hints = typing.get_type_hints(kind)
    out: dict[str, Any] = {}
    for key, value in doc.items():
        tp = hints.get(key, Any)
        if isinstance(value, Mapping) and dataclasses.is_dataclass(tp):  # a nested section, e.g. ``data``
            out[key] = from_mapping(tp, value, where=f'{where} ({key})')
            continue
        got = _convert(value, tp)
        if got is _NO:
            raise ConfigError(f'{where}: {key} must be {_describe(tp)}, got {value!r}')
        out[key] = got
    return out


def from_mapping(kind: type, doc: Mapping[str, Any], *, where: str) -> Any:
    """Build dataclass ``kind`` from ``doc`` after :func:`check_keys` and :func:`check_values`."""
    check_keys(kind, doc, where)
    try:
        return kind(**check_values(kind, doc, where))
    except (TypeError, ValueError) as e:
        raise ConfigError(f'{where}: {e}') from None
