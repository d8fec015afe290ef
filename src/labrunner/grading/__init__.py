"""Instructor grading: many submissions, each verified in a sandbox, gathered in a gradebook.

A submission is a learner's workspace (a folder, or a .zip / .tar.gz of one). For every lab
graded, only the files the lab declares as the learner's (``learner_files``) are copied out
of it, as regular files, into a private folder; nothing else in the submission (conftest.py,
pytest.ini, sitecustomize.py, .pth files, fake results, symlinks) is ever read by the
verification. The verification itself is the runner's (``runner.run_lab``): a pytest process
per lab whose outcomes arrive signed, so an early exit, a crash or a fake summary scores the
collected tests as failed.

When the grader runs as root, each worker slot (``--jobs``) runs its submissions under a uid
of its own (``SANDBOX_UID_BASE + slot``, no passwd entry needed), so two submissions graded
at once never share a uid; a slot's private folders are ``0700`` and owned by its uid, and
are removed, together with every process and every file that uid left in the folders every
user may write to, before the slot takes the next submission. Each grading command leases a
slice of the uids (:func:`lease_uids`), so two commands never share one. Where the kernel
allows it, the process also gets private mount and IPC namespaces in which the submissions,
the instructor's hidden tests and the output folder are covered by empty filesystems, every
shared writable folder is a private size-capped tmpfs, the root file system is read-only and
/proc shows only its own uid's processes (and a Python installed under an unreadable home,
e.g. pyenv in /root, is made reachable without exposing the rest of it).

With the local backend (as root, where the kernel gives threads network namespaces), each lab
run of each submission also gets services of its own, in a network namespace of its own
(:mod:`labrunner.services.private`): no submission can connect to another's database, broker
or cache, nor to anything else listening on the machine's loopback.

Results are written per student (``OUT/results/<student>.json``, atomically, as each one
finishes) with a fingerprint of what was graded, so a re-run skips what is unchanged and a
crash or a Ctrl-C loses nothing that finished.

Modules: config, submissions, sandbox, grader, gradebook, cohort, summary."""

from __future__ import annotations

from .cohort import (
    CohortOutcome,
    grade_cohort,
    grade_with_services,
    prepare_submissions,
)
from .config import (
    GRADES_VERSION,
    HIDDEN_PREFIX,
    STATUS,
    GradeConfig,
    GradingError,
    Limits,
    use_private_services,
)
from .gradebook import (
    comparable,
    feedback_html,
    feedback_markdown,
    gradebook_document,
    grades_csv,
    lab_columns,
    merge,
    read_result,
    results_dir,
    write_atomic,
    write_gradebook,
)
from .grader import (
    PURGE_PLUGIN,
    Grader,
    infrastructure_error,
    problem_document,
)
from .records import concept_record
from .sandbox import (
    CLONE_NEWIPC,
    CLONE_NEWNS,
    LEARNER_UID_OFFSET,
    LEASE_DIR,
    PRIVATE_TMP_BYTES,
    SANDBOX_UID_BASE,
    SANDBOX_UID_COUNT,
    SERVICE_UID_OFFSET,
    SHARED_WRITABLE,
    UID_LEASES,
    MountPlan,
    _blocked_ancestors,
    lease_uids,
    leased_uid_ranges,
    namespaces_available,
    process_uid,
)
from .submissions import (
    ARCHIVE_SUFFIXES,
    MAX_ARCHIVE_BYTES,
    MAX_ARCHIVE_FILE,
    MAX_ARCHIVE_MEMBERS,
    MAX_LEARNER_FILE,
    MAX_MEMBER_DEPTH,
    MAX_MEMBER_NAME,
    MAX_TAR_HEADER,
    Submission,
    discover,
    fingerprint,
    hidden_tests_for,
    lab_version,
    parse_shard,
    read_learner_file,
    remove_tree,
    safe_student_id,
    shard_of,
    unpack,
)
from .summary import (
    print_summary,
)

__all__ = [
    "ARCHIVE_SUFFIXES",
    "CLONE_NEWIPC",
    "CLONE_NEWNS",
    "CohortOutcome",
    "GRADES_VERSION",
    "GradeConfig",
    "Grader",
    "GradingError",
    "HIDDEN_PREFIX",
    "LEARNER_UID_OFFSET",
    "LEASE_DIR",
    "Limits",
    "MAX_ARCHIVE_BYTES",
    "MAX_ARCHIVE_FILE",
    "MAX_ARCHIVE_MEMBERS",
    "MAX_LEARNER_FILE",
    "MAX_MEMBER_DEPTH",
    "MAX_MEMBER_NAME",
    "MAX_TAR_HEADER",
    "MountPlan",
    "PRIVATE_TMP_BYTES",
    "PURGE_PLUGIN",
    "SANDBOX_UID_BASE",
    "SANDBOX_UID_COUNT",
    "SERVICE_UID_OFFSET",
    "SHARED_WRITABLE",
    "STATUS",
    "Submission",
    "UID_LEASES",
    "_blocked_ancestors",
    "comparable",
    "concept_record",
    "discover",
    "feedback_html",
    "feedback_markdown",
    "fingerprint",
    "grade_cohort",
    "grade_with_services",
    "gradebook_document",
    "grades_csv",
    "hidden_tests_for",
    "infrastructure_error",
    "lab_columns",
    "lab_version",
    "lease_uids",
    "leased_uid_ranges",
    "merge",
    "namespaces_available",
    "parse_shard",
    "prepare_submissions",
    "print_summary",
    "problem_document",
    "process_uid",
    "read_learner_file",
    "read_result",
    "remove_tree",
    "results_dir",
    "safe_student_id",
    "shard_of",
    "unpack",
    "use_private_services",
    "write_atomic",
    "write_gradebook",
]
