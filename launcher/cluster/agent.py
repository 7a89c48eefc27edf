"""torchrun's agent as the launcher starts it: ``python -m launcher.cluster.agent <torchrun arguments>``.

The same agent (torch.distributed.run), with one change: when a worker ends without reporting its own
failure (killed by a signal, the out-of-memory killer's SIGKILL above all, or an exit status of its own),
torchrun prints a ``ChildFailedError`` block of some 40 lines and the surviving ranks, which meet the
dead one's closed sockets in a collective, blame themselves ("Connection reset by peer"). Here the
agent writes what it knows instead, the rank, PID, exit status and signal of the first worker to fail,
into the launcher's note (:data:`launcher.env.AGENT_NOTE`), and exits 1 in silence; the launcher turns
the note into one line and the run folder's failed.json.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys

from launcher import env


def main(argv: list[str]) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    # its "failed (exitcode: -9) ..." and "Sending process ... closing signal" lines: said by the launcher
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        note = {"rank": rank, "pid": failure.pid, "exitcode": failure.exitcode, "host": socket.gethostname(),
                "signal": failure.signal_name() if failure.exitcode < 0 else None}
        path = os.environ.get(env.AGENT_NOTE)
        if path is None:
            raise
        with open(path, "w") as out:
            json.dump(note, out)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
