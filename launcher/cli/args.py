"""Command-line plumbing shared by every subcommand: one-line argument errors, typed values that
name what is allowed, and ``--debug`` accepted before or after the subcommand."""
from __future__ import annotations

import argparse
import math
import sys

from launcher.errors import BAD_INPUT, one_line
from launcher.limits import MAX_NODES


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
    if not 1 <= low <= high <= MAX_NODES:
        raise ValueError(text)
    return low, high


node_count = _typed("node_count", int, lambda v: 1 <= v <= MAX_NODES, f"an integer in [1, {MAX_NODES}]")
# --nnodes N, or MIN:MAX (torchrun's elastic membership: the run goes on while at least MIN nodes are left)
node_range = _typed("node_range", _node_range, lambda v: True,
                    f"N or MIN:MAX, integers with 1 <= MIN <= MAX <= {MAX_NODES}")


def _endpoint(text: str) -> str:
    host, _, port = text.strip().rpartition(":")
    if not host or any(c.isspace() for c in host) or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(text)
    return text.strip()


# torchrun's c10d rendezvous settings (torch.distributed.elastic.rendezvous): seconds, counts, a flag, a store
RDZV_SECONDS = ("join_timeout", "last_call_timeout", "close_timeout", "heartbeat_timeout", "read_timeout",
                "keep_alive_interval", "timeout")
RDZV_ALLOWED = (f"KEY=VALUE,... with KEY one of {', '.join(RDZV_SECONDS)} (seconds, 1 to 86400), "
                "keep_alive_max_attempt (1 to 1000), is_host (true|false), store_type (tcp|file)")


def _rdzv_conf(text: str) -> str:
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep:
            raise ValueError(text)
        if key in RDZV_SECONDS or key == "keep_alive_max_attempt":
            if not value.isdigit() or not 1 <= int(value) <= (86400 if key in RDZV_SECONDS else 1000):
                raise ValueError(text)
        elif key == "is_host":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
        elif key != "store_type" or value.lower() not in ("tcp", "file"):
            raise ValueError(text)
    return text


endpoint = _typed("endpoint", _endpoint, lambda v: True, "HOST:PORT, a host name or address and a port 1 to 65535")
rdzv_conf = _typed("rdzv_conf", _rdzv_conf, lambda v: True, RDZV_ALLOWED)
text = _typed("text", str, lambda v: v.isprintable() and v != "", "text without control characters")


def add_debug(parser) -> None:
    """``--debug`` on a subcommand too; SUPPRESS keeps the value given before the subcommand."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error instead of one line")
