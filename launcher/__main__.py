import sys

from launcher.console import main

sys.exit(main())
