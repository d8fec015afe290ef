"""Verification for ph3.7: the learner's deny-by-default policy engine against decision
tables. The first table is the README's own document policy; the second is a hospital
policy the README never shows, with cases chosen for the ways such engines go wrong:
default allow, inheritance that is not transitive, an ABAC rule that narrows a role, deny
that must win whatever the order, attributes that are missing, actions that only share a
prefix, a role cycle, a subject with several roles (an undefined one or one that grants
nothing first), `in` over a value that is not a list (a string, a dict), literals with dots
that are not attribute paths, attributes missing on both sides of a condition (None ==
None is no match), and an engine that edits the caller's subject or policy in place (asked
in turn about the same objects, beside the engine: learner.harness()). The policies are
data, so an engine written for the README's example alone fails the second table."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest

DOCS_POLICY: dict[str, Any] = {
    "roles": {
        "viewer": {"permissions": ["doc:read"]},
        "editor": {"inherits": ["viewer"], "permissions": ["doc:write"]},
        "admin": {"inherits": ["editor"], "permissions": ["doc:delete"]},
    },
    "rules": [
        {"effect": "require", "actions": ["doc:write", "doc:delete"],
         "when": [["subject.dept", "==", "resource.dept"]]},
        {"effect": "allow", "actions": ["doc:read"],
         "when": [["resource.owner", "==", "subject.id"]]},
        {"effect": "deny", "actions": ["doc:read", "doc:write", "doc:delete"],
         "when": [["resource.classification", "==", "secret"],
                  ["subject.clearance", "!=", "secret"]]},
    ],
}

HOSPITAL_POLICY: dict[str, Any] = {
    "roles": {
        "nurse": {"permissions": ["record:read"]},
        "doctor": {"inherits": ["nurse"], "permissions": ["record:write",
                                                          "prescription:create"]},
        "chief": {"inherits": ["doctor"], "permissions": ["record:archive", "record:purge"]},
        "auditor": {"permissions": ["audit:read"]},
        "locum": {"inherits": ["relief"], "permissions": []},
        "relief": {"inherits": ["locum"], "permissions": ["record:read"]},
        "records": {"permissions": ["record"]},
        "exporter": {"permissions": ["record:export"]},
        "pharmacist": {"permissions": ["dose:approve"]},
        "triage": {"permissions": ["bed:assign"]},
        "visitor": {"permissions": []},  # a role that grants nothing
        "clerk": {"permissions": ["form:submit"]},
        "attending": {"inherits": ["triage", "nurse"], "permissions": []},  # a diamond
    },
    "rules": [
        # the patient reads their own record, without any role (listed before the deny)
        {"effect": "allow", "actions": ["record:read"],
         "when": [["resource.patient_id", "==", "subject.id"]]},
        {"effect": "allow", "actions": ["record:read"],
         "when": [["subject.id", "in", "resource.care_team"]]},
        {"effect": "deny", "actions": ["record:read", "record:write", "record:archive"],
         "when": [["resource.status", "==", "sealed"]]},
        {"effect": "require", "actions": ["record:write", "prescription:create"],
         "when": [["subject.ward", "==", "resource.ward"]]},
        {"effect": "require", "actions": ["record:read"],
         "when": [["context.hour", ">=", 7], ["context.hour", "<=", 19]]},
        {"effect": "deny", "actions": ["prescription:create"],
         "when": [["subject.suspended", "==", True]]},
        # archiving needs a second factor: the boolean true, not a 1 that equals it in Python
        {"effect": "require", "actions": ["record:archive"],
         "when": [["subject.mfa", "==", True]]},
        # a deny over a context attribute: without a context it cannot be checked
        {"effect": "deny", "actions": ["record:export"],
         "when": [["context.network", "==", "public"]]},
        # an ordering between two attributes: numbers only, never text or booleans
        {"effect": "require", "actions": ["dose:approve"],
         "when": [["subject.level", ">=", "resource.min_level"]]},
        # scores are fractions: an ordering of floats, and of an int against a float
        {"effect": "deny", "actions": ["bed:assign"],
         "when": [["resource.risk", ">=", 0.9]]},
        # rules without conditions hold for every request of their actions: nobody purges a
        # record, anybody reads the status page, and the audit log needs nothing more
        {"effect": "deny", "actions": ["record:purge"], "when": []},
        {"effect": "allow", "actions": ["status:read"]},
        {"effect": "require", "actions": ["audit:read"], "when": []},
        # 'in' holds for a list only: badges kept as a string or a dict never match
        {"effect": "allow", "actions": ["ward:enter"],
         "when": [["subject.badge", "in", "resource.badges"]]},
        # literals with dots: a domain and a version, not attribute paths
        {"effect": "allow", "actions": ["portal:login"],
         "when": [["subject.email_domain", "==", "hospital.example"]]},
        {"effect": "deny", "actions": ["form:submit"],
         "when": [["resource.schema", "==", "1.2"]]},
    ],
}


@dataclass(frozen=True)
class Case:
    name: str
    subject: dict[str, Any]
    action: str
    resource: dict[str, Any]
    allow: bool
    why: str
    context: dict[str, Any] | None = field(default=None)


def doc(**attrs: Any) -> dict[str, Any]:
    return {"id": "d1", "dept": "eng", "owner": "u9", "classification": "internal", **attrs}


DOCS_CASES = [
    Case("viewer reads", {"id": "u1", "roles": ["viewer"], "dept": "eng"}, "doc:read", doc(),
         True, "viewer has doc:read"),
    Case("viewer writes", {"id": "u1", "roles": ["viewer"], "dept": "eng"}, "doc:write",
         doc(), False, "no role grants doc:write to a viewer"),
    Case("editor writes in their dept", {"id": "u2", "roles": ["editor"], "dept": "eng"},
         "doc:write", doc(), True, "editor has doc:write and the depts match"),
    Case("editor writes in another dept", {"id": "u2", "roles": ["editor"], "dept": "ops"},
         "doc:write", doc(), False, "the require rule narrows the role: depts differ"),
    Case("editor reads (inherited)", {"id": "u2", "roles": ["editor"], "dept": "ops"},
         "doc:read", doc(), True, "editor inherits viewer's doc:read"),
    Case("admin reads (inherited two levels)", {"id": "u3", "roles": ["admin"], "dept": "ops"},
         "doc:read", doc(), True,
         "admin -> editor -> viewer: inheritance is transitive, doc:read comes from viewer"),
    Case("owner reads without a role", {"id": "u9", "roles": [], "dept": "ops"}, "doc:read",
         doc(), True, "the allow rule: the owner reads their document"),
    Case("admin reads a secret doc", {"id": "u3", "roles": ["admin"], "dept": "eng",
                                      "clearance": "none"}, "doc:read",
         doc(classification="secret"), False, "the deny rule wins over every role"),
    Case("cleared admin reads a secret doc", {"id": "u3", "roles": ["admin"], "dept": "eng",
                                              "clearance": "secret"}, "doc:read",
         doc(classification="secret"), True,
         "cleared, so the deny rule does not apply; doc:read comes from admin -> editor -> "
         "viewer"),
]


def nurse(**attrs: Any) -> dict[str, Any]:
    return {"id": "n1", "roles": ["nurse"], "ward": 3, "suspended": False, **attrs}


def doctor(**attrs: Any) -> dict[str, Any]:
    return {"id": "dr1", "roles": ["doctor"], "ward": 3, "suspended": False, **attrs}


def record(**attrs: Any) -> dict[str, Any]:
    return {"id": "r1", "patient_id": "p7", "ward": 3, "status": "open",
            "care_team": ["c5", "dr1"], **attrs}


DAY = {"hour": 10}
NIGHT = {"hour": 23}

HOSPITAL_CASES = [
    Case("nurse reads by day", nurse(), "record:read", record(), True,
         "nurse has record:read; the hour is within 7-19", DAY),
    Case("nurse writes", nurse(), "record:write", record(), False,
         "no role of a nurse grants record:write", DAY),
    Case("doctor writes in their ward", doctor(), "record:write", record(), True,
         "doctor has record:write and the wards match", DAY),
    Case("doctor writes in another ward", doctor(ward=4), "record:write", record(), False,
         "an ABAC require rule narrows the role: the wards differ", DAY),
    Case("doctor reads (inherited from nurse)", doctor(ward=4), "record:read", record(), True,
         "doctor inherits nurse: inheritance gives record:read", DAY),
    Case("chief reads (inherited two levels)", {"id": "c1", "roles": ["chief"], "ward": 1},
         "record:read", record(), True, "chief -> doctor -> nurse: inheritance is transitive",
         DAY),
    Case("chief archives", {"id": "c1", "roles": ["chief"], "ward": 1, "mfa": True},
         "record:archive", record(), True, "chief has record:archive, with mfa true", DAY),
    Case("chief with mfa 1 archives", {"id": "c1", "roles": ["chief"], "ward": 1, "mfa": 1},
         "record:archive", record(), False,
         "subject.mfa is 1, the rule needs the boolean true: 1 == True holds in Python, but "
         "values are compared without converting types (check type(a) is type(b), so a 1, "
         "1.0 or '1' never stands in for true)", DAY),
    Case("chief with mfa 'true' archives", {"id": "c1", "roles": ["chief"], "ward": 1,
                                            "mfa": "true"}, "record:archive", record(), False,
         "subject.mfa is the string 'true', not the boolean: no type conversion", DAY),
    Case("exporter exports on the internal network", {"id": "e1", "roles": ["exporter"]},
         "record:export", record(), True, "exporter has record:export; network is internal",
         {"hour": 10, "network": "internal"}),
    Case("exporter exports from a public network", {"id": "e1", "roles": ["exporter"]},
         "record:export", record(), False, "the deny rule: context.network is public",
         {"hour": 10, "network": "public"}),
    Case("exporter exports with a context lacking network", {"id": "e1", "roles": ["exporter"]},
         "record:export", record(), False,
         "context.network is missing: the deny rule cannot be checked, so it applies "
         "(fail closed)", {"hour": 10}),
    Case("exporter exports without a context", {"id": "e1", "roles": ["exporter"]},
         "record:export", record(), False,
         "context is None, so context.network is a MISSING attribute (unknown), not the "
         "literal string 'context.network': a deny rule that cannot be checked applies "
         "(fail closed) - read 'context.x' from an empty context when none is given", None),
    Case("chief writes in another ward", {"id": "c1", "roles": ["chief"], "ward": 1},
         "record:write", record(), False, "the ward rule narrows every role, chief's too", DAY),
    Case("chief reads a sealed record", {"id": "c1", "roles": ["chief"], "ward": 3},
         "record:read", record(status="sealed"), False, "deny wins over any role", DAY),
    Case("patient reads own record", {"id": "p7", "roles": []}, "record:read", record(),
         True, "an allow rule grants it without any role", DAY),
    Case("patient reads another's record", {"id": "p8", "roles": []}, "record:read",
         record(), False, "nothing allows it: deny by default", DAY),
    Case("patient reads own sealed record", {"id": "p7", "roles": []}, "record:read",
         record(status="sealed"), False,
         "deny wins even over an allow rule listed before it: order does not matter", DAY),
    Case("patient reads own record at night", {"id": "p7", "roles": []}, "record:read",
         record(), False, "the hour rule (require) narrows the allow rule too", NIGHT),
    Case("care team member reads", {"id": "c5", "roles": []}, "record:read", record(), True,
         "'in': subject.id is in resource.care_team", DAY),
    Case("nurse reads at night", nurse(), "record:read", record(), False,
         "require: context.hour must be within 7-19", NIGHT),
    Case("nurse reads without a context", nurse(), "record:read", record(), False,
         "context.hour is missing: a require rule that cannot be checked is not met", None),
    Case("unknown action", {"id": "c1", "roles": ["chief"], "ward": 3}, "record:delete",
         record(), False, "no role and no rule mentions record:delete: deny by default", DAY),
    Case("action sharing a prefix", nurse(), "record:read:all", record(), False,
         "record:read does not grant record:read:all: actions match exactly", DAY),
    Case("action in capitals", nurse(), "RECORD:READ", record(), False,
         "'RECORD:READ' is not 'record:read': actions match exactly, letter case included - "
         "an engine that folds case grants an action name no role and no rule lists", DAY),
    Case("action with a trailing blank", nurse(), "record:read ", record(), False,
         "'record:read ' is not 'record:read': actions match exactly - an engine that strips "
         "or normalises the name grants an action no role and no rule lists", DAY),
    Case("permission that is a prefix", {"id": "x1", "roles": ["records"], "ward": 3},
         "record:read", record(), False,
         "the permission 'record' is not 'record:read': no prefixes, no wildcards", DAY),
    Case("undefined role", {"id": "x2", "roles": ["superuser"], "ward": 3}, "record:read",
         record(), False, "a role the policy does not define grants nothing", DAY),
    Case("no roles attribute", {"id": "x3", "ward": 3}, "record:read", record(), False,
         "a subject without roles gets nothing", DAY),
    Case("doctor without a ward writes", {"id": "dr2", "roles": ["doctor"],
                                          "suspended": False}, "record:write", record(),
         False, "subject.ward is missing: the require rule is not met", DAY),
    # two missing attributes are not equal: a condition that reads one is unknown
    Case("a subject without an id reads a record without a patient_id", {"roles": []},
         "record:read", {k: v for k, v in record().items() if k != "patient_id"}, False,
         "subject.id and resource.patient_id are both missing: the allow rule "
         "'resource.patient_id == subject.id' is unknown, so it is not met - an engine that "
         "reads a missing attribute as None finds None == None true and lets anyone without "
         "an id read every record without a patient", DAY),
    Case("doctor without a ward writes a record without a ward",
         {"id": "dr2", "roles": ["doctor"], "suspended": False}, "record:write",
         {k: v for k, v in record().items() if k != "ward"}, False,
         "subject.ward and resource.ward are both missing: the require rule "
         "'subject.ward == resource.ward' is unknown, so it is not met - two missing "
         "attributes are not two equal values (None == None holds in Python)", DAY),
    Case("doctor prescribes", doctor(), "prescription:create", record(), True,
         "doctor has it, same ward, not suspended", DAY),
    Case("suspended doctor prescribes", doctor(suspended=True), "prescription:create",
         record(), False, "the deny rule: suspended", DAY),
    Case("doctor with no 'suspended' prescribes", {"id": "dr3", "roles": ["doctor"],
                                                   "ward": 3},
         "prescription:create", record(), False,
         "subject.suspended is missing: a deny rule that cannot be checked applies "
         "(fail closed)", DAY),
    Case("ward as a string", doctor(ward="3"), "record:write", record(), False,
         "'3' is not 3: comparisons do not convert types", DAY),
    Case("auditor reads the audit log", {"id": "a1", "roles": ["auditor"]}, "audit:read",
         {"id": "log"}, True, "auditor has audit:read, and the require rule for audit:read "
         "has no conditions ('when': []): all of no conditions hold, so it is met", DAY),
    Case("auditor reads a record", {"id": "a1", "roles": ["auditor"]}, "record:read",
         record(), False, "auditor has no record permission", DAY),
    Case("locum (cyclic roles) reads", {"id": "l1", "roles": ["locum"], "ward": 3},
         "record:read", record(), True,
         "locum inherits relief, which inherits locum: walk each role once, and "
         "relief's record:read is granted", DAY),
    Case("pharmacist of level 10 approves a level-9 dose",
         {"id": "ph1", "roles": ["pharmacist"], "level": 10}, "dose:approve",
         {"id": "dose1", "min_level": 9}, True, "10 >= 9: the require rule holds", DAY),
    Case("pharmacist of level 9 approves a level-10 dose",
         {"id": "ph1", "roles": ["pharmacist"], "level": 9}, "dose:approve",
         {"id": "dose1", "min_level": 10}, False, "9 >= 10 is false", DAY),
    Case("levels as strings '9' >= '10'",
         {"id": "ph1", "roles": ["pharmacist"], "level": "9"}, "dose:approve",
         {"id": "dose1", "min_level": "10"}, False,
         "<= and >= compare numbers only: two strings compare as text, where '9' >= '10' "
         "holds - a level kept as text would approve what it must not", DAY),
    Case("level True >= 1",
         {"id": "ph1", "roles": ["pharmacist"], "level": True}, "dose:approve",
         {"id": "dose1", "min_level": 1}, False,
         "True is a boolean, not a number, though True >= 1 holds in Python: <= and >= take "
         "int and float, never bool", DAY),
    Case("triage assigns a bed of risk 0.5", {"id": "t1", "roles": ["triage"]}, "bed:assign",
         {"id": "b1", "risk": 0.5}, True, "0.5 >= 0.9 is false: the deny rule does not apply",
         DAY),
    Case("triage assigns a bed of risk 0.95", {"id": "t1", "roles": ["triage"]},
         "bed:assign", {"id": "b1", "risk": 0.95}, False,
         "0.95 >= 0.9: the deny rule applies - <= and >= compare numbers, and a float is a "
         "number as much as an int (only bool is not); an ordering that is false for "
         "floats drops this deny", DAY),
    Case("triage assigns a bed of risk 1 (an int)", {"id": "t1", "roles": ["triage"]},
         "bed:assign", {"id": "b1", "risk": 1}, False,
         "1 >= 0.9: an int and a float are both numbers and compare as numbers - 'without "
         "converting types' keeps text and booleans out, not one kind of number from the "
         "other", DAY),
    Case("nurse reads at half past six pm (hour 18.5)", nurse(), "record:read", record(),
         True, "18.5 is within 7-19: a float hour compares with the int bounds", {"hour": 18.5}),
    Case("chief purges a record", {"id": "c1", "roles": ["chief"], "ward": 3, "mfa": True},
         "record:purge", record(), False,
         "a deny rule with no conditions ('when': []) applies to every request for its "
         "actions: all of no conditions hold - the chief's record:purge permission is "
         "denied outright", DAY),
    Case("patient reads the status page", {"id": "p7", "roles": []}, "status:read",
         {"id": "status"}, True,
         "an allow rule without 'when' has no conditions: it allows its actions to anyone "
         "(all of no conditions hold)", DAY),
    Case("locum (cyclic roles) writes", {"id": "l1", "roles": ["locum"], "ward": 3},
         "record:write", record(), False, "neither locum nor relief grants it", DAY),
    # 'in': the right operand is a list, or the condition does not hold
    Case("badge A enters a ward whose badges are ['A', 'B']", {"id": "v1", "badge": "A"},
         "ward:enter", {"id": "w1", "badges": ["A", "B"]}, True,
         "'in': 'A' is an element of the list ['A', 'B']", DAY),
    Case("badge A enters a ward whose badges are the string 'ABC'",
         {"id": "v1", "badge": "A"}, "ward:enter", {"id": "w1", "badges": "ABC"}, False,
         "'in' holds for a list only: 'ABC' is a string, so 'A' is not one of its elements "
         "- Python's `a in b` on two strings is substring search (and iterating a string "
         "walks its characters): 'A' in 'ABC' holds, and so would 'AB', 'BC' or ''", DAY),
    Case("badge A enters a ward whose badges are the string 'A'", {"id": "v1", "badge": "A"},
         "ward:enter", {"id": "w1", "badges": "A"}, False,
         "'in' holds for a list only: the string 'A' is not a list holding 'A' (an engine "
         "that checks isinstance(right, list) never matches text)", DAY),
    Case("badge c5 enters a ward whose badges are the dict {'c5': 'day'}",
         {"id": "v1", "badge": "c5"}, "ward:enter", {"id": "w1", "badges": {"c5": "day"}},
         False, "'in' holds for a list only: on a dict Python's `in` looks up the keys - a "
         "mapping is not a list of values", DAY),
    Case("badge 5 enters a ward whose badges are the number 5", {"id": "v1", "badge": 5},
         "ward:enter", {"id": "w1", "badges": 5}, False,
         "'in' holds for a list only: 5 is not a list (and `5 in 5` raises TypeError: "
         "check the right operand's type before using it)", DAY),
    # 'in' compares each element as '==' does: a boolean is no number, even in a list
    Case("badge true enters a ward whose badges are [1, 2]", {"id": "v1", "badge": True},
         "ward:enter", {"id": "w1", "badges": [1, 2]}, False,
         "'in' compares each element as '==' does, without converting types: True == 1 "
         "holds in Python (so does True in [1, 2]), but a boolean is not the number 1 - "
         "check type(a) is type(x) and a == x for each element", DAY),
    Case("badge 0 enters a ward whose badges are [False]", {"id": "v1", "badge": 0},
         "ward:enter", {"id": "w1", "badges": [False]}, False,
         "'in' compares each element as '==' does, without converting types: 0 == False "
         "holds in Python, but the number 0 is not the boolean false", DAY),
    Case("care team member reads a record whose care_team is the string 'c5,dr1'",
         {"id": "c5", "roles": []}, "record:read", record(care_team="c5,dr1"), False,
         "'in' holds for a list only: 'c5,dr1' is text, and 'c5' in 'c5,dr1' is substring "
         "search - 'c', '5,d' or 'dr' would match too", DAY),
    # literals that contain a dot are literals: only subject., resource. and context. read
    Case("a user of hospital.example logs in", {"id": "u5", "email_domain": "hospital.example"},
         "portal:login", {"id": "portal"}, True,
         "'hospital.example' is a literal: an operand reads an attribute only when it starts "
         "with 'subject.', 'resource.' or 'context.' - an engine that takes any 'x.y' for a "
         "path finds no attribute 'example' of a 'hospital' and never allows this", DAY),
    Case("a user of evil.example logs in", {"id": "u6", "email_domain": "evil.example"},
         "portal:login", {"id": "portal"}, False, "'evil.example' is not 'hospital.example'",
         DAY),
    Case("clerk submits a form of schema 2.0", {"id": "k1", "roles": ["clerk"]},
         "form:submit", {"id": "f1", "schema": "2.0"}, True,
         "the deny holds for schema '1.2' only, a literal: an engine that reads '1.2' as the "
         "attribute '2' of a scope '1' finds it missing and denies every form", DAY),
    Case("clerk submits a form of schema 1.2", {"id": "k1", "roles": ["clerk"]},
         "form:submit", {"id": "f1", "schema": "1.2"}, False,
         "resource.schema equals the literal '1.2': the deny applies - '1.2' is a value, "
         "not a path to look up", DAY),
    # several roles: each grants on its own, in any order
    Case("an undefined role listed before nurse", nurse(roles=["superuser", "nurse"]),
         "record:read", record(), True,
         "the subject's roles each grant on their own: 'superuser' is not defined, so it "
         "grants nothing and the walk goes on to 'nurse' - skip it (continue), do not stop "
         "there (break)", DAY),
    Case("a role that grants nothing listed before nurse", nurse(roles=["visitor", "nurse"]),
         "record:read", record(), True,
         "'visitor' grants nothing, 'nurse' grants record:read: the permissions are those of "
         "EVERY role of the subject, not of the first one defined", DAY),
    Case("doctor, nurse (already inherited) and exporter export",
         {"id": "dx", "roles": ["doctor", "nurse", "exporter"], "ward": 3},
         "record:export", record(), True,
         "doctor inherits nurse, so 'nurse' is already walked when the list reaches it: a "
         "role seen before is skipped (continue), the walk does not end there (break), and "
         "exporter's record:export is granted", {"hour": 10, "network": "internal"}),
    Case("nurse and attending (inherits triage and nurse) assign a bed",
         {"id": "at1", "roles": ["nurse", "attending"]}, "bed:assign",
         {"id": "b1", "risk": 0.5}, True,
         "attending inherits triage and nurse; nurse was walked already: a role seen before "
         "is skipped (continue) and its siblings are still walked - stopping there (break) "
         "loses triage's bed:assign", DAY),
]


def decide(module: Any, policy: dict[str, Any], case: Case) -> str | None:
    try:
        got = module.is_allowed(case.subject, case.action, case.resource, policy,
                                case.context)
    except NotImplementedError as exc:
        pytest.fail(f"is_allowed() is not implemented yet: {exc}", pytrace=False)
    except Exception as exc:  # noqa: BLE001 - the learner's error, reported plainly
        return (f"{case.name}: is_allowed() raised {type(exc).__name__}: {exc}; an engine "
                "decides (False when in doubt), it does not crash")
    if got is not True and got is not False:
        return f"{case.name}: is_allowed() returned {got!r}, expected True or False"
    if got != case.allow:
        return (f"{case.name}: {case.action} was {'allowed' if got else 'denied'}, expected "
                f"{'allow' if case.allow else 'deny'}: {case.why}")
    return None


def run_table(learner: Any, policy: dict[str, Any], cases: list[Case], label: str) -> None:
    module = learner.load("policy")
    wrong = [w for case in cases if (w := decide(module, policy, case))]
    assert not wrong, "\n".join(wrong) + f"\n({len(wrong)} of {len(cases)} {label} wrong)"


def test_readme_document_policy(learner: Any) -> None:
    run_table(learner, DOCS_POLICY, DOCS_CASES, "decisions of the README's policy")


def test_hospital_policy_decision_table(learner: Any) -> None:
    run_table(learner, HOSPITAL_POLICY, HOSPITAL_CASES, "decisions of the hospital policy")


def test_empty_policy_denies_everything(learner: Any) -> None:
    module = learner.load("policy")
    cases = [Case("empty policy", {"id": "u1", "roles": ["admin"]}, action, {"id": "x"},
                  False, "no roles and no rules: nothing is allowed (deny by default)")
             for action in ("doc:read", "doc:write", "")]
    wrong = [w for case in cases if (w := decide(module, {"roles": {}, "rules": []}, case))]
    assert not wrong, "\n".join(wrong)



# One rule per case over a viewer policy: conditions whose operator is not one of the
# language's five (==, !=, in, <=, >=). The engine cannot evaluate them, so they are
# unknown - like a missing attribute: a deny rule with one applies, a require or allow rule
# with one is not met. Each case's condition, read with its everyday meaning, would give the
# same decision, so an engine that also knows '>' or 'not in' is not marked wrong.
UNKNOWN = ("is not an operator of the policy language (==, !=, in, <=, >=): the engine "
           "cannot evaluate the condition, so it is unknown, like a missing attribute - ")
FAILS_CLOSED = UNKNOWN + ("a deny rule that cannot be evaluated applies (fail closed); "
                          "counting it as false silently drops the deny")
NOT_MET = UNKNOWN + "a require or allow rule that cannot be evaluated is not met"


def one_rule(effect: str, condition: list[Any], op: str, why: str,
             roles: list[str]) -> tuple[dict[str, Any], Case]:
    policy = {"roles": {"viewer": {"permissions": ["doc:read"]}},
              "rules": [{"effect": effect, "actions": ["doc:read"], "when": [condition]}]}
    subject = {"id": "u1", "roles": roles, "risk": 90, "dept": "ops", "status": "blocked",
               "level": 1}
    name = f"a {'viewer' if roles else 'subject without roles'}, a {effect} rule {condition}"
    return policy, Case(name, subject, "doc:read", {"id": "d1"}, False, f"{op} {why}")


UNKNOWN_OPERATOR_CASES = [
    one_rule("deny", ["subject.risk", ">", 50], "'>'", FAILS_CLOSED, ["viewer"]),
    one_rule("deny", ["subject.level", "<", 5], "'<'", FAILS_CLOSED, ["viewer"]),
    one_rule("deny", ["subject.dept", "not in", ["eng"]], "'not in'", FAILS_CLOSED,
             ["viewer"]),
    one_rule("deny", ["subject.status", "=", "blocked"], "'=' (a typo of '==')",
             FAILS_CLOSED, ["viewer"]),
    one_rule("require", ["subject.level", ">", 5], "'>'", NOT_MET, ["viewer"]),
    one_rule("allow", ["subject.level", ">", 5], "'>'", NOT_MET, []),
]


def test_unknown_operators_are_unknown(learner: Any) -> None:
    module = learner.load("policy")
    wrong = [w for policy, case in UNKNOWN_OPERATOR_CASES if (w := decide(module, policy, case))]
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {len(UNKNOWN_OPERATOR_CASES)} rules with an unknown operator "
        "decided wrong)")


# One subject, resource, policy and context, asked about several actions in turn by the
# harness, where the engine runs: as a web app asks about one loaded user, with one live
# policy. Each decision must be right and no call may change the caller's data.
DOCS_POLICY_AS_WRITTEN = copy.deepcopy(DOCS_POLICY)  # before any engine has seen it
IN_TURN = [
    ({"id": "u3", "roles": ["admin"], "dept": "eng"}, ["doc:read", "doc:write", "doc:delete",
                                                        "doc:read"], [True, True, True, True]),
    ({"id": "u1", "roles": ["viewer", "editor"], "dept": "eng"}, ["doc:write", "doc:read"],
     [True, True]),
]


def test_the_callers_data_is_left_as_it_was(learner: Any) -> None:
    """The engine reads the subject, resource, policy and context it is given: it never
    changes them, so the next question about the same objects gets the same answer."""
    module = learner.load("policy")
    for subject, actions, expected in IN_TURN:
        policy = copy.deepcopy(DOCS_POLICY_AS_WRITTEN)
        seen = learner.harness().decide_in_turn(module, copy.deepcopy(subject),
                                                list(actions), doc(), policy, {"hour": 10})
        for number, (step, allow) in enumerate(zip(seen, expected, strict=True), 1):
            asked = (f"the same subject {subject!r} asked about {', '.join(actions)} in turn, "
                     f"call {number} ({step['action']})")
            if step["changed"]:
                pytest.fail(
                    f"{asked} changed the caller's data: {'; '.join(step['changed'])} - the "
                    f"engine must read its arguments, never edit them: a list taken from "
                    f"them (subject['roles'] as the work list, a role's 'permissions' "
                    f"extended with inherited ones) is the caller's own - copy it first "
                    f"(list(...), set(...)), or the next question about the same user, or "
                    f"under the same policy, gets another answer", pytrace=False)
            assert step["decision"] is allow, (
                f"{asked}: is_allowed() returned {step['decision']!r}, expected {allow}")


def without_permission(policy: dict[str, Any], role: str, action: str) -> dict[str, Any]:
    """A fresh copy of `policy` in which `role` no longer grants `action`."""
    roles = {name: {**spec, "permissions": [p for p in spec.get("permissions", [])
                                            if name != role or p != action]}
             for name, spec in policy["roles"].items()}
    return {"roles": roles, "rules": [dict(rule) for rule in policy["rules"]]}


def test_a_changed_policy_takes_effect_at_once(learner: Any) -> None:
    """One engine, the policy changed between two calls (viewer's doc:read revoked, then
    given back): each decision comes from the policy passed in on that call."""
    module = learner.load("policy")
    revoked = without_permission(DOCS_POLICY, "viewer", "doc:read")
    steps = [
        (DOCS_POLICY, True, "viewer has doc:read"),
        (revoked, False, "the policy passed in no longer grants doc:read to viewer (nor to "
                         "any role that inherits it): permissions remembered from an earlier "
                         "policy (a cache keyed by role names, a module-level dict) outlive "
                         "the revocation - read the roles of the policy of this call"),
        (DOCS_POLICY, True, "doc:read is granted again: a cache keyed by role names keeps "
                            "the revoked answer"),
    ]
    for role in ("viewer", "admin"):
        for number, (policy, allow, why) in enumerate(steps, 1):
            case = Case(f"{role} reads, policy change step {number} of "
                        f"{len(steps)}", {"id": "u1", "roles": [role], "dept": "eng",
                                           "clearance": "secret"},
                        "doc:read", doc(), allow, why)
            wrong = decide(module, policy, case)
            assert wrong is None, wrong
