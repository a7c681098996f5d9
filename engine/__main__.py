"""`python -m engine`: the `neox-distill` command without its installed script."""

import sys

from engine.cli import main

sys.exit(main())
