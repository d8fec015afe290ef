"""``python -m labrunner.cli``."""

from labrunner.cli import main

main()
