"""``python -m paraplan``."""

from paraplan.cli.app import main

main()
