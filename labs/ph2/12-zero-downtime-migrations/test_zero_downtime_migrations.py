"""ph2.12 verification: a migration runner, and an expand-contract rename under traffic.

The runner is exercised on migration files the test writes to a temporary folder. The
rename uses the learner's own migrations/ folder, applied one version at a time by the
learner's runner while two versions of an application - threads on their own connections -
keep inserting, reading and updating users:

    V001 baseline        v1 (writes/reads users.name) running
    V002 expand          v1 running
    V003 backfill        v1 running, then v2 (users.full_name) starts: both running
    (v1 retired)         v2 running
    V004 contract        v2 running

Every operation's outcome is checked (errors, and names read back against what was
written, including across versions), so a step that breaks one version is caught even if
the step itself succeeds.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from labrunner.testing import StatementGate, came_true, wait_until

# --------------------------------------------------------------------------------------
# The runner


@pytest.fixture
def runner(learner: Any) -> ModuleType:
    module: ModuleType = learner.load("migrate")
    if not callable(getattr(module, "migrate", None)):
        pytest.fail("migrate.py: define a function migrate(dsn, directory, target=None)",
                    pytrace=False)
    for name in ("MigrationError", "ChecksumMismatch"):
        if not isinstance(getattr(module, name, None), type):
            pytest.fail(f"migrate.py: define an exception class {name}", pytrace=False)
    return module


@pytest.fixture
def migrations(learner: Any) -> Path:
    """The folder the test writes migration scripts to: one the learner's code can read,
    also from a process of its own under another uid (grading)."""
    return learner.tmp_folder()  # type: ignore[no-any-return]


def write(folder: Path, files: dict[str, str]) -> None:
    for name, sql in files.items():
        (folder / name).write_text(sql, encoding="utf-8")


def refused(call: Callable[[], Any], what: str) -> BaseException:
    """The exception `call` raised; a teaching failure if it raised none."""
    try:
        result = call()
    except Exception as exc:  # noqa: BLE001 - the caller checks the type
        return exc
    pytest.fail(f"migrate() {what} returned {result!r} instead of refusing", pytrace=False)


BASIC = {
    "V001__create_accounts.sql": "CREATE TABLE accounts (id int PRIMARY KEY, owner text);",
    "V002__seed_admin.sql": "INSERT INTO accounts VALUES (1, 'admin');",
    "V003__add_email.sql": "ALTER TABLE accounts ADD COLUMN email text;\n"
                           "UPDATE accounts SET email = 'root@example.com';",
    "README.md": "not a migration",
}


def count(postgres: Any, sql: str) -> int:
    with postgres.connect() as conn:
        return int(conn.execute(sql).fetchone()[0])


def migration_tables(postgres: Any) -> set[str]:
    with postgres.connect() as conn:
        return {t for (t,) in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def test_applies_in_order_and_rerun_is_a_noop(runner: ModuleType, postgres: Any,
                                              migrations: Path) -> None:
    write(migrations, BASIC)
    first = runner.migrate(postgres.dsn, migrations)
    assert list(first) == [1, 2, 3], (
        f"migrate() on V001..V003 returned {first!r}, expected [1, 2, 3] (the versions it "
        "applied, in order)")
    again = runner.migrate(postgres.dsn, migrations)
    assert list(again) == [], (
        f"running migrate() a second time applied {again!r}, expected []: applied versions "
        "are recorded (schema_migrations) and skipped")
    rows = count(postgres, "SELECT count(*) FROM accounts")
    assert rows == 1, (
        f"after two runs accounts has {rows} rows, expected 1: V002 ran twice")
    write(migrations, {"V004__index_owner.sql": "CREATE INDEX accounts_owner ON accounts (owner);"})
    assert list(runner.migrate(postgres.dsn, migrations, target=3)) == [], (
        "migrate(target=3) must not apply V004")
    assert list(runner.migrate(postgres.dsn, migrations)) == [4], (
        "a new V004 must be applied, alone, by the next run")


def test_versions_are_numbers_and_target_is_inclusive(runner: ModuleType, postgres: Any,
                                                      migrations: Path) -> None:
    """Versions without zero padding: V10 comes after V9 (though 'V10__' sorts before
    'V9__' as text); target=2 includes V2."""
    write(migrations, {
        "V1__create_accounts.sql": BASIC["V001__create_accounts.sql"],
        "V2__seed_admin.sql": BASIC["V002__seed_admin.sql"],
        "V9__add_email.sql": "ALTER TABLE accounts ADD COLUMN email text;",
        "V10__fill_email.sql": "UPDATE accounts SET email = 'root@example.com';",
    })
    first = runner.migrate(postgres.dsn, migrations, target=2)
    assert list(first) == [1, 2], (
        f"migrate(target=2) on V1, V2, V9, V10 applied {first!r}, expected [1, 2]: "
        + ("the target is inclusive (version <= target)" if list(first) == [1] else
           "apply the versions up to the target, in version order"))
    try:
        rest = runner.migrate(postgres.dsn, migrations)
    except Exception as exc:  # noqa: BLE001 - explained
        pytest.fail(f"migrate() with V9 and V10 pending raised {type(exc).__name__}: {exc} - "
                    f"V10 (which needs V9's column) ran first? Versions are numbers: V10 "
                    f"comes after V9, though 'V10__' sorts before 'V9__' as text",
                    pytrace=False)
    assert list(rest) == [9, 10], (
        f"migrate() with V9 and V10 pending applied {rest!r}, expected [9, 10]: order "
        f"versions as numbers, not file names as text")


# Two files that claim one version: what two branches merged together leave behind. The
# runner must refuse the set, before applying anything: keeping one of them means the other
# is never applied, anywhere, and nothing says so.
SAME_VERSION = {
    "written alike": ("V002__seed_admin.sql", "V002__seed_guest.sql"),
    "padded differently": ("V2__seed_admin.sql", "V002__seed_guest.sql"),
}


@pytest.mark.parametrize("case", list(SAME_VERSION))
def test_two_files_with_one_version_are_refused(runner: ModuleType, postgres: Any,
                                                migrations: Path, case: str) -> None:
    admin, guest = SAME_VERSION[case]
    write(migrations, {
        "V001__create_accounts.sql": BASIC["V001__create_accounts.sql"],
        admin: "INSERT INTO accounts VALUES (1, 'admin');",
        guest: "INSERT INTO accounts VALUES (2, 'guest');",
    })
    what = f"{admin} and {guest}, both version 2"
    why = ("Versions are numbers (V2 is V002): two files of one version are two changes that "
           "each claim that number, as two branches merged together leave them. Refuse the "
           "set before applying anything (MigrationError naming both files): a runner that "
           "keeps one of them never applies the other - here, nor on any other database - "
           "and nothing says so.")
    try:
        result = runner.migrate(postgres.dsn, migrations)
    except Exception as exc:  # noqa: BLE001 - checked below
        error: BaseException | None = exc
    else:
        error = None
    tables = migration_tables(postgres)
    rows = count(postgres, "SELECT count(*) FROM accounts") if "accounts" in tables else 0
    if error is None:
        pytest.fail(f"migrate() with {what} returned {result!r} ({rows} row(s) seeded into "
                    f"accounts), expected MigrationError\n{why}", pytrace=False)
    assert isinstance(error, runner.MigrationError), (
        f"migrate() with {what} raised {type(error).__name__}: {error}, expected "
        f"MigrationError\n{why}")
    assert "accounts" not in tables, (
        f"migrate() with {what} raised MigrationError, but only after applying V001 "
        f"(accounts exists, {rows} row(s)): check the set of files before applying "
        f"anything\n{why}")


def migrated(runner: ModuleType, postgres: Any, migrations: Path, on: str, expected: str,
             why: str) -> list[int]:
    """What migrate() returned, or the test failed naming what it raised (its first line:
    Postgres' errors run on), on what, what was expected and why."""
    try:
        return list(runner.migrate(postgres.dsn, migrations))
    except Exception as exc:  # noqa: BLE001 - explained
        first = (str(exc).strip().splitlines() or [""])[0]
        pytest.fail(f"migrate() on {on} raised {type(exc).__name__}: {first}; expected "
                    f"{expected}\n{why}", pytrace=False)


# Files beside the migrations that are not named V<n>__<name>.sql (all of it, from the
# first character to the last), as editors, merges and copies leave them: never applied.
STRAY = {
    "V004__draft.sql.orig": "a merge's left-over copy",
    "V005__draft.sql~": "an editor's backup",
    "._V006__draft.sql": "macOS metadata beside a copied file",
    "old_V007__draft.sql": "a renamed old copy",
}


def test_files_not_named_like_a_migration_are_ignored(runner: ModuleType, postgres: Any,
                                                      migrations: Path) -> None:
    write(migrations, BASIC)
    write(migrations, {name: f"CREATE TABLE stray_{n} (id int);"
                       for n, name in enumerate(STRAY)})
    why = ("A migration is a file named V<n>__<name>.sql, the whole name: match the pattern "
           "from the first character to the last (re.fullmatch, or ^...$ with match()). A "
           "pattern searched for, or not anchored at its end, also takes "
           + ", ".join(f"{name!r} ({what})" for name, what in STRAY.items())
           + ", and applies it to every database.")
    applied = migrated(runner, postgres, migrations, f"V001..V003 beside {sorted(STRAY)}",
                       "[1, 2, 3]", why)
    tables = migration_tables(postgres)
    taken = [name for n, name in enumerate(STRAY) if f"stray_{n}" in tables]
    assert not taken and applied == [1, 2, 3], (
        f"migrate() on V001..V003 beside files not named like a migration returned "
        f"{applied!r}, and applied {taken or 'none of them'}; expected [1, 2, 3], none of "
        f"them applied\n{why}")


# Migrations whose <name> is more than letters, digits and "_": <name> is any text (as
# Flyway's description). A pattern that leaves them out applies them nowhere, silently.
NAMED = {
    "V004__add-owner-index.sql": "a hyphen",
    "V005__fix_v1.2_emails.sql": "a dot",
    "V006__ajoute_prénom.sql": "a letter outside ASCII",
}


def test_any_name_after_the_version_is_a_migration(runner: ModuleType, postgres: Any,
                                                   migrations: Path) -> None:
    write(migrations, BASIC)
    write(migrations, {name: f"CREATE TABLE named_{n} (id int);"
                       for n, name in enumerate(NAMED)})
    why = ("A migration is a file named V<n>__<name>.sql where <name> is any text (Flyway's "
           "description): a pattern that allows only \\w or [A-Za-z0-9_] in <name> skips "
           "these files, and a skipped migration is never applied, on any database, and "
           "nothing says so")
    applied = migrated(runner, postgres, migrations, f"V001..V003 and {', '.join(NAMED)}",
                       "[1, 2, 3, 4, 5, 6]", why)
    tables = migration_tables(postgres)
    skipped = [f"{name} ({what})" for n, (name, what) in enumerate(NAMED.items())
               if f"named_{n}" not in tables]
    assert not skipped and applied == [1, 2, 3, 4, 5, 6], (
        f"migrate() on V001..V003 and {', '.join(NAMED)} returned {applied!r}"
        + (f", and never applied {', '.join(skipped)}" if skipped else "")
        + f"; expected [1, 2, 3, 4, 5, 6]\n{why}")


# Scripts as editors save them: (what comes before the text, the line end). Windows editors
# put a UTF-8 byte-order mark (EF BB BF) first, and end lines in \r\n.
SAVED = {
    "byte-order-mark": ("\ufeff", "\n"),
    "crlf-line-ends": ("", "\r\n"),
}
IMPORT = ["-- migrate:no-transaction",
          "DO $$",
          "BEGIN",
          "    INSERT INTO accounts VALUES (1, 'ada');",
          "    COMMIT;  -- refused inside a transaction",
          "    INSERT INTO accounts VALUES (2, 'grace');",
          "END",
          "$$;"]


@pytest.mark.parametrize("case", list(SAVED))
def test_scripts_saved_by_a_windows_editor_are_applied(runner: ModuleType, postgres: Any,
                                                       migrations: Path, case: str) -> None:
    mark, end = SAVED[case]
    write(migrations, {"V001__create_accounts.sql": BASIC["V001__create_accounts.sql"]})
    (migrations / "V002__import_accounts.sql").write_bytes(
        (mark + end.join(IMPORT) + end).encode("utf-8"))
    saved = ("with a UTF-8 byte-order mark before its first line, "
             "`-- migrate:no-transaction`" if mark else
             "with \\r\\n line ends, its first line `-- migrate:no-transaction\\r\\n`")
    why = ("A byte-order mark is not part of the script: read the file as utf-8-sig (or drop "
           "a leading \\ufeff) so that its first line is still the directive, and never "
           "send the mark to Postgres, which takes it for the start of a word (a syntax "
           "error)" if mark else
           "The line end is not part of the line: compare the first line without it "
           "(splitlines(), strip()); the directive missed, the script runs inside a "
           "transaction, where its DO block's COMMIT is refused")
    applied = migrated(runner, postgres, migrations,
                       f"a no-transaction V002 saved {saved} (as Windows editors save files)",
                       "[1, 2], V002 run outside a transaction", why)
    rows = count(postgres, "SELECT count(*) FROM accounts")
    again = list(runner.migrate(postgres.dsn, migrations))
    assert applied == [1, 2] and rows == 2 and again == [], (
        f"migrate() on a no-transaction V002 saved {saved} returned {applied!r} (accounts "
        f"then had {rows} rows), and a second run {again!r}; expected [1, 2] with 2 rows, "
        f"then []\n{why}")


# (the applied file that is edited, its new text, the target migrate() is then called with)
CHANGED = [
    ("V002__seed_admin.sql", "INSERT INTO accounts VALUES (1, 'admin'), (2, 'guest');", None),
    # Above the target: validation covers every applied migration, whatever the target
    # (Flyway's validate checks each applied one against its file; target only limits
    # what is applied) - a changed applied file is drift however far this run goes.
    ("V003__add_email.sql", "ALTER TABLE accounts ADD COLUMN email varchar(80);\n"
                            "UPDATE accounts SET email = 'root@example.com';", 2),
    ("V002__seed_admin.sql", "INSERT INTO accounts VALUES (1, 'root');", 1),
]


@pytest.mark.parametrize("edited,text,target", CHANGED,
                         ids=[f"{e[:4]}-target-{t}" for e, _, t in CHANGED])
def test_changed_applied_script_is_refused(runner: ModuleType, postgres: Any,
                                           migrations: Path, edited: str, text: str,
                                           target: int | None) -> None:
    write(migrations, BASIC)
    runner.migrate(postgres.dsn, migrations)
    write(migrations, {
        edited: text,
        "V004__index_owner.sql": "CREATE INDEX accounts_owner ON accounts (owner);",
    })
    version = edited[:4]
    run = "migrate()" if target is None else f"migrate(target={target})"
    above = "" if target is None else f" (above the target {target})"
    error = refused(lambda: runner.migrate(postgres.dsn, migrations, target=target),
                    ("" if target is None else f"with target={target} ")
                    + f"after the applied {version}{above} was edited (its checksum changed: "
                    "every applied migration is validated against its file, whatever the "
                    "target - the target only limits what is applied)")
    assert isinstance(error, runner.ChecksumMismatch), (
        f"{run} after the applied {version}{above} was edited raised "
        f"{type(error).__name__}: {error}; expected ChecksumMismatch: the checksum recorded "
        f"when {version} was applied no longer matches")
    indexes = count(postgres, "SELECT count(*) FROM pg_indexes WHERE indexname = 'accounts_owner'")
    assert indexes == 0, (
        f"V004 was applied although {version} was refused: validate every applied "
        "migration's checksum before applying anything")
    # The refusal is still held here (as a deploy tool that logs it holds it): the runner's
    # session must have let its lock go on the way out, not when it is collected.
    held = advisory_locks_left(postgres)
    assert not held, (
        f"after {run} raised {type(error).__name__}, a session of the runner still holds "
        f"its advisory lock ({'; '.join(held)}, pg_locks): the error path left without "
        "pg_advisory_unlock and without closing its connection, so every later deploy "
        "waits on that lock for as long as the refused run's connection lives. Unlock (or "
        "close the connection) on every way out: try/finally, or with psycopg.connect(...)")


def advisory_locks_left(postgres: Any) -> list[str]:
    """The advisory locks other sessions of this database still hold, once none is left or
    a few seconds have passed (a connection being closed lets them go at once)."""
    with postgres.connect(autocommit=True) as conn:
        def held() -> list[str]:
            return [f"pid {pid} holds key {key} (state {state})"
                    for pid, key, state in conn.execute(
                "SELECT l.pid, l.objid, a.state FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted AND l.pid <> pg_backend_pid() "
                "AND l.database = (SELECT oid FROM pg_database "
                "                  WHERE datname = current_database())").fetchall()]

        came_true(lambda: not held(), 3)
        return held()


def test_forward_only_refuses_an_older_version(runner: ModuleType, postgres: Any,
                                               migrations: Path) -> None:
    write(migrations, {k: v for k, v in BASIC.items() if not k.startswith("V002")})
    assert list(runner.migrate(postgres.dsn, migrations)) == [1, 3]
    write(migrations, {"V002__seed_admin.sql": BASIC["V002__seed_admin.sql"]})
    error = refused(lambda: runner.migrate(postgres.dsn, migrations),
                    "with a new V002 below the applied V003 (forward-only)")
    assert isinstance(error, runner.MigrationError), (
        f"migrate() with a new V002 below the applied V003 raised {type(error).__name__}, "
        "expected MigrationError")
    held = advisory_locks_left(postgres)
    assert not held, (
        f"after migrate() refused the late V002 ({type(error).__name__}), a session of the "
        f"runner still holds its advisory lock ({'; '.join(held)}, pg_locks): that error "
        "path left without pg_advisory_unlock and without closing its connection, so every "
        "later deploy waits on that lock. Unlock (or close the connection) on every way out: "
        "try/finally, or with psycopg.connect(...)")
    rows = count(postgres, "SELECT count(*) FROM accounts")
    assert rows == 0, (
        "V002 was applied after V003: migrations go forward only; an older version that "
        "appears late must be refused (renumbered), not slipped in")


def test_failed_migration_leaves_nothing_behind(runner: ModuleType, postgres: Any,
                                                migrations: Path) -> None:
    write(migrations, {
        "V001__create_accounts.sql": BASIC["V001__create_accounts.sql"],
        "V002__half_broken.sql": "CREATE TABLE audit (id int);\n"
                                 "INSERT INTO no_such_table VALUES (1);",
    })
    refused(lambda: runner.migrate(postgres.dsn, migrations), "with a failing V002")
    tables = migration_tables(postgres)
    assert "audit" not in tables, (
        "V002 failed on its second statement, but its first (CREATE TABLE audit) stayed: "
        "run each migration in one transaction, with the row that records it")
    write(migrations, {"V002__half_broken.sql": "CREATE TABLE audit (id int);"})
    assert list(runner.migrate(postgres.dsn, migrations)) == [2], (
        "once fixed, V002 must be applied by the next run (V001 stays applied)")


def test_failed_no_transaction_script_is_not_recorded(runner: ModuleType, postgres: Any,
                                                      migrations: Path) -> None:
    """A script run outside a transaction that fails is recorded as nothing, and the next
    migrate() runs it again (here the file is unchanged: what it needed now exists)."""
    write(migrations, {
        "V001__create_accounts.sql": BASIC["V001__create_accounts.sql"],
        "V002__import_accounts.sql": "-- migrate:no-transaction\n"
                                     "INSERT INTO accounts SELECT id, owner FROM imported;",
    })
    error = refused(lambda: runner.migrate(postgres.dsn, migrations),
                    "with a no-transaction V002 that fails (table imported missing)")
    with postgres.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE imported AS SELECT 7 AS id, 'ada' AS owner")
    try:
        again = list(runner.migrate(postgres.dsn, migrations))
    except Exception as exc:  # noqa: BLE001 - reported below
        again = [f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"]
    rows = count(postgres, "SELECT count(*) FROM accounts")
    assert again == [2] and rows == 1, (
        f"a no-transaction V002 failed ({type(error).__name__}), then once what it needed "
        f"existed the next migrate() gave {again!r} and accounts has {rows} rows, expected "
        "[2] and 1 row: a script run outside a transaction must be recorded only after it "
        "ran to its end - recorded before (or whatever happened), a failure leaves it "
        "marked applied and it is never run again")


def test_two_deploys_at_once_apply_each_migration_once(runner: ModuleType, postgres: Any,
                                                       migrations: Path) -> None:
    write(migrations, {
        # slow enough that both runners are inside it at the same time without a lock
        "V001__create_accounts.sql": "SELECT pg_sleep(0.5);\n" + BASIC["V001__create_accounts.sql"],
        "V002__seed_admin.sql": BASIC["V002__seed_admin.sql"],
    })
    barrier = threading.Barrier(2)
    outcomes: list[Any] = [None, None]

    def deploy(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = list(runner.migrate(postgres.dsn, migrations))
        except Exception as exc:  # noqa: BLE001 - reported below
            outcomes[i] = exc

    threads = [threading.Thread(target=deploy, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    errors = [o for o in outcomes if isinstance(o, Exception)]
    if errors or sorted(map(tuple, outcomes)) != [(), (1, 2)]:
        seen = (f"one failed with {type(errors[0]).__name__}: "
                f"{(str(errors[0]).strip().splitlines() or [''])[0]}" if errors
                else f"they returned {outcomes}, expected one to apply [1, 2] and the other []")
        pytest.fail(f"two migrate() runs started together both ran migrations: "
                    f"{lock_diagnosis(runner, postgres, migrations)} ({seen})", pytrace=False)


# The second deploy, driven step by step: the first runner is held inside V002 (waiting on
# an advisory lock the test holds) while the second starts. Its migrate() may return only
# once the database is migrated - the deploy starts its application right after it.
HELD_KEY = 912_457  # the test's own advisory lock, unlike any runner's
HOLD_SECONDS = 1.5  # how long the first deploy is held in V002 once the second started

HELD = {
    "V001__create_accounts.sql": BASIC["V001__create_accounts.sql"],
    "V002__add_email.sql": f"SELECT pg_advisory_xact_lock_shared({HELD_KEY});\n"
                           "ALTER TABLE accounts ADD COLUMN email text;",
    "V003__seed_admin.sql": "INSERT INTO accounts VALUES (1, 'admin', 'root@example.com');",
}


def schema_versions(conn: Any) -> list[int]:
    """Which of HELD's migrations the schema shows, read from their effects (whatever the
    runner calls its own table)."""
    (table, column) = conn.execute(
        "SELECT to_regclass('accounts') IS NOT NULL, EXISTS (SELECT FROM "
        "information_schema.columns WHERE table_name = 'accounts' AND column_name = "
        "'email')").fetchone()
    seeded = table and conn.execute("SELECT count(*) FROM accounts").fetchone()[0] > 0
    return [v for v, seen in ((1, table), (2, column), (3, seeded)) if seen]


class Deploy(threading.Thread):
    """One deploy's migrate(), and what the schema was the moment it returned."""

    def __init__(self, runner: ModuleType, dsn: str, folder: Path) -> None:
        super().__init__(daemon=True)
        self.runner, self.dsn, self.folder = runner, dsn, folder
        self.result: Any = None
        self.error: BaseException | None = None
        self.schema_at_return: list[int] = []

    def run(self) -> None:
        try:
            self.result = list(self.runner.migrate(self.dsn, self.folder))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            self.schema_at_return = schema_versions(conn)


def waits_for_test_lock(conn: Any) -> bool:
    """Whether a session of this database waits for the test's advisory lock."""
    return bool(conn.execute(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE NOT l.granted AND l.locktype = 'advisory' AND l.objid = %s "
        "AND a.datname = current_database()", (HELD_KEY,)).fetchone()[0])


def test_second_deploy_returns_only_once_the_database_is_migrated(
        runner: ModuleType, postgres: Any, migrations: Path) -> None:
    write(migrations, HELD)
    watch = postgres.connect(autocommit=True)
    watch.execute("SELECT pg_advisory_lock(%s)", (HELD_KEY,))
    first = Deploy(runner, postgres.dsn, migrations)
    second = Deploy(runner, postgres.dsn, migrations)
    try:
        first.start()
        wait_until(lambda: not first.is_alive() or waits_for_test_lock(watch),
                   "the first migrate() to reach V002", timeout=30)
        assert first.is_alive(), (
            f"the first migrate() ended ({first.result!r} / {first.error!r}) while V002 "
            f"waits on a lock the test holds: it did not apply V002")
        second.start()
        # A right runner waits as long as it takes; hold the first a while, so that one
        # that gives up after a lock_timeout or a few tries shows it by returning now.
        deadline = time.monotonic() + HOLD_SECONDS
        while second.is_alive() and time.monotonic() < deadline:
            second.join(0.05)
        returned_early = not second.is_alive()
    finally:
        watch.execute("SELECT pg_advisory_unlock(%s)", (HELD_KEY,))
        for deploy in (first, second):
            deploy.join(30)
        watch.close()
    why = ("a deploy starts its application as soon as migrate() returns, so it would "
           "run on a schema without the new versions. The second runner must wait for "
           "the first (pg_advisory_lock blocks; pg_try_advisory_lock, a lock_timeout or "
           "giving up after a while do not) and then find everything applied")
    stuck = [name for name, d in (("first", first), ("second", second)) if d.is_alive()]
    assert not stuck, (
        f"the {' and '.join(stuck)} migrate() still ran 30 s after the first deploy's V002 "
        f"could go on, expected both to have returned: does the runner release its lock?")
    if returned_early or second.schema_at_return != [1, 2, 3]:
        outcome = (f"raised {type(second.error).__name__}: {second.error}" if second.error
                   else f"returned {second.result!r}")
        when = ("while the first was still applying V002 (held by the test)"
                if returned_early else "before the first had finished")
        pytest.fail(
            f"a second migrate() started while another deploy was migrating {outcome} "
            f"{when}: the schema then had versions {second.schema_at_return} of V001..V003, "
            f"expected all of them - {why}", pytrace=False)
    assert second.error is None and second.result == [], (
        f"the second migrate() gave {second.result!r} / {second.error!r} after waiting for "
        f"the first, expected [] - everything was applied by the first - "
        + (f"it waited, then applied again what the first had applied: "
           f"{lock_diagnosis(runner, postgres, migrations)}"
           if second.error is not None or second.result else why))
    assert first.error is None and first.result == [1, 2, 3], (
        f"the first migrate() gave {first.result!r} / {first.error!r}, expected [1, 2, 3]")


RACE_FILES = {name: BASIC[name] for name in ("V001__create_accounts.sql", "V002__seed_admin.sql")}


def lock_waits(conn: Any) -> int:
    """How many sessions of this database wait for a lock (any kind)."""
    return int(conn.execute(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE NOT l.granted AND a.datname = current_database()").fetchone()[0])


def race_at(runner: ModuleType, postgres: Any, migrations: Path, gate: StatementGate,
            watch: Any, k: int) -> str | None:
    """The first migrate() held before its k-th statement (BEGIN and COMMIT count) while a
    second runs to its end or waits for a lock; then the first goes on. Each k on a schema of
    its own (search_path). None: the first never got to a k-th statement; "" if both came out
    right; otherwise what went wrong."""
    schema = f"race_{k}"
    watch.execute(f"CREATE SCHEMA {schema}")
    dsn = make_conninfo(postgres.dsn, options=f"-c search_path={schema}")
    gate.arm(k)
    first, second = Deploy(runner, gate.dsn_for(dsn), migrations), Deploy(runner, dsn, migrations)
    first.start()
    wait_until(lambda: not first.is_alive() or gate.held is not None,
               f"the first migrate() to run its statement {k}", timeout=30)
    held = gate.held
    if held is None:
        gate.release()
        first.join(30)
        return None
    second.start()
    wait_until(lambda: not second.is_alive() or lock_waits(watch) > 0,
               "the second migrate() to end or to wait for a lock", timeout=30)
    went = "ran to its end" if not second.is_alive() else "waited for a lock"
    gate.release()
    for deploy in (first, second):
        deploy.join(30)
    outcomes = [d.error if d.error is not None else d.result for d in (first, second)]
    if any(d.is_alive() for d in (first, second)):
        return f"held before statement {k} ({held[:80]!r}): a migrate() never returned"
    results = sorted(tuple(o) for o in outcomes if isinstance(o, list))
    if results == [(), (1, 2)]:
        return ""
    return (f"the first migrate() was held before its statement {k} ({held[:80]!r}) while a "
            f"second one {went}; then the first went on. They gave {outcomes!r}, expected one "
            "to apply [1, 2] and the other []")


def test_no_statement_of_a_runner_lets_another_in_between_read_and_apply(
        runner: ModuleType, postgres: Any, migrations: Path) -> None:
    """Two deploys, one held before each of its statements in turn while the other runs: a
    runner that reads what is applied before it holds the lock, or lets go between reading
    and applying, applies a stale list once the other is done."""
    write(migrations, RACE_FILES)
    watch = postgres.connect(autocommit=True)
    try:
        with StatementGate.for_dsn(postgres.dsn) as gate:
            for k in range(1, 80):
                wrong = race_at(runner, postgres, migrations, gate, watch, k)
                if wrong is None:
                    break
                if wrong:
                    pytest.fail(f"{wrong}: {lock_diagnosis(runner, postgres, migrations)}",
                                pytrace=False)
    finally:
        watch.close()


# The first deploy in a process of its own, from its own copy of the migrations (two
# deploys are two processes, often two release folders): the runners must still exclude
# each other, so the lock's key must be the same everywhere.
def other_deploy(learner: Any, dsn: str, folder: Path) -> Any:
    """migrate(dsn, folder) in a process of its own (hash seed of its own too), printing
    what it returned as JSON."""
    code = ("import json, sys, migrate\n"
            f"print(json.dumps(list(migrate.migrate({dsn!r}, {str(folder)!r}))))\n"
            "sys.exit(0)")
    return learner.python("migrate", env={"PYTHONHASHSEED": "random"}, prelude=code,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finished(proc: Any) -> tuple[bytes, bytes]:
    """The process's output once it ended (killed if it still runs after 30 s)."""
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return out or b"", err or b""


def sessions_waiting(conn: Any) -> dict[int, int | None]:
    """Each other session of this database waiting for a lock: pid -> the advisory key it
    waits for (None for another kind of lock)."""
    rows = conn.execute(
        "SELECT l.pid, CASE WHEN l.locktype = 'advisory' THEN l.objid::bigint END "
        "FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE NOT l.granted "
        "AND a.datname = current_database() AND l.pid <> pg_backend_pid()").fetchall()
    return {int(pid): key for pid, key in rows}


def advisory_keys(conn: Any, pid: int) -> list[int]:
    return sorted(int(k) for (k,) in conn.execute(
        "SELECT objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND pid = %s AND objid <> %s", (pid, HELD_KEY)))


def test_deploys_in_two_processes_share_one_lock(runner: ModuleType, learner: Any,
                                                 postgres: Any, migrations: Path) -> None:
    write(migrations, HELD)
    elsewhere = learner.tmp_folder()
    write(elsewhere, HELD)
    watch = postgres.connect(autocommit=True)
    watch.execute("SELECT pg_advisory_lock(%s)", (HELD_KEY,))
    first = other_deploy(learner, postgres.dsn, elsewhere)
    second = Deploy(runner, postgres.dsn, migrations)
    try:
        wait_until(lambda: first.poll() is not None or HELD_KEY in sessions_waiting(watch).values(),
                   "the first deploy (its own process) to reach V002", timeout=30)
        assert first.poll() is None, (
            f"the first deploy, run in a process of its own, ended (exit {first.returncode})"
            " while V002 waits on a lock the test holds: it did not apply V002")
        (first_pid,) = [pid for pid, key in sessions_waiting(watch).items() if key == HELD_KEY]
        second.start()
        wait_until(lambda: not second.is_alive() or set(sessions_waiting(watch)) - {first_pid},
                   "the second deploy to wait, or to end", timeout=30)
        waiting = sessions_waiting(watch)
        inside = [pid for pid, key in waiting.items() if pid != first_pid and key == HELD_KEY]
        keys = {pid: advisory_keys(watch, pid) for pid in (first_pid, *inside)}
        returned_early = not second.is_alive()
    finally:
        watch.execute("SELECT pg_advisory_unlock(%s)", (HELD_KEY,))
        second.join(30)
        out, err = finished(first)
        watch.close()
    if inside or returned_early:
        seen = (f"went into V002 too (the runners' advisory locks: first deploy "
                f"{keys[first_pid]}, second {keys[inside[0]]})" if inside
                else f"returned {second.result!r} / {second.error!r} before the first was done")
        pytest.fail(
            f"while a deploy in another process (its own release folder) was applying V002, "
            f"a second migrate() {seen}: the two runners did not exclude each other. The "
            f"lock's key must be one constant every deploy computes alike - not hash() of a "
            f"string (Python salts it per process), not derived from the folder's path",
            pytrace=False)
    assert first.returncode == 0 and out.decode().strip() == "[1, 2, 3]", (
        f"the first deploy (its own process) exited {first.returncode} printing "
        f"{out.decode().strip()!r} ({err.decode().strip()[-300:]}), expected [1, 2, 3]")
    assert not isinstance(second.error, runner.ChecksumMismatch), (
        f"the second migrate() raised ChecksumMismatch ({second.error}) after the first "
        "deploy (another process) applied the same files, byte for byte: the checksum of "
        "one file's bytes came out different in another process. Python's hash() is salted "
        "per process (PYTHONHASHSEED), so it fingerprints nothing across deploys; record a "
        "digest of the file's bytes (hashlib.sha256(data).hexdigest())")
    assert second.error is None and second.result == [], (
        f"the second migrate() gave {second.result!r} / {second.error!r} after waiting for "
        "the first deploy (another process), expected []")


# A migration that records which advisory locks its own session holds while it runs.
LOCK_PROBE = ("CREATE TABLE {table} AS SELECT classid, objid, objsubid FROM pg_locks "
              "WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid();")

STALE_READ = ("each runner holds its advisory lock (the same key every run) while it applies, "
              "yet both applied migrations: the second read what is applied (and what is "
              "pending) before it held the lock - or let the lock go between reading and "
              "applying - then, once the first was done, applied that stale list again. Take "
              "pg_advisory_lock first, then read schema_migrations, validate and apply, all "
              "under that one hold")


def probe_locks(runner: ModuleType, postgres: Any, migrations: Path,
                version: int) -> set[tuple[Any, ...]] | None:
    """The advisory locks the runner's session holds while it applies a probe migration
    (None: the race left a state the probe cannot run on)."""
    table = f"lock_probe_{version}"
    with postgres.connect(autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
    write(migrations, {f"V{version:03d}__lock_probe.sql": LOCK_PROBE.format(table=table)})
    try:
        runner.migrate(postgres.dsn, migrations)
        with postgres.connect() as conn:
            return {tuple(row) for row in conn.execute(f"SELECT * FROM {table}").fetchall()}
    except Exception:  # noqa: BLE001 - the race left a state the probe cannot run on
        return None


def lock_diagnosis(runner: ModuleType, postgres: Any, migrations: Path) -> str:
    """Why two runners were not serialised: does the runner hold an advisory lock while a
    migration runs at all, and the same one each run? Probe migrations, each applied alone,
    look at their own session."""
    held = probe_locks(runner, postgres, migrations, 99)
    if held is not None and not held:
        return ("while a migration runs, the runner's session holds no advisory lock: a "
                "lock taken with pg_advisory_xact_lock on an autocommit connection (or "
                "inside a transaction that ended) is released as soon as that transaction "
                "ends. Take pg_advisory_lock (session-level) before reading what is applied, "
                "hold it on the same connection for the whole run, unlock at the end")
    again = probe_locks(runner, postgres, migrations, 100) if held else None
    if held and again is not None and again != held:
        return (f"the runner's advisory lock differs from one run to the next ({sorted(held)} "
                f"then {sorted(again)}, as (classid, objid, objsubid)): two runners only "
                "exclude each other on one key - a constant")
    if held and again == held:
        return STALE_READ
    return ("serialise runners (pg_advisory_lock) so the second waits and then finds "
            "everything applied")


def test_each_migration_is_recorded_in_its_own_transaction(
        runner: ModuleType, postgres: Any, migrations: Path) -> None:
    """A migration and the row recording it are written by ONE transaction: each probe
    migration notes its own transaction id, and some row of another table (the runner's
    record of it) must carry that id as its xmin."""
    note = "INSERT INTO probe VALUES ({v}, txid_current() % 4294967296);"
    write(migrations, {
        "V001__create_probe.sql": "CREATE TABLE probe (version int, tx bigint);\n"
                                  + note.format(v=1),
        "V002__second.sql": note.format(v=2),
    })
    runner.migrate(postgres.dsn, migrations)
    with postgres.connect(autocommit=True) as conn:
        txs = dict(conn.execute("SELECT version, tx FROM probe").fetchall())
        tables = [t for (t,) in conn.execute(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') "
            "AND NOT (schemaname = 'public' AND tablename = 'probe')")]
        for version, tx in sorted(txs.items()):
            written = sum(int(conn.execute(f"SELECT count(*) FROM {table} "  # noqa: S608
                                           "WHERE xmin::text = %s", (str(tx),)).fetchone()[0])
                          for table in tables)
            assert written, (
                f"V00{version} ran in transaction {tx}, but no row of {', '.join(tables)} "
                f"was written by that transaction: the row recording V00{version} was "
                f"committed by another one. Record each migration in the SAME transaction "
                f"as its statements (BEGIN; script; INSERT INTO schema_migrations; COMMIT): "
                f"a crash between two transactions leaves it applied but unrecorded, and the "
                f"next run applies it again")


# --------------------------------------------------------------------------------------
# Expand-contract under traffic


@dataclass
class Traffic:
    """Shared state of the application threads: what each user's name should be."""

    expected: dict[int, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    errors: list[str] = field(default_factory=list)
    step: str = "V001 baseline"


# What an operation's failure most often means, said with the failure.
OP_HINTS = {
    "touch": " - an UPDATE that writes neither name nor full_name (here email) must leave "
             "both alone: until the backfill, rows written before the expand have full_name "
             "NULL, and a sync trigger that copies full_name into name whenever name did not "
             "change (an ELSE branch, or a comparison of NEW.name with NEW.full_name) writes "
             "that NULL into name. Copy only the column this UPDATE changed (NEW vs OLD)",
}


class App(threading.Thread):
    """One application version in a loop: insert a user, read one, rename one, and update
    another column (email) of the oldest user, a row written before the expand.

    v1 knows only users.name, v2 only users.full_name. Operations of the two versions are
    serialised through `traffic.lock` so that "the name read back" has one right answer;
    the migrations are not, they run concurrently with everything."""

    def __init__(self, version: str, column: str, dsn: str, traffic: Traffic) -> None:
        super().__init__(daemon=True, name=f"app-{version}")
        self.version, self.column, self.dsn, self.traffic = version, column, dsn, traffic
        self.stop = threading.Event()
        self.ops = 0
        self.rnd = random.Random(version)
        self.mine: list[int] = []

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            n = 0
            while not self.stop.is_set():
                n += 1
                for op in (self.insert, self.read, self.rename, self.touch):
                    self.attempt(conn, op, n)
                time.sleep(0.002)  # a steady stream, not a busy loop

    def attempt(self, conn: Any, op: Callable[[Any, int], None], n: int) -> None:
        with self.traffic.lock:
            step = self.traffic.step
            try:
                op(conn, n)
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                self.traffic.errors.append(
                    f"{self.version} app failed during '{step}' ({op.__name__}): "
                    f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
                    f"{OP_HINTS.get(op.__name__, '')}")
            self.ops += 1

    def insert(self, conn: Any, n: int) -> None:
        name = f"{self.version} user {n}"
        (uid,) = conn.execute(
            f"INSERT INTO users ({self.column}, email) VALUES (%s, %s) RETURNING id",
            (name, f"{self.version}.{n}@example.com")).fetchone()
        self.traffic.expected[uid] = name
        self.mine.append(uid)

    def read(self, conn: Any, n: int) -> None:
        uid = self.rnd.choice(sorted(self.traffic.expected))
        row = conn.execute(f"SELECT {self.column} FROM users WHERE id = %s", (uid,)).fetchone()
        got, want = (row[0] if row else "<no row>"), self.traffic.expected[uid]
        if got != want:
            raise AssertionError(f"user {uid} read as {got!r}, expected {want!r}")

    def rename(self, conn: Any, n: int) -> None:
        # The oldest user (a row written before the expand) is only ever touched, never
        # renamed: its full_name stays unset until the backfill, so every touch between
        # expand and backfill tries the sync on a row the new column has no value for yet
        # (a rename would have filled it, and left that case to chance).
        oldest = min(self.traffic.expected, default=None)
        choices = [uid for uid in self.mine if uid != oldest]
        if not choices:
            return  # its inserts failed (already reported): nothing of its own to rename
        uid = self.rnd.choice(choices)
        name = f"{self.version} renamed {n}"
        conn.execute(f"UPDATE users SET {self.column} = %s WHERE id = %s", (name, uid))
        self.traffic.expected[uid] = name

    def touch(self, conn: Any, n: int) -> None:
        if not self.traffic.expected:
            return  # no insert went through yet (already reported)
        uid = min(self.traffic.expected)  # v1's first user: inserted before V002
        conn.execute("UPDATE users SET email = %s WHERE id = %s",
                     (f"{self.version}.touched.{n}@example.com", uid))


def keep_running(apps: list[App], ops: int = 8) -> None:
    """Wait until each running app has done `ops` more operations."""
    targets = {app: app.ops + ops for app in apps}
    deadline = time.monotonic() + 15
    while any(app.ops < target for app, target in targets.items()):
        if time.monotonic() > deadline:
            pytest.fail("the application threads stopped making progress for 15 s (a "
                        "migration holding a lock for that long?)", pytrace=False)
        time.sleep(0.01)


@pytest.fixture
def traffic() -> Iterator[tuple[Traffic, list[App]]]:
    state, apps = Traffic(), list[App]()
    yield state, apps
    for app in apps:
        app.stop.set()
    for app in apps:
        app.join(10)


def test_expand_contract_rename_without_downtime(runner: ModuleType, learner: Any,
                                                postgres: Any,
                                                traffic: tuple[Traffic, list[App]]) -> None:
    folder = learner.dir / "migrations"
    state, apps = traffic

    def step(version: int, label: str) -> None:
        with state.lock:
            state.step = label
        try:
            runner.migrate(postgres.dsn, folder, target=version)
        except Exception as exc:  # noqa: BLE001
            failure = f"migration {label} failed: {type(exc).__name__}: {exc}"
            if "invalid transaction termination" in str(exc):
                failure += f"\n{NO_TRANSACTION_HINT}"
            if state.errors:  # what broke first is what to fix first
                failure = f"{state.errors[0]}\n... and then {failure}"
            pytest.fail(failure, pytrace=False)
        keep_running([a for a in apps if a.is_alive()])

    def start(version: str, column: str) -> App:
        app = App(version, column, postgres.dsn, state)
        apps.append(app)
        app.start()
        return app

    runner.migrate(postgres.dsn, folder, target=1)
    old = start("v1", "name")
    keep_running([old])
    step(2, "V002 expand")
    step(3, "V003 backfill")
    with state.lock:
        state.step = "v2 deployed next to v1"
    start("v2", "full_name")
    keep_running(apps)
    with state.lock:
        state.step = "v1 retired"
    old.stop.set()
    old.join(10)
    step(4, "V004 contract")
    for app in apps:
        app.stop.set()
        app.join(10)

    with postgres.connect() as conn:
        leftovers = [f"trigger {t}" for (t,) in conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'users'::regclass "
            "AND NOT tgisinternal")] + [f"function {f}()" for (f,) in conn.execute(
                "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                "WHERE n.nspname = 'public' AND p.prorettype = 'trigger'::regtype")]
    contract = [e for e in state.errors if "'V004 contract'" in e]
    assert not (contract and leftovers), (
        f"after V004 dropped users.name, {' and '.join(leftovers)} of the expand step "
        f"{'is' if len(leftovers) == 1 else 'are'} still there, and every write now runs it "
        f"and fails: {contract[0]} - the contract step drops the sync machinery (DROP "
        f"TRIGGER, DROP FUNCTION) with the old column")
    assert not state.errors, (
        f"{state.errors[0]}\n" + "\n".join(state.errors[1:5])
        + f"\n({len(state.errors)} failed operations): every step must keep both running "
        "versions working - expand (add nullable + sync both ways), backfill, and contract "
        "only after the old version is gone")
    with postgres.connect() as conn:
        columns = dict(conn.execute(
            "SELECT column_name, is_nullable FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name = 'users'").fetchall())
        triggers = [t for (t,) in conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'users'::regclass "
            "AND NOT tgisinternal")]
        names = dict(conn.execute("SELECT id, full_name FROM users").fetchall()) \
            if "full_name" in columns else {}
    assert columns.get("full_name") == "NO", (
        f"after V004 users.full_name is {'missing' if 'full_name' not in columns else 'nullable'}"
        ": the contract step makes it NOT NULL")
    assert "name" not in columns, "after V004 the old column users.name still exists"
    assert not triggers, f"the sync trigger {triggers} is still there after the contract step"
    assert not leftovers, (
        f"after the contract step {', '.join(leftovers)} is still there: nothing calls it "
        f"any more, but the contract removes all of the expand step's sync machinery")
    wrong = {uid: (names.get(uid), want) for uid, want in state.expected.items()
             if names.get(uid) != want}
    assert not wrong, (
        f"{len(wrong)} users have the wrong full_name at the end, e.g. "
        f"{next(iter(wrong.items()))} (id: (stored, expected)): every write by either "
        "version must end up in full_name")


# --------------------------------------------------------------------------------------
# The backfill, in batches that commit one by one

NO_TRANSACTION_HINT = (
    "A script that COMMITs (a backfill, batch by batch) cannot run inside the runner's "
    "transaction: the runner runs a script whose first line is '-- migrate:no-transaction' "
    "outside a transaction (autocommit) and records it once it has run - see the README.")
BACKFILL_ROWS = 2_500   # users written before the expand: three batches at least
BATCH_MAX = 1_000       # the README's bound on the rows one backfill transaction writes


def test_backfill_commits_in_bounded_batches(runner: ModuleType, learner: Any,
                                             postgres: Any) -> None:
    """An UPDATE holds each row it wrote locked until its transaction ends: a backfill that
    writes every row in one transaction (one UPDATE, or a loop of batches the runner's
    transaction wraps) blocks every application write to a row it has passed, for the
    whole backfill - minutes on a big table. Two looks:
    * the application holds the MIDDLE user's row (as a write in flight does) while V003
      runs: once the backfill waits for that row, the rows of the batches before it (at
      least one, in either id order) must be committed, readable by another session;
    * each row carries the transaction that last wrote it (its xmin): grouped by it, no
      transaction of the backfill may have written more than BATCH_MAX rows."""
    folder = learner.dir / "migrations"
    runner.migrate(postgres.dsn, folder, target=1)
    with postgres.connect(autocommit=True) as conn:
        conn.execute("INSERT INTO users (name, email) SELECT 'user ' || n, "
                     "'u' || n || '@example.com' FROM generate_series(1, %s) n",
                     (BACKFILL_ROWS,))
    runner.migrate(postgres.dsn, folder, target=2)
    held = BACKFILL_ROWS // 2   # ids 1..BACKFILL_ROWS: the first batch holds neither end's
    with postgres.connect(autocommit=True) as app, postgres.connect(autocommit=True) as look:
        app.execute("BEGIN")
        app.execute("SELECT 1 FROM users WHERE id = %s FOR UPDATE", (held,))
        backfill = Background(runner.migrate, postgres.dsn, folder, 3)
        backfill.start()
        try:
            waiting = came_true(lambda: not backfill.is_alive() or look.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND pid <> ALL(%s)",
                ([app.info.backend_pid, look.info.backend_pid],)).fetchone()[0], 15)
            (done,) = look.execute("SELECT count(*) FROM users WHERE full_name IS NOT NULL"
                                   ).fetchone()
            stuck = waiting and backfill.is_alive()
        finally:
            app.execute("COMMIT")
        backfill.join(30)
    if backfill.is_alive():
        pytest.fail(f"V003 backfill of {BACKFILL_ROWS} users had not ended 30 s after the "
                    f"application released user {held}'s row", pytrace=False)
    assert not stuck or done > 0, (
        f"V003 backfill of {BACKFILL_ROWS} users: the application held user {held}'s row (a "
        f"write in flight), and the backfill waited for it with NONE of the rows it had "
        f"already written committed - another session still read full_name NULL for all "
        f"of them. So it held every one of those rows locked: an application write to any "
        f"of them waited for the whole backfill (one UPDATE over the table, or batches "
        f"inside one transaction - a loop the runner's transaction wraps, or savepoints)\n"
        f"An UPDATE keeps every row it wrote locked until its transaction ends: backfill "
        f"in batches of at most {BATCH_MAX} rows that COMMIT one by one (a DO block with "
        f"COMMIT in its loop), in a script the runner runs outside a transaction (first "
        f"line '-- migrate:no-transaction').")
    try:
        if backfill.error is not None:   # it gave up on the held row (a lock_timeout): again
            runner.migrate(postgres.dsn, folder, target=3)
    except Exception as exc:  # noqa: BLE001 - named in the message
        pytest.fail(f"V003 backfill failed on {BACKFILL_ROWS} users written before the "
                    f"expand: {type(exc).__name__}: {exc}\n{NO_TRANSACTION_HINT}",
                    pytrace=False)
    with postgres.connect(autocommit=True) as conn:
        (left,) = conn.execute("SELECT count(*) FROM users WHERE full_name IS DISTINCT "
                               "FROM name").fetchone()
        (amid,) = conn.execute("SELECT count(*) FROM users u WHERE full_name IS NULL AND "
                               "EXISTS (SELECT FROM users d WHERE d.id > u.id AND "
                               "d.full_name IS NOT NULL)").fetchone()
        groups = conn.execute("SELECT xmin::text, count(*) FROM users GROUP BY 1 "
                              "ORDER BY 2 DESC").fetchall()
    assert left == 0, (
        f"after V003, {left} of {BACKFILL_ROWS} users written before the expand have a "
        f"full_name that is not their name: the backfill must copy every row"
        + (f" - {amid} of them lie before rows it did copy: a batch loop that pages with "
           "OFFSET over the rows still NULL skips a batch each time, since every committed "
           "batch shrinks that set. Take each next batch WHERE full_name IS NULL with no "
           "OFFSET (or walk id ranges)" if amid else ""))
    tx, most = groups[0]
    assert most <= BATCH_MAX, (
        f"V003 backfilled {BACKFILL_ROWS} users in {len(groups)} transaction(s), one of "
        f"which (xid {tx}) wrote {most} rows; expected batches of at most {BATCH_MAX} rows, "
        f"each committed on its own\nAn UPDATE keeps every row it wrote locked until its "
        f"transaction ends: one transaction over the whole table (one UPDATE, or a loop of "
        f"batches inside the runner's transaction) makes every application write to a row "
        f"it has passed wait for the whole backfill - minutes on a big table, a stall the "
        f"expand-contract rename was meant to avoid. Backfill in batches that COMMIT one by "
        f"one (a DO block with COMMIT in its loop), in a script the runner runs outside a "
        f"transaction (first line '-- migrate:no-transaction').")


# --------------------------------------------------------------------------------------
# A step that must lock the table, while a long transaction holds a lock on it


class Background(threading.Thread):
    """``fn(*args)`` on a thread of its own: its result or error, and when it ended."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        super().__init__(daemon=True)
        self.fn, self.args = fn, args
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as exc:  # noqa: BLE001 - read by the test
            self.error = exc


# How long the application's query may wait behind a migration that waits for a lock: the
# README asks for a lock_timeout of at most 5 s; the rest is slack for a loaded machine.
STALL_LIMIT = 12.0
# How long the step's own lock wait may have lasted, as Postgres saw it (pg_locks.waitstart,
# a lower bound of the wait: observing it late never makes it longer): a lock_timeout of at
# most 5 s, plus slack for a timer that fires late on a loaded machine.
LOCK_WAIT_LIMIT = 7.5


@dataclass(frozen=True)
class LockedStep:
    version: int
    label: str
    done: str        # SQL: true once the step is applied


LOCKED_STEPS = [
    LockedStep(2, "V002 expand", "SELECT EXISTS (SELECT FROM information_schema.columns "
               "WHERE table_name = 'users' AND column_name = 'full_name')"),
    LockedStep(4, "V004 contract", "SELECT NOT EXISTS (SELECT FROM information_schema.columns "
               "WHERE table_name = 'users' AND column_name = 'name')"),
]


def longest_lock_wait(conn: Any, others: tuple[int, ...]) -> float:
    """How long the session that waits longest for a lock on users (not one of the test's
    `others`) has waited so far, in seconds, by the server's clock."""
    return float(conn.execute(
        "SELECT coalesce(max(extract(epoch FROM clock_timestamp() - waitstart)), 0) "
        "FROM pg_locks WHERE NOT granted AND relation = 'users'::regclass "
        "AND pid <> ALL(%s)", (list(others),)).fetchone()[0])


def waits_for_users(conn: Any, others: tuple[int, ...]) -> bool:
    """Whether a session (not one of the test's `others`) waits for a lock on users."""
    return bool(conn.execute(
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'users'::regclass "
        "AND pid <> ALL(%s)", (list(others),)).fetchone()[0])


def test_a_locking_step_gives_up_instead_of_stalling_the_application(
        runner: ModuleType, learner: Any, postgres: Any) -> None:
    """A report's long transaction has read users (it holds ACCESS SHARE) when the step's
    ALTER TABLE asks for ACCESS EXCLUSIVE. The ALTER waits in the lock queue, and every
    query on users that arrives after it queues behind it: with no lock_timeout the whole
    application stalls for as long as the report runs. With one, the step gives up (or
    retries) after a few seconds and the application's query goes through. V002, then V004,
    on one database."""
    folder = learner.dir / "migrations"
    for step in LOCKED_STEPS:
        runner.migrate(postgres.dsn, folder, target=step.version - 1)
        stalled, waited = application_stalls_behind(runner, postgres, folder, step)
        assert not stalled, (
            f"while {step.label} waited for a lock on users held by a long transaction (a "
            f"report), the application's 'SELECT count(*) FROM users' waited more than "
            f"{STALL_LIMIT:.0f} s, expected it to go through within a few seconds: a "
            f"waiting ALTER TABLE sits in the lock queue and every later query on the table "
            f"queues behind it - the whole application stalls for as long as the report "
            f"runs. Begin each migration that locks a table with SET LOCAL lock_timeout = "
            f"'5s' (at most), so the step gives up (and is run again later) instead")
        assert waited <= LOCK_WAIT_LIMIT, (
            f"while {step.label} waited for a lock on users held by a long transaction (a "
            f"report), its lock wait lasted {waited:.1f} s before it gave up (as Postgres "
            f"measured it, pg_locks.waitstart), expected at most 5 s: every query on users "
            f"that arrived meanwhile queued behind it, so the application stalled that long"
            f"\nThe step's lock_timeout is longer than 5 s (or it is bounded by something "
            f"else, such as a statement_timeout): begin each migration that locks a table "
            f"with SET LOCAL lock_timeout of a few seconds, '5s' at most - a deploy step "
            f"that gives up is run again, an application stalled for its users is an outage.")
        try:
            runner.migrate(postgres.dsn, folder, target=step.version)
        except Exception as exc:  # noqa: BLE001 - explained
            pytest.fail(f"once the long transaction had ended, migrate(target="
                        f"{step.version}) raised {type(exc).__name__}: {exc} - a step that "
                        f"gave up on its lock must apply when it is run again", pytrace=False)
        with postgres.connect() as conn:
            applied = conn.execute(step.done).fetchone()[0]
        assert applied, (
            f"once the long transaction had ended and migrate(target={step.version}) ran "
            f"again, {step.label} is still not applied")


def application_stalls_behind(runner: ModuleType, postgres: Any, folder: Path,
                              step: LockedStep) -> tuple[bool, float]:
    """Whether the application's query on users, sent while migrate(step) waits for a lock
    a long transaction holds, still waits STALL_LIMIT s later, and the longest lock wait on
    users seen meanwhile (the step's). The transaction then ends."""
    report = postgres.connect()  # a transaction left open after reading users
    app = postgres.connect(autocommit=True)
    watch = postgres.connect(autocommit=True)
    others = (report.info.backend_pid, app.info.backend_pid, watch.info.backend_pid)
    report.execute("SELECT count(*) FROM users").fetchone()
    deploy = Background(runner.migrate, postgres.dsn, folder, step.version)
    query = Background(lambda: app.execute("SELECT count(*) FROM users").fetchone())
    try:
        deploy.start()
        wait_until(lambda: not deploy.is_alive() or waits_for_users(watch, others),
                   f"migrate(target={step.version}) to wait for the report's lock on users",
                   timeout=30)
        waited = longest_lock_wait(watch, others)
        query.start()
        deadline = time.monotonic() + STALL_LIMIT
        while query.is_alive() and time.monotonic() < deadline:
            waited = max(waited, longest_lock_wait(watch, others))
            query.join(0.05)
        return query.is_alive(), waited
    finally:
        report.rollback()  # the report ends: whatever waited goes on
        query.join(30)
        deploy.join(60)
        for conn in (report, app, watch):
            conn.close()
