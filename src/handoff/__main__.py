"""``python -m handoff``."""

from handoff.cli.main import main

main()
