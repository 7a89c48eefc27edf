"""Loading: YAML (read safely by :mod:`launcher.config.yamlfile`) and ``--set KEY.PATH=VALUE`` overrides
into the typed dataclasses, with the key path in every error; then :func:`validate.validate`."""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from launcher import keys
from launcher.config import yamlfile
from launcher.config.schema import MAX_INT, Recipe
from launcher.config.validate import validate
from launcher.errors import RecipeError


def _describe(tp) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is list:
        return "a list"
    if tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _named_class(classes: list, value: dict, path: str):
    """The dataclass a mapping stands for: the one whose ``name`` default its ``name`` key gives (a model
    family's settings), else the one that has every key it gives (a factory's spec), else the most of them."""
    names = {f.default: t for t in classes for f in dataclasses.fields(t) if f.name == "name"}
    if "name" in value:
        if not isinstance(value["name"], str) or value["name"] not in names:
            raise RecipeError(f"{path}.name: {value['name']!r} is not valid; allowed: {' | '.join(map(str, names))}")
        return names[value["name"]]

    def fields(t) -> set:
        return {f.name for f in dataclasses.fields(t)}
    fitting = [t for t in classes if set(value) <= fields(t)]
    return fitting[0] if len(fitting) == 1 else max(reversed(classes), key=lambda t: len(set(value) & fields(t)))


def _coerce(value, tp, path: str):
    origin = typing.get_origin(tp)
    if origin is typing.Union:                       # Optional[X], or X | Y: the first type that takes it
        inner = [t for t in typing.get_args(tp) if t is not type(None)]
        if value is None and type(None) in typing.get_args(tp):
            return None
        if isinstance(value, dict):                  # a mapping: the dataclass it names, or whose fields it gives
            classes = [t for t in inner if dataclasses.is_dataclass(t)]
            if len(classes) > 1:
                return _build(_named_class(classes, value, path), value, path)
        for i, t in enumerate(inner):
            try:
                return _coerce(value, t, path)
            except RecipeError:
                if i == len(inner) - 1:
                    raise RecipeError(f"{path}: {value!r} is not valid; allowed: "
                                      + " or ".join(_describe(t) for t in inner)) from None
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is float and isinstance(value, str):
        value = _number(value)                       # PyYAML reads 1e-3 (no dot) as a string
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          list: lambda v: isinstance(v, list),
          dict: lambda v: isinstance(v, dict)}[tp](value)
    if not ok:
        raise RecipeError(f"{path}: {value!r} is not valid; allowed: {_describe(tp)}")
    if tp is float and not math.isfinite(value):
        raise RecipeError(f"{path}: {value!r} is not valid; allowed: a finite number")
    if tp is int and abs(value) > MAX_INT:
        raise RecipeError(f"{path}: {value!r} is not valid; allowed: an integer of at most {MAX_INT}")
    if tp is str and not value.isprintable():
        raise RecipeError(f"{path}: {value!r} is not valid; allowed: text without control characters")
    return float(value) if tp is float else value


def _number(text: str):
    """A number written the way a person types one ("1e-3", "2.5E2"); the text itself otherwise."""
    try:
        return float(text.strip())
    except ValueError:
        return text


def _build(cls, data, path: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path or 'recipe'}: {data!r} is not valid; allowed: a mapping of "
                          + ", ".join(f.name for f in dataclasses.fields(cls)))
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            raise RecipeError(f"{where}: unknown key; allowed keys here: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {text!r}: not valid; allowed: KEY.PATH=VALUE, e.g. schedule.lr.max=0.05")
    try:
        value = yamlfile.parse(raw, f"--set {key}") if raw.strip() else None
    except yamlfile.NotYAML:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides or []:
        path, value = _parse_override(text)

        def conflict(prefix, node, path=".".join(path)):  # noqa: B008 - bound to this override's path
            raise RecipeError(f"{prefix}: {node!r} is not a mapping; cannot set {path}")
        keys.set_(data, ".".join(path), value, on_conflict=conflict)
    return data


def from_dict(data: dict, overrides: Optional[list[str]] = None) -> Recipe:
    data = apply_overrides(json.loads(json.dumps(data or {}, default=str)), overrides or [])
    return validate(_build(Recipe, data, ""))


def load(path: str | Path, overrides: Optional[list[str]] = None) -> Recipe:
    return from_dict(yamlfile.load(path, "recipe"), overrides)


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
