"""The one base of every failure labrunner explains to its user instead of crashing.

A ``LabrunnerError``'s message names the file, argument or service at fault and says what to
do; the command line shows it on one line and exits 2 (usage or set-up error)."""

from __future__ import annotations


class LabrunnerError(Exception):
    """A failure with a message meant for the user: what went wrong, and the remedy."""
