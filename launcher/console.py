"""The entry point of ``qhm-launch`` (the console script) and of ``python -m launcher``: the signals a
run may take as preemption are caught first, and only then is the CLI imported (torch: seconds), so a
SIGTERM during start-up is a preemption (exit 75), never a death (143). Stdlib only up to that import."""
import os

from launcher import env
from launcher.cluster import supervise


def main() -> int:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:      # a worker: also arm its death signal
        supervise.arm_worker()
        from launcher.cli.main import main as cli_main
        return cli_main()
    env.record_early_signals()
    try:
        from launcher.cli.main import main as cli_main
        return cli_main()
    except BrokenPipeError:
        # the reader went away (`qhm-launch plan --json | head -1`): nothing more to say, and nothing to
        # say it to; stdout points at /dev/null so the interpreter's last flush does not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        return 141                          # 128 + SIGPIPE, as a shell reports a pipe's writer killed by it
    finally:
        # a user's factory, called here by the checks before any worker, may have started processes
        # (``subprocess.Popen``), and what the workers left behind came here (the launcher is their
        # subreaper): all end with the command
        supervise.end_children()
