"""A versioned, forward-only migration runner (the Flyway pattern).

Migrations are files ``V<version>__<description>.sql`` in one directory, applied in version
order, each exactly once, each in its own transaction together with the row that records
it in ``schema_migrations`` - so a migration is either applied and recorded, or neither.

* Re-running is a no-op: recorded versions are skipped.
* A recorded migration whose file has changed is refused (its SHA-256 checksum no longer
  matches): the database was built by the old text, and silently accepting the new one
  would let two environments drift apart. Write a new migration instead.
* Forward-only: there are no down scripts, and a file with a version lower than the latest
  applied one (someone merged an old branch) is refused rather than applied out of order.
* Two deploys starting at once: an advisory lock lets one runner at a time in; the second
  waits, then finds everything applied.
* A script whose first line is ``-- migrate:no-transaction`` runs outside a transaction
  and is recorded once it has run (dbmate's ``transaction:false``, Flyway's
  ``executeInTransaction=false``, Rails' ``disable_ddl_transaction!``): a backfill that
  commits batch by batch. Failing halfway it is not recorded and runs again, whole: write
  it so that running it again is harmless.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

# V<version>__<name>.sql, the whole file name; <name> is any text (V005__add-email-index.sql,
# V006__fix_v1.2_emails.sql): a migration file the pattern skips is never applied anywhere.
FILE_NAME = re.compile(r"V(\d+)__(.+)\.sql")
LOCK_KEY = 72_616_001  # any constant the team agrees on: "the migration lock"
NO_TRANSACTION = "-- migrate:no-transaction"


class MigrationError(Exception):
    """A migration could not be applied, or the set of migrations is inconsistent."""


class ChecksumMismatch(MigrationError):
    """An already applied migration's file was changed afterwards."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str
    checksum: str


def discover(directory: str | Path) -> list[Migration]:
    """The migration files in `directory`, by version; other files are ignored."""
    found: dict[int, Migration] = {}
    for path in sorted(Path(directory).iterdir()):
        match = FILE_NAME.fullmatch(path.name)
        if not match:
            continue
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migrations with version {version}: "
                                 f"{found[version].name} and {path.name}")
        data = path.read_bytes()
        # utf-8-sig: a byte-order mark that a Windows editor put before the first line is
        # not part of the script (its first line is still the directive; Postgres must not
        # see the mark, which it would take for the start of a word)
        found[version] = Migration(version, path.name, data.decode("utf-8-sig"),
                                   hashlib.sha256(data).hexdigest())
    return [found[v] for v in sorted(found)]


def migrate(dsn: str, directory: str | Path, target: int | None = None) -> list[int]:
    """Apply the pending migrations up to `target` (all if None); return the versions
    applied by this call, in order."""
    migrations = discover(directory)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Session-level lock: held across the per-migration transactions below.
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            conn.execute("""
                CREATE TABLE IF NOT EXISTS schema_migrations (
                    version    integer     PRIMARY KEY,
                    name       text        NOT NULL,
                    checksum   text        NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )""")
            applied: dict[int, str] = dict(
                conn.execute("SELECT version, checksum FROM schema_migrations"))
            # Every applied migration is validated, whatever the target (as Flyway's
            # validate does): the target only limits what is applied.
            pending = [m for m in check(migrations, applied)
                       if target is None or m.version <= target]
            for migration in pending:
                apply(conn, migration)
            return [m.version for m in pending]
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


def check(migrations: list[Migration], applied: dict[int, str]) -> list[Migration]:
    """Validate everything before applying anything; return what is pending."""
    for m in migrations:
        if m.version in applied and applied[m.version] != m.checksum:
            raise ChecksumMismatch(
                f"{m.name} was changed after it was applied (checksum {applied[m.version][:12]}"
                f" recorded, {m.checksum[:12]} now): add a new migration instead")
    latest = max(applied, default=0)
    pending = [m for m in migrations if m.version not in applied]
    late = [m.name for m in pending if m.version < latest]
    if late:
        raise MigrationError(
            f"{', '.join(late)} is older than the latest applied version {latest}: migrations "
            "are applied forward only; renumber it after the latest")
    return pending


def apply(conn: psycopg.Connection, migration: Migration) -> None:
    if migration.sql.lstrip().startswith(NO_TRANSACTION):
        # autocommit: the script's own COMMITs (a DO block's, between batches) are allowed
        try:
            conn.execute(migration.sql)
        except psycopg.Error as exc:
            raise MigrationError(f"{migration.name} failed (it runs outside a transaction: "
                                 f"what it committed stays): {exc}") from exc
        conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
            (migration.version, migration.name, migration.checksum))
        return
    try:
        with conn.transaction():
            conn.execute(migration.sql)  # no parameters: the script may hold many statements
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum))
    except psycopg.Error as exc:
        raise MigrationError(f"{migration.name} failed and was rolled back: {exc}") from exc
