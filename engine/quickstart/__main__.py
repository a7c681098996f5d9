"""`python -m engine.quickstart [--config FILE] [--out-dir DIR] [--tiny]`."""

import sys

from engine.quickstart.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
