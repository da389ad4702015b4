"""`python -m epp.sim` is `epp-sim`."""

import sys

from epp.sim.cli import main

sys.exit(main())
