"""Config values checked against their declared types when a config is built, whatever the source (Python, YAML,
command line): a bad value stops with the field's name instead of failing later, deep inside training.

Rules for fields declared ``int``, ``float``, ``bool`` or ``str`` (optionally ``| None``); other declarations (unions,
enums, lists, dicts) are left to their own checks:

* ``int``: an int; a float with an integral value (``3.0``) is converted; ``2.5``, strings and booleans are errors;
* ``float``: an int or a float (ints are accepted as they are); a string such as ``"3e-3"`` is an error (YAML 1.1
  reads ``3e-3`` without a dot as a string; write ``3.0e-3``);
* ``bool``: a bool only; ``str``: a str only.
"""

from __future__ import annotations

import dataclasses
import numbers
import types
import typing


def _simple_type(annotation) -> tuple[type, bool] | None:
    """(int|float|bool|str, whether None is allowed) for simple declarations; None for anything else."""
    if annotation in (int, float, bool, str):
        return annotation, False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and args[0] in (int, float, bool, str) and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return None


def _hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved here: check what can be
        return {}


def check_field_types(config) -> None:
    """Check (and convert integral floats of) every simply-typed field of the dataclass `config`; raise TypeError /
    ValueError naming the field."""
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        declared = _simple_type(hints.get(f.name))
        if declared is None:
            continue
        kind, optional = declared
        value = getattr(config, f.name)
        if value is None:
            if not optional and f.default is not None:
                raise TypeError(f"{f.name} must be a {kind.__name__}, got None")
            continue
        name = type(value).__name__
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError(f"{f.name} must be true or false, got {name} {value!r}")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{f.name} must be an integer, got {name} {value!r}")
            if not isinstance(value, int):  # numpy integers, integral floats: converted; 2.5: refused
                if not float(value).is_integer():
                    raise ValueError(f"{f.name} must be an integer, got {value!r}")
                setattr(config, f.name, int(value))
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                hint = " (in YAML write a number with a dot, e.g. 3.0e-3: 3e-3 is read as a string)" if isinstance(
                    value, str) else ""
                raise TypeError(f"{f.name} must be a number, got {name} {value!r}{hint}")
        elif kind is str and not isinstance(value, str):
            raise TypeError(f"{f.name} must be a string, got {name} {value!r}")
