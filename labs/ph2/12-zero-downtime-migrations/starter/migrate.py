"""A versioned, forward-only migration runner (the Flyway pattern). See README.md.

Migrations are files V<version>__<description>.sql in one directory.
"""

from __future__ import annotations

import hashlib  # noqa: F401 - for the checksums
import re  # noqa: F401
from pathlib import Path

import psycopg  # noqa: F401

# the whole file name (re.fullmatch); <name> is any text: V005__add-email-index.sql
FILE_NAME = r"V(\d+)__(.+)\.sql"


class MigrationError(Exception):
    """A migration could not be applied, or the set of migrations is inconsistent."""


class ChecksumMismatch(MigrationError):
    """An already applied migration's file was changed afterwards."""


def migrate(dsn: str, directory: str | Path, target: int | None = None) -> list[int]:
    """Apply the pending migrations up to `target` (all if None); return the versions
    applied by this call, in order."""
    raise NotImplementedError("migrate: record, check and apply the migrations")
