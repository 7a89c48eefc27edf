"""Command-line plumbing shared by every subcommand: one-line argument errors, typed values that
name what is allowed, and ``--debug`` accepted before or after the subcommand."""
from __future__ import annotations

import argparse
import math
import sys

from launcher.errors import BAD_INPUT, one_line


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) and exit with BAD_INPUT, and which
    never takes an abbreviation of an option (``--forc`` is not ``--force-resume``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"qhm-launch: error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(BAD_INPUT)


def _typed(name: str, convert, ok, allowed: str):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid; allowed: {allowed}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not valid; allowed: {allowed}")
        return value
    parse.__name__ = name
    return parse


positive_int = _typed("positive_int", int, lambda v: v >= 1, "an integer >= 1")
nonnegative_int = _typed("nonnegative_int", int, lambda v: v >= 0, "an integer >= 0")
positive_float = _typed("positive_float", float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
nonnegative_float = _typed("nonnegative_float", float, lambda v: math.isfinite(v) and v >= 0,
                           "a finite number >= 0")
# a training set beyond a trillion samples is a typo; the bounds' float arithmetic needs it finite too
sample_count = _typed("sample_count", int, lambda v: 1 <= v <= 10 ** 12, "an integer in [1, 10^12]")
def _node_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    low, high = int(low), int(high or low)
    if not 1 <= low <= high:
        raise ValueError(text)
    return low, high


# --nnodes N, or MIN:MAX (torchrun's elastic membership: the run goes on while at least MIN nodes are left)
node_range = _typed("node_range", _node_range, lambda v: True, "N or MIN:MAX, integers with 1 <= MIN <= MAX")
text = _typed("text", str, lambda v: v.isprintable() and v != "", "text without control characters")


def add_debug(parser) -> None:
    """``--debug`` on a subcommand too; SUPPRESS keeps the value given before the subcommand."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error instead of one line")
