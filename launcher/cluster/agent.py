"""torchrun's agent as the launcher starts it: ``python -m launcher.cluster.agent <torchrun arguments>``.

The same agent (torch.distributed.run), with one change: when a worker ends without reporting its own
failure (killed by a signal, the out-of-memory killer's SIGKILL above all, or an exit status of its own),
torchrun prints a ``ChildFailedError`` block of some 40 lines and the surviving ranks, which meet the
dead one's closed sockets in a collective, blame themselves ("Connection reset by peer"). Here the
agent writes what it knows instead, the rank, PID, exit status and signal of the first worker to fail,
into the launcher's note (:data:`launcher.env.AGENT_NOTE`), and exits 1 in silence; the launcher turns
the note into one line and the run folder's failed.json. A rendezvous that fails (its store's node lost)
is such a note too, and a restart of the workers (elastic membership) kills them at once.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys

from launcher import env
from launcher.cluster.supervise import GATE


def main(argv: list[str]) -> int:
    # c10d's C++ warnings (a lost store's peer: 40 lines of stack frames each) are said in one line by the
    # launcher; read when torch loads, inherited by the workers (errors still print)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    # its "failed (exitcode: -9) ..." and "Sending process ... closing signal" lines: said by the launcher
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.elastic.rendezvous.dynamic_rendezvous").setLevel(logging.CRITICAL)
    _end_workers_at_once_on_a_restart()
    if argv[:1] == [GATE]:                    # started ahead of the launcher's checks: what to run, once they pass
        told = sys.stdin.read()
        if not told:
            return 0
        message = json.loads(told)
        os.environ.clear()
        os.environ.update(message["env"])
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")     # for the workers, as above
        argv = message["argv"]
    try:
        torchrun.run(torchrun.parse_args(argv))
    except RendezvousError as exc:            # the rendezvous' store is gone (its node lost), or it timed out
        _write_note({"rendezvous": f"{type(exc).__name__}: {exc}".split("\n")[0][:300], "host": socket.gethostname()})
        return 1
    except ChildFailedError as exc:
        # a worker killed by a signal is the cause; its peers' exits (closed sockets) the consequence, and
        # the agent may see both in one poll, where "first" is a tie (under load, the peer was named)
        rank, failure = min(exc.failures.items(), key=lambda item: (item[1].exitcode >= 0, item[1].timestamp, item[0]))
        note = {"rank": rank, "pid": failure.pid, "exitcode": failure.exitcode, "host": socket.gethostname(),
                "signal": failure.signal_name() if failure.exitcode < 0 else None}
        if not _write_note(note):
            raise
        return 1
    return 0


def _write_note(note: dict) -> bool:
    """``note`` into the launcher's note file; False without a launcher (torchrun run by hand)."""
    path = os.environ.get(env.AGENT_NOTE)
    if path is None:
        return False
    with open(path, "w") as out:
        json.dump(note, out)
    return True


def _end_workers_at_once_on_a_restart() -> None:
    """torchrun restarts the workers (a node lost or joining) by sending them SIGTERM and waiting 30 s. To a
    worker here SIGTERM is a preemption: it announced a stop that never came ("preempted" with no
    preemption) while a worker blocked on a lost peer could not act on it, and the agent waited the 30 s
    each round. A restart resumes from the newest checkpoint anyway: the workers are killed at once."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    def stop_workers(self, worker_group) -> None:
        self._shutdown(death_sig=signal.SIGKILL)
    LocalElasticAgent._stop_workers = stop_workers


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
