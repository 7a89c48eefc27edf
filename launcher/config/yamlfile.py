"""YAML from users, read safely: a size limit, UTF-8, no alias expansion beyond a small limit, no
duplicate keys, and every problem one line. ``yaml.safe_load`` alone builds a 342-byte alias bomb into
gigabytes and lets a repeated key silently win."""
from __future__ import annotations

from pathlib import Path

import yaml

from launcher.errors import UserError, one_line

MAX_BYTES = 1 << 20               # a recipe or sweep is a few kilobytes; one of a megabyte is a mistake
MAX_NODES = 100_000               # values after expanding aliases


class NotYAML(UserError):
    """The text does not parse as YAML at all."""


def load(path, what: str):
    """The YAML document in file ``path`` (``what``: how the error names it, e.g. "recipe")."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: {str(path)!r} is not a file")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise UserError(f"{what}: {str(path)!r} has {size} bytes; allowed: at most {MAX_BYTES}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what}: {str(path)!r} is not UTF-8 text (byte {exc.start}); allowed: a UTF-8 YAML file") \
            from None
    except OSError as exc:
        raise UserError(f"{what}: {str(path)!r} cannot be read ({exc.strerror})") from None
    return parse(text, f"{what}: {str(path)!r}")


def parse(text: str, where: str):
    """The YAML document in ``text``; ``where`` names it in errors."""
    if len(text) > MAX_BYTES:
        raise UserError(f"{where} has {len(text)} characters; allowed: at most {MAX_BYTES}")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)     # a graph: aliases are not expanded here
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise NotYAML(f"{where} is not valid YAML{at}: {one_line(getattr(exc, 'problem', None) or exc)}") from None
    if node is None:
        return None
    _check(node, where)
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    except yaml.YAMLError as exc:     # a tag the safe loader does not build (!!python/object/apply: ...)
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise NotYAML(f"{where} is not valid{at}: {one_line(getattr(exc, 'problem', None) or exc)}; allowed: "
                      "plain YAML values (no tags)") from None
    finally:
        loader.dispose()


def _check(root, where: str) -> None:
    """Refuse duplicate keys, recursive aliases, and documents that expand to more than MAX_NODES."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def expanded(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            raise UserError(f"{where}: a recursive alias at line {node.start_mark.line + 1}; allowed: aliases "
                            "that refer to complete values")
        visiting.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    if k.value in seen:
                        raise UserError(f"{where}: key {k.value!r} appears twice (lines {seen[k.value]} and "
                                        f"{k.start_mark.line + 1}); allowed: each key once")
                    seen[k.value] = k.start_mark.line + 1
                total += expanded(k) + expanded(v)
                if total > MAX_NODES:
                    break
        elif isinstance(node, yaml.SequenceNode):
            for v in node.value:
                total += expanded(v)
                if total > MAX_NODES:
                    break
        visiting.discard(key)
        if total > MAX_NODES:
            raise UserError(f"{where} expands to more than {MAX_NODES} values (aliases); allowed: at most "
                            f"{MAX_NODES}")
        sizes[key] = total
        return total

    expanded(root)
