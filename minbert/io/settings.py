"""Settings declared once: the module that uses a group of settings declares them as a small dataclass, one field
per flag of train_multitask.py, made with :func:`setting` (its default, help, choices, range, and how the flag's
text is read). The flags are derived from these fields (:func:`add_arguments`, as Hugging Face's HfArgumentParser
derives its flags), and the same fields check a whole configuration (:func:`first_problem`), whether it came from
the command line, a ``--config`` file or Python.

A field made with :func:`group` holds another settings dataclass: with a title it is a group of flags in
``--help``, without one its flags sit in place among the enclosing group's. :func:`to_flat` / :func:`from_flat`
read and build the flat {flag: value} dict that args.json holds (flags in declaration order).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import types
import typing


def _integer(text: str, least: int) -> int:
    """An integer flag's value, at least ``least``."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < least:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}" if least == 1 else f"must be >= {least}, got {v}")
    return v


def positive_int(text: str) -> int:
    return _integer(text, 1)


def nonneg_int(text: str) -> int:
    return _integer(text, 0)


def nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def flag_reader(parse: typing.Callable) -> typing.Callable:
    """A flag's reader (argparse ``type=``) from a function that raises ValueError: the error's text becomes
    argparse's message (a plain ValueError would show as "invalid NAME value")."""
    def read(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    read.__name__ = getattr(parse, "__name__", "read")
    return read


def setting(default, *, help: str, choices=None, bounds: tuple | None = None, metavar: str | None = None,
            parse=None, nargs=None, const=None, allow_empty: bool = False):
    """A dataclass field that is also a flag ``--NAME``. ``choices``: the allowed values (the flag's choices, and
    checked in any configuration); ``bounds``: an inclusive (low, high) range, None for no bound (checked in any
    configuration; a low of 0 or 1 also makes the flag's reader refuse lower numbers at once); ``parse``: the
    flag's reader (argparse ``type=``), by default derived from the field's type and low bound; a bool field is an
    on/off flag; ``allow_empty``: an empty string is a value (else refused)."""
    meta = {"help": help, "choices": None if choices is None else tuple(choices), "bounds": bounds,
            "metavar": metavar, "parse": parse, "nargs": nargs, "const": const, "allow_empty": allow_empty}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def group(cls: type, title: str | None = None):
    """A field holding the settings dataclass ``cls`` (its defaults); ``title``: its flags' group in --help."""
    return dataclasses.field(default_factory=cls, metadata={"group": cls, "title": title})


@functools.cache
def leaves(cls: type) -> tuple[tuple[str, dataclasses.Field, type, tuple[str, ...]], ...]:
    """(name, field, owner class, path of group fields from ``cls`` to the owner) of every setting, in order."""
    out = []
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("group")
        if sub is None:
            out.append((f.name, f, cls, ()))
        else:
            out += [(n, g, owner, (f.name, *path)) for n, g, owner, path in leaves(sub)]
    return tuple(out)


def setting_names(cls: type) -> list[str]:
    return [name for name, *_ in leaves(cls)]


def owner_of(obj, name: str):
    """The settings object inside ``obj`` that holds the setting ``name`` (KeyError if none does)."""
    for leaf, _, _, path in leaves(type(obj)):
        if leaf == name:
            for step in path:
                obj = getattr(obj, step)
            return obj
    raise KeyError(name)


def to_flat(obj) -> dict:
    """{flag: value} of every setting, in declaration order (args.json)."""
    return {name: getattr(owner_of(obj, name), name) for name in setting_names(type(obj))}


def from_flat(cls: type, values: dict):
    """``cls`` built from a flat {flag: value} dict; settings it lacks keep their defaults. A key that is no
    setting of ``cls`` is a TypeError (a caller's mistake: users' keys are checked where they are read)."""
    unknown = [k for k in values if k not in setting_names(cls)]
    if unknown:
        raise TypeError(f"{cls.__name__} has no setting {', '.join(unknown)}")
    return _build(cls, values)


def _build(cls: type, values: dict):
    kwargs = {}
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("group")
        if sub is not None:
            kwargs[f.name] = _build(sub, values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def add_arguments(parser: argparse.ArgumentParser, cls: type, target=None) -> None:
    """Add a flag for every setting of ``cls`` to ``parser`` (``target``: the group the untitled ones go to)."""
    target = target or parser
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("group")
        if sub is not None:
            title = f.metadata["title"]
            add_arguments(parser, sub, parser.add_argument_group(title) if title else target)
        else:
            target.add_argument(f"--{f.name}", **_argument(f, hints[f.name]))


def _argument(f: dataclasses.Field, hint) -> dict:
    m = f.metadata
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    kwargs = {"default": default, "help": m["help"]}
    base = _types(hint)[0][0]  # a union's first type sets the reader: str for a path or its content
    if base is bool:
        return {**kwargs, "action": "store_true"}
    parse = m["parse"] or _reader(base, m["bounds"])
    if parse is not None:
        kwargs["type"] = parse
    kwargs.update({k: m[k] for k in ("choices", "metavar", "nargs", "const") if m[k] is not None})
    return kwargs


def _reader(base, bounds) -> typing.Callable | None:
    """The flag reader a number's type and low bound imply (the one rule: a bad number is refused when read)."""
    low = bounds[0] if bounds else None
    if base is int:
        return {1: positive_int, 0: nonneg_int}.get(low, int)
    if base is float:
        return nonneg_float if low == 0 else float
    return None


def _types(hint) -> tuple[tuple, bool]:
    """(the types a value may have, None aside; whether None is allowed): ``str | dict | None`` is ((str, dict),
    True); ``list[str]`` is ((list[str],), False)."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return (hint,), False
    args = typing.get_args(hint)
    return tuple(a for a in args if a is not type(None)), type(None) in args


def first_problem(obj) -> tuple[str, str, typing.Any] | None:
    """The first setting of ``obj`` whose value does not fit its field: (name, what is wrong, the value to show or
    None), or None. Types (null only where allowed, finite numbers, no empty strings) first, then ranges, then
    choices, each in declaration order."""
    found = [(name, f, owner, getattr(owner_of(obj, name), name)) for name, f, owner, _ in leaves(type(obj))]
    for name, f, owner, value in found:
        allowed, optional = _types(typing.get_type_hints(owner)[name])
        kinds = " or ".join(map(_kind, allowed))
        if value is None:
            if not optional:
                return name, f"expected {kinds}, got null", None
            continue
        if not any(_is_instance(value, t) for t in allowed):
            return name, f"expected {kinds}, got {value!r}", None
        if isinstance(value, float) and not math.isfinite(value):
            return name, f"must be a finite number, got {value}", None
        if isinstance(value, str) and not value.strip() and not f.metadata["allow_empty"]:
            return name, "must not be empty", None
    for name, f, _, value in found:
        bounds = f.metadata["bounds"]
        if bounds is None or value is None:
            continue
        low, high = bounds
        if (low is not None and value < low) or (high is not None and value > high):
            bound = (f"in [{low}, {high}]" if low is not None and high is not None
                     else f">= {low}" if low is not None else f"<= {high}")
            return name, f"must be {bound}, got {value}", None
    for name, f, _, value in found:
        choices = f.metadata["choices"]
        if choices is not None and value not in choices:
            return name, f"choose from {', '.join(choices)}", value
    return None


def _is_instance(value, base) -> bool:
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        return isinstance(value, list) and all(_is_instance(v, item) for v in value)
    return isinstance(value, base)


def _kind(base) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a JSON object"}
    if typing.get_origin(base) is list:
        return "a list of strings"
    return names.get(base, getattr(base, "__name__", str(base)))
