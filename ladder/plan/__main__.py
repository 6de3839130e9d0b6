"""`python -m ladder.plan ...`: `ladder plan` without the other subcommands' imports."""

import sys

from ladder.plan.cli import main

sys.exit(main())
