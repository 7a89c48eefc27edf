"""Amounts in a schedule's units: ``500``, ``"2.5K"``, ``"10M tokens"``, ``"2B"``, ``"300 steps"``.

A number, or a string of a number with an optional K/M/B/T suffix (10^3, 10^6, 10^9, 10^12, as
Megatron-LM writes its batch-schedule thresholds) and an optional unit word (epoch, step, sample,
token, singular or plural). The value must come out a whole count; each mistake is one
:class:`RecipeError` naming the key, the value and what is allowed.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

import qhm

from launcher.errors import RecipeError

UNITS = qhm.schedules.UNITS
SUFFIXES = {"K": 10 ** 3, "M": 10 ** 6, "B": 10 ** 9, "T": 10 ** 12}
WORDS = {**{u: u for u in UNITS}, **{u + "s": u for u in UNITS}}
_FORM = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*([A-Za-z]*)\s*")
FORM = "a whole number, or text such as '2.5K', '10M tokens', '2B', '500 steps' (suffixes K M B T)"


def parse(path: str, value, unit: str | None, minimum: int = 1) -> tuple[str | None, int]:
    """(unit, count) of ``value`` at key ``path``: the unit it names, else ``unit`` (the schedule's);
    ``minimum`` the smallest count allowed."""
    named, count = None, None
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        count = value
    elif isinstance(value, float):
        count = int(value) if value.is_integer() else None
    elif isinstance(value, str):
        named, count = _text(path, value)
    if count is None:
        whole = " (a fraction of an epoch: schedule.unit step, sample or token)" if unit == "epoch" else ""
        raise RecipeError(f"{path}: {value!r} is not valid; allowed: {FORM}{whole}")
    if count < minimum:
        raise RecipeError(f"{path}: {value!r} is not valid; allowed: {FORM}, at least {minimum}")
    return named or unit, count


def _text(path: str, text: str) -> tuple[str | None, int | None]:
    match = _FORM.fullmatch(text)
    if match is None:
        raise RecipeError(f"{path}: {text!r} is not valid; allowed: {FORM}")
    number, first, word = match.groups()
    if first[:1] in SUFFIXES and first[1:] in WORDS and not word:      # "10Mtokens"
        first, word = first[:1], first[1:]
    suffix = first if first in SUFFIXES else ""
    if not suffix and first:
        if word or len(first) == 1:
            raise RecipeError(f"{path}: {text!r} is not valid; {first!r} is no suffix; allowed: "
                              f"{' '.join(SUFFIXES)} (then a unit: {', '.join(UNITS)})")
        word = first
    if word and word not in WORDS:
        raise RecipeError(f"{path}: {text!r} is not valid; {word!r} is no unit; allowed: {', '.join(UNITS)} "
                          f"(after a suffix {' '.join(SUFFIXES)})")
    try:
        exact = Decimal(number) * SUFFIXES.get(suffix, 1)
    except InvalidOperation:
        return None, None
    if exact != exact.to_integral_value():
        return WORDS.get(word), None
    return WORDS.get(word), int(exact)


def in_unit(path: str, value, unit: str, minimum: int = 1) -> int:
    """The count of ``value``, which must be in ``unit`` (a unit it names must be that one)."""
    named, count = parse(path, value, unit, minimum)
    if named != unit:
        raise RecipeError(f"{path}: {value!r} is in {named}s, the schedule in {unit}s; allowed: one unit per "
                          f"schedule (schedule.unit: {named}, or a count in {unit}s)")
    return count
