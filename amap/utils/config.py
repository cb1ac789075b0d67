"""Checked construction of the configuration dataclasses from untrusted mappings (YAML files, JSON, flags).

Unknown keys are errors naming the closest valid key; values are checked against the field annotations (``lr:
fast`` is an error, not a crash at step 1) and the harmless mismatches are converted: an integer where a float is
expected, a list where a tuple is expected, and a number PyYAML left as a string (``lr: 1e-3`` is a string in
YAML 1.1, which wants ``1.0e-3``).

The same dataclasses make the command line: :func:`add_dataclass_arguments` adds one flag per field (name, type,
choices and help from the field and the class docstring), :func:`given_options` reads back what was typed.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ['check_keys', 'check_values', 'check_value', 'from_mapping', 'deep_merge', 'field_docs', 'json_dict',
           'int_at_least', 'positive_int', 'comma_list', 'add_dataclass_arguments', 'given_options', 'read_yaml',
           'check_contained_out']


def check_keys(kind: type, doc: Mapping[str, Any], where: str, *, aliases: Iterable[str] = ()) -> None:
    """Raise :class:`ConfigError` for the first key of ``doc`` that is not a field of dataclass ``kind`` (``aliases``:
    other accepted names, e.g. older ones, also offered as suggestions)."""
    names = [f.name for f in dataclasses.fields(kind)] + list(aliases)
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
    return {key: check_value(kind, key, value, where) for key, value in doc.items()}


def check_value(kind: type, name: str, value: Any, where: str, *, key: str | None = None) -> Any:
    """``value`` checked against (and converted to) the annotation of field ``name`` of ``kind``; an error names
    it ``key`` (default: ``name``), the name the user wrote."""
    tp = typing.get_type_hints(kind).get(name, Any)
    if isinstance(value, Mapping) and dataclasses.is_dataclass(tp):  # a nested section, e.g. ``data``
        return from_mapping(tp, value, where=f'{where} ({key or name})')
    got = _convert(value, tp)
    if got is _NO:
        raise ConfigError(f'{where}: {key or name} must be {_describe(tp)}, got {value!r}')
    return got


def from_mapping(kind: type, doc: Mapping[str, Any], *, where: str) -> Any:
    """Build dataclass ``kind`` from ``doc`` after :func:`check_keys` and :func:`check_values`."""
    check_keys(kind, doc, where)
    try:
        return kind(**check_values(kind, doc, where))
    except (TypeError, ValueError) as e:
        raise ConfigError(f'{where}: {e}') from None


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``update``, section by section (a mapping in both is merged, anything else replaced)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------- command line
def field_docs(kind: type) -> dict[str, str]:
    """The first sentence of each field's entry in the ``Args:`` / ``Attributes:`` section of ``kind``'s docstring
    (Google style): the help text of its flag, written once."""
    entries: dict[str, str] = {}
    name, inside = None, False
    for line in (inspect.getdoc(kind) or '').splitlines():
        if line.strip() in ('Args:', 'Attributes:'):
            inside = True
        elif inside and line and not line.startswith(' '):
            inside = False
        elif inside and (m := re.match(r'    (\w+)(?: \(.*?\))?: (.*)', line)):
            name = m[1]
            entries[name] = m[2]
        elif inside and name and line.strip():
            entries[name] += ' ' + line.strip()
    return {k: re.split(r'(?<=\.)\s+(?=[A-Z])', v.replace('``', ''), maxsplit=1)[0] for k, v in entries.items()}


_EXAMPLE = '\'{"drop_path_rate": 0.1}\''


def json_dict(text: str) -> dict[str, Any]:
    """argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f'not valid JSON ({e.msg}): {text!r}; e.g. {_EXAMPLE}') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'must be a JSON object such as {_EXAMPLE}, got {text!r}')
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
        if value < low:
            raise argparse.ArgumentTypeError(f'{value} must be >= {low}')
        return value
    return parse


positive_int = int_at_least(1)


