"""The launcher's layers, lowest first: a module imports only from its own layer or lower ones, so the
folders show the architecture and no import cycle can form between layers."""
import ast
from pathlib import Path

import launcher

LAYERS = ["errors", "limits", "keys", "env", "run", "models", "engines", "config", "data", "train", "cluster", "cli"]
ROOT = Path(launcher.__file__).parent


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "launcher" or len(parts) < 2:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def launcher_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            yield from (((f"{base}.{a.name}" if base == "launcher" else base), node.lineno) for a in node.names)
        elif isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names)


def test_every_module_belongs_to_a_layer():
    stray = [p.name for p in ROOT.iterdir() if p.suffix == ".py" and p.stem not in LAYERS + ["__init__", "__main__", "console"]]
    stray += [p.name for p in ROOT.iterdir() if p.is_dir() and p.name not in LAYERS + ["__pycache__"]]
    assert stray == [], f"modules outside the layers: {stray}"


def test_no_module_imports_from_a_higher_layer():
    upward = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        own = layer_of(".".join(rel.parts))
        if own is None:
            continue                           # launcher/__init__, __main__, console: the entry points
        for module, line in launcher_imports(path):
            other = layer_of(module)
            if other is not None and other > own:
                upward.append(f"{rel}:{line} imports {module}")
    assert upward == []


def test_the_relative_import_form_is_not_used():
    """Absolute imports only: a layer's name is in every import line, which is what the test above reads."""
    relative = [f"{p.relative_to(ROOT.parent)}:{n.lineno}" for p in ROOT.rglob("*.py")
                for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ImportFrom) and n.level > 0]
    assert relative == []


def test_no_modules_import_each_other_in_a_circle():
    """Inside a layer too: a circle of imports between modules (a function-level import counts: it only
    delays the circle) means two modules that are one, or a piece in the wrong one. A package's
    ``__init__`` re-exporting its modules is how a package is made: not a node here; an import only a type
    checker runs (``if TYPE_CHECKING:``) is no edge."""
    graph = {}
    for path in ROOT.rglob("*.py"):
        if path.name == "__init__.py":
            continue
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = set()
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
        for node in ast.walk(tree):       # "from launcher.train import build": build
            if id(node) in typing_only:
                continue
            names = ([node.module] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for module in names:
                if module.startswith("launcher.") and module != name and \
                        (ROOT.parent / Path(*module.split("."))).with_suffix(".py").exists():
                    graph[name].add(module)
    circles = set()

    def visit(node, trail):
        for nxt in graph.get(node, ()):
            if nxt in trail:
                circles.add(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif len(trail) < 8:
                visit(nxt, trail + [nxt])
    for start in graph:
        visit(start, [start])
    assert sorted(circles) == []


def _compared_strings(tree):
    """(string, line) of every string constant an ``==``, ``!=``, ``in`` or ``not in`` compares with."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                items = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                for item in items:
                    if isinstance(item, ast.Constant) and isinstance(item.value, str):
                        yield item.value, node.lineno


def test_no_engine_name_is_compared_outside_the_engines():
    """An engine is one module of launcher/engines/ and one registry line: a name compared elsewhere (there
    were 14) is engine-specific behaviour living outside its engine."""
    from launcher.engines import NAMES
    found = [f"{path.relative_to(ROOT.parent)}:{line} {name!r}"
             for path in ROOT.rglob("*.py") if "engines" not in path.relative_to(ROOT).parts
             for name, line in _compared_strings(ast.parse(path.read_text())) if name in NAMES]
    assert found == [], f"engine names compared outside launcher/engines: {found}"


def test_every_sub_package_and_module_appears_in_the_layer_table_of_the_development_docs():
    """docs/development.md's table is how a newcomer finds a concept's home: a package it does not name (the
    table once said "DDP and DeepSpeed" and missed whole layers) is a stale map."""
    text = (ROOT.parent / "docs" / "development.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| `")]
    named = " ".join(line.split("|")[1] for line in table)
    missing = [name for name in LAYERS if f"`{name}/`" not in named and f"`{name}.py`" not in named]
    assert missing == [], f"layers missing from docs/development.md's table: {missing}"


def test_no_model_name_is_compared_outside_the_model_families():
    """A model family is one module of launcher/models/ and one registry line: `== "gpt"` in three modules
    was the GPT's behaviour living outside it."""
    from launcher.models import NAMES
    found = [f"{path.relative_to(ROOT.parent)}:{line} {name!r}"
             for path in ROOT.rglob("*.py") if "models" not in path.relative_to(ROOT).parts[:1]
             for name, line in _compared_strings(ast.parse(path.read_text())) if name in NAMES]
    assert found == [], f"model names compared outside launcher/models: {found}"


# a model family's module defines what the registry reads by fixed names (its Settings)
PER_FAMILY = {"Settings"}


def test_no_two_classes_share_a_name():
    """One name, one thing: two ``Segment`` classes (qhm's steps at one batch, an elastic chain's job) were
    once read as the same; qhm's is now ``Span``."""
    where: dict[str, list[str]] = {}
    for root in (ROOT, ROOT.parent / "qhm"):
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and node.name not in PER_FAMILY:
                    where.setdefault(node.name, []).append(str(path.relative_to(ROOT.parent)))
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}


def test_the_launchers_own_batch_kinds_are_not_compared_outside_their_module():
    """A batch kind the launcher adds to qhm's (adaptive: decided while training; warmup_from: resolved from
    branches) carries its behaviour in launcher/config/batch_kinds.py: `== "adaptive"` stood in 8 modules."""
    import qhm
    from launcher.config.batch_kinds import KINDS
    own = set(KINDS) - set(qhm.schedules.BATCH_KINDS)
    assert own == {"adaptive", "warmup_from"}
    found = [f"{path.relative_to(ROOT.parent)}:{line} {name!r}"
             for path in ROOT.rglob("*.py") if path.name != "batch_kinds.py"
             for name, line in _compared_strings(ast.parse(path.read_text())) if name in own]
    assert found == [], f"batch kinds compared outside launcher/config/batch_kinds.py: {found}"
