"""``python -m handoff``."""

from handoff.cli import main

main()
