"""The user's own model, data and loss, named by import path ("package.module:callable").

Each is resolved -- imported and called -- in the launcher process before any worker starts, so every
way it can fail is one line naming the key (model.factory, data.factory, loss.factory) and the value:
the module is not found, the attribute is missing or not callable, the call raises (the user's own
error, in one line; --debug for the traceback), or it returns the wrong kind of object. Workers import
the same path: the launcher puts the working directory on PYTHONPATH for them (torchrun, DeepSpeed's
launcher and the generated Slurm script alike).
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable

from launcher.errors import UserError, one_line


def importable_from_cwd() -> None:
    """A console script does not put the working directory on sys.path; ``python -m`` does. Make both
    see the user's own packages, here and in every process started from here."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if cwd not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([cwd] + parts)


def resolve(key: str, path: str) -> Callable:
    """The callable at ``path`` ("module.sub:attribute"), or a one-line UserError naming ``key``."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise UserError(f"{key}: {path!r} is not valid; allowed: 'package.module:callable'")
    importable_from_cwd()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        where = [os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != os.getcwd()]
        raise UserError(f"{key}: {path!r} is not valid; allowed: an importable module ({one_line(exc)}; looked in the "
                        f"working directory and PYTHONPATH: {os.pathsep.join(where)}, then the installed packages)") from None
    except Exception as exc:  # the user's module failed while importing: say so in one line
        raise UserError(f"{key}: importing {module_name!r} raised {type(exc).__name__}: {one_line(exc)}") from exc
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UserError(f"{key}: {path!r} is not valid; module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"{key}: {path!r} is not valid; {attribute!r} is a {type(target).__name__}, not callable")
    return target


WAIT_NOTE_S = 30.0          # a factory still running after this long is said to be awaited (once)


def call(key: str, path: str, kwargs: dict, *args):
    """Resolve and call; the user's own error becomes one line (the traceback stays with --debug). A
    factory that takes long (a dataset on a slow file system, a hung mount) is named after
    :data:`WAIT_NOTE_S` seconds, so a silent start is never a mystery."""
    import threading
    import time
    factory = resolve(key, path)
    started = time.monotonic()

    def note():
        if os.environ.get("RANK", "0") == "0":
            print(f"qhm-launch: still waiting for {key} {path!r} to return ({time.monotonic() - started:.0f} s so far; "
                  "Ctrl-C stops)", file=sys.stderr, flush=True)
    timer = threading.Timer(WAIT_NOTE_S, note)
    timer.daemon = True
    timer.start()
    try:
        return factory(*args, **kwargs)
    except (SystemExit, KeyboardInterrupt) as exc:    # an argparse or sys.exit() inside the user's code
        raise UserError(f"{key}: {path!r} raised {type(exc).__name__}({one_line(exc)}) instead of returning; "
                        "allowed: a factory that returns (a command-line parser or sys.exit in it ends the run "
                        "as if it had succeeded)") from exc
    except Exception as exc:  # reported in one line, chained for --debug
        raise UserError(f"{key}: {path!r} raised {type(exc).__name__}: {one_line(exc)}") from exc
    finally:
        timer.cancel()


def field(obj, name: str, default=None):
    """``obj.name`` or ``obj[name]``: a data factory may return an object, a namespace or a dict."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)