def comma_list(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated names."""
    return tuple(k.strip() for k in text.split(',') if k.strip())


def _arg_type(tp: Any, spec: Mapping[str, Any]) -> dict[str, Any]:
    """argparse keywords for a field of type ``tp`` (``X | None`` is read as ``X``)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    origin = typing.get_origin(tp) or tp
    if tp is bool:
        return {'action': argparse.BooleanOptionalAction}
    if origin in (tuple, list):
        return {'type': comma_list, 'metavar': 'A,B'}
    if origin is dict:
        return {'type': json_dict, 'metavar': 'JSON'}
    if tp is int:
        return {'type': int_at_least(spec['min']) if 'min' in spec else int}
    return {'type': tp if tp in (float, str) else str}


def add_dataclass_arguments(parser: argparse.ArgumentParser | Any, kind: type, *, dest: str = '',
                            options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Add a flag for every field of dataclass ``kind`` (nested dataclasses recursively, dests ``a.b.c``).

    Flag name ``--field-name``, type, choices and help (first sentence of the docstring entry, plus the default)
    come from the field; its metadata, updated by ``options[dest path]``, may set ``flags`` (option strings),
    ``choices``, ``min`` (integers), ``metavar``, ``nargs`` and ``const`` (an optional value), ``help`` (in place of
    the field's help and default), ``cli=False`` (no flag) and, for a nested dataclass, ``only`` (the names of its
    fields that get flags). Flags have no default: :func:`given_options` returns what was typed.
    """
    docs, hints = field_docs(kind), typing.get_type_hints(kind)
    only = (options or {}).get(dest.rstrip('.'), {}).get('only')
    for f in dataclasses.fields(kind):
        path = dest + f.name
        spec = {**f.metadata, **(options or {}).get(path, {})}
        if spec.get('cli', True) is False or (only is not None and f.name not in only):
            continue
        if dataclasses.is_dataclass(hints[f.name]):  # a section: its own group in --help
            group = parser.add_argument_group(path) if hasattr(parser, 'add_argument_group') and not dest else parser
            add_dataclass_arguments(group, hints[f.name], dest=path + '.', options=options)
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = {True: 'on', False: 'off'}.get(default, default) if isinstance(default, bool) else \
            ','.join(map(str, default)) if isinstance(default, (tuple, list)) else default
        text = spec.get('help', docs.get(f.name, '')).replace('%', '%%')
        if default not in (None, dataclasses.MISSING, {}) and 'help' not in spec:
            text += f' (default: {shown})'
        kwargs = {'dest': path, 'default': argparse.SUPPRESS, 'help': text, 'metavar': f.name.upper(),
                  **_arg_type(hints[f.name], spec)}
        kwargs.update({k: spec[k] for k in ('choices', 'metavar', 'nargs', 'const') if k in spec})
        if 'action' in kwargs or 'choices' in kwargs:
            kwargs.pop('metavar')
        parser.add_argument(*spec.get('flags', ('--' + f.name.replace('_', '-'),)), **kwargs)


def given_options(args: argparse.Namespace, kind: type, dest: str = '') -> dict[str, Any]:
    """The options of dataclass ``kind`` given on the command line (see :func:`add_dataclass_arguments`), nested."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(kind)
    for f in dataclasses.fields(kind):
        path = dest + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            sub = given_options(args, hints[f.name], path + '.')
            if sub:
                out[f.name] = sub
        elif hasattr(args, path):
            out[f.name] = getattr(args, path)
    return out


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in YAML file ``path``, parsed with ``yaml.safe_load`` (no object tags).

    Raises:
        ConfigError: the file is missing, not valid YAML, or not a mapping at the top level.
    """
    import yaml
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f'config file {path} not found')
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f'{path}: not valid YAML ({str(e).splitlines()[0]}); only plain YAML is accepted') from None
    if not isinstance(doc, dict):
        raise ConfigError(f'{path}: expected a mapping of options at the top level')
    return doc


def check_contained_out(out: Any, where: str, *, key: str = 'out_dir') -> None:
    """A config file may only name an output folder below the current one: a file from someone else must not make
    AMAP write (or, with ``overwrite``, delete its own stage folders) anywhere else. ``--out`` on the command line,
    typed by the user, may point anywhere.

    Raises:
        ConfigError: ``out`` (the value of ``key`` in the file ``where``) is absolute, starts with ``~`` or has ``..``.
    """
    if not isinstance(out, str) or not out.strip():
        raise ConfigError(f'{where}: {key} must be a folder name, got {out!r}')
    p = Path(out)
    if p.is_absolute() or p.expanduser() != p or '..' in p.parts:
        raise ConfigError(f'{where}: {key} {out!r} leaves the current folder; a config file may only name a folder '
                          f'below it (give --out on the command line to write elsewhere)')
