"""Model families: each one module that owns everything about it, and :data:`FAMILIES` names them.

A family module has ``NAMES`` (the ``model`` names it builds), ``Settings`` (its dataclass, chosen by the
mapping's ``name`` key; None: named by a string alone), ``LANGUAGE_MODEL`` (its loss is per token),
``SHARD_UNITS`` (the module classes FSDP wraps one by one), ``check(recipe)`` (its recipe checks),
``build(settings or name, shape, classes or vocabulary)`` and, where known, ``flops_per_token(module)``.
Nothing outside this package compares a model's name (tests/launcher/test_layers.py). Adding a family: one
module, one line below.
"""
from __future__ import annotations

from types import ModuleType

from launcher.models import gpt, llama, vision

FAMILIES = (vision, gpt, llama)
NAMES = tuple(name for family in FAMILIES for name in family.NAMES)


def family_of(model) -> ModuleType | None:
    """The family of ``model`` (a recipe's: a name, a family's settings, or a factory's spec: None)."""
    name = model if isinstance(model, str) else getattr(model, "name", None)
    return next((family for family in FAMILIES if name in family.NAMES), None)


def settings_for(name: str):
    """The settings class of the family that builds ``name`` (None: a name alone, or no such family)."""
    family = family_of(name)
    return None if family is None else family.Settings


def language_model(model) -> bool:
    family = family_of(model)
    return family is not None and family.LANGUAGE_MODEL


def shard_units(model) -> tuple[str, ...]:
    family = family_of(model)
    return () if family is None else family.SHARD_UNITS


def flops_per_token(model, module) -> float | None:
    """Training FLOPs per token of the built ``module`` of ``model``, where its family counts them (MFU); a
    factory's module may say them itself, as an attribute or method ``flops_per_token`` (a number > 0)."""
    family = family_of(model)
    if family is None:
        given = getattr(module, "flops_per_token", None)
        given = given() if callable(given) else given
        return float(given) if isinstance(given, (int, float)) and not isinstance(given, bool) and given > 0 else None
    count = getattr(family, "flops_per_token", None)
    return None if count is None else float(count(module))


def checkpoint_activations(model, module) -> None:
    """performance.activation_checkpointing: each block of the built ``module`` recomputes its activations in
    the backward pass (a family whose model has ``checkpointing``; the recipe was checked: :func:`check`)."""
    module.checkpointing = True


def check(recipe) -> None:
    family = family_of(recipe.model)
    if family is not None:
        family.check(recipe)
    if recipe.performance.activation_checkpointing and not getattr(family, "ACTIVATION_CHECKPOINTING", False):
        from launcher.errors import RecipeError
        able = " | ".join(names_with("ACTIVATION_CHECKPOINTING"))
        raise RecipeError(f"performance.activation_checkpointing: true is not valid with model {named(recipe.model)}; "
                          f"allowed: false, or a built-in model with blocks ({able})")


def names_with(part: str) -> list[str]:
    """The model names whose family has ``part`` (a flag set true, or a function: ``to_hf``)."""
    return [name for f in FAMILIES if getattr(f, part, False) for name in f.NAMES]


def named(model) -> str:
    """A recipe's model as a one-line error names it: 'gpt', or "from model.factory"."""
    name = model if isinstance(model, str) else getattr(model, "name", None)
    return repr(name) if name else "from model.factory"
