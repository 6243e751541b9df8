"""``python -m rankwise`` (and ``torchrun -m rankwise``) runs the command-line tool."""

from rankwise.cli import entry

entry()
