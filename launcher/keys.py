"""Dotted key paths over nested mappings: ``schedule.lr.max`` <-> ``{"schedule": {"lr": {"max": ...}}}``."""
from __future__ import annotations

from typing import Any, Iterator

MISSING = object()


def get(tree: dict, path: str, default: Any = None) -> Any:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def has(tree: dict, path: str) -> bool:
    return get(tree, path, MISSING) is not MISSING


def set_(tree: dict, path: str, value: Any, on_conflict=None) -> None:
    """Set ``path`` to ``value``, creating the mappings on the way. ``on_conflict(prefix, node)`` is
    called (and should raise) where a non-mapping stands in the way; without it, it is replaced."""
    parts = path.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            if child is not None and on_conflict is not None:
                on_conflict(".".join(parts[:i + 1]), child)
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def flatten(tree: dict, prefix: str = "") -> dict:
    """{dotted path: leaf value} for every leaf (a non-mapping, or an empty mapping)."""
    return dict(_leaves(tree, prefix))


def _leaves(tree: dict, prefix: str) -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            yield from _leaves(value, path)
        else:
            yield path, value
