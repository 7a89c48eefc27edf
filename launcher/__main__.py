import os
import sys

from launcher.cluster import supervise  # stdlib only: nothing heavy is imported before the signals are caught

if "RANK" in os.environ and "WORLD_SIZE" in os.environ:      # a worker: also arm its death signal
    supervise.arm_worker()
else:
    supervise.record_early_signals()

from launcher.cli.main import main  # noqa: E402

sys.exit(main())
