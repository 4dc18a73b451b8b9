"""`python -m nestlearn.cli`: the `nestlearn` command (torchrun runs it this way)."""

import sys

from . import main

sys.exit(main())
