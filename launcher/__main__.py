import os
import sys

if "RANK" in os.environ and "WORLD_SIZE" in os.environ:      # a worker: arm before any heavy import
    from launcher.supervise import arm_worker
    arm_worker()

from launcher.cli import main  # noqa: E402

sys.exit(main())
