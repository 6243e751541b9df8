"""``python -m rankwise`` (and ``torchrun -m rankwise``) runs the command-line tool."""

import sys

from rankwise.cli import main

sys.exit(main())
