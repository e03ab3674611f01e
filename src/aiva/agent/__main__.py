"""Entry point when the agent directory is run as ``python3 DIR``."""

import sys

try:
    from .server import main
except ImportError:  # run as a directory, not as a package
    from server import main  # type: ignore[no-redef]

sys.exit(main())
