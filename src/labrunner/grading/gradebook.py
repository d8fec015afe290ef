"""The gradebook: grades.json, grades.csv, feedback (Markdown or HTML), the cohort page, merging
shards."""

from __future__ import annotations

import csv
import html
import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..catalog import Lab
from ..roadmap_page import cohort_page
from ..runner import clean_text
from .config import GRADES_VERSION, GradingError
from .sandbox import leased_uid_ranges


def results_dir(out: Path) -> Path:
    return out / "results"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_result(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("version") == GRADES_VERSION else None


def lab_columns(labs: Sequence[Lab], students: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    columns: dict[str, dict[str, Any]] = {}
    for lab in labs:
        columns[lab.id] = {"id": lab.id, "slug": lab.slug, "title": lab.title,
                           "points": lab.points}
    for doc in students:
        for concept in doc.get("concepts", []):
            columns.setdefault(concept["id"], {"id": concept["id"], "slug": concept["slug"],
                                               "title": concept["title"],
                                               "points": concept["max_points"]})
    return list(columns.values())


def gradebook_document(labs: Sequence[Lab], students: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(students, key=lambda d: d["student"])
    counts: dict[str, int] = {"pass": 0, "fail": 0, "error": 0, "timeout": 0}
    for doc in ordered:
        for concept in doc["concepts"]:
            counts[concept["status"]] = counts.get(concept["status"], 0) + 1
    retried = [f"{doc['student']} {c['id']}" for doc in ordered for c in doc["concepts"]
               if c.get("retried")]
    return {
        "version": GRADES_VERSION,
        "tool": {"name": "labrunner", "version": __version__,
                 "sandbox_uids": leased_uid_ranges()},
        "concepts": lab_columns(labs, ordered),
        # Runs graded twice because the first ended in an infrastructure error.
        "summary": {"students": len(ordered), **counts, "retried": retried},
        "students": ordered,
    }


def grades_csv(document: dict[str, Any]) -> str:
    ids = [c["id"] for c in document["concepts"]]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["student", *ids, "total", "max_total", *[f"{i} status" for i in ids]])
    for doc in document["students"]:
        by_id = {c["id"]: c for c in doc["concepts"]}
        writer.writerow([
            doc["student"], *[by_id[i]["points"] if i in by_id else "" for i in ids],
            doc["total"], doc["max_total"],
            *[by_id[i]["status"] if i in by_id else "" for i in ids]])
    return buffer.getvalue()


def _shown_message(test_or_concept: dict[str, Any], hidden: bool) -> str:
    message = clean_text(test_or_concept.get("message") or "")
    if not hidden:
        return message.strip()
    # A hidden test shows only what its own code wrote (the assert's message, recorded by
    # the verification as "authored"), never what the learner's code can raise (any class,
    # any text), an assert's expression, a traceback or source code.
    authored = clean_text(test_or_concept.get("authored") or "", 500).strip()
    return authored.splitlines()[0] if authored else "a hidden check failed"


def feedback_markdown(doc: dict[str, Any]) -> str:
    lines = [f"# Feedback for {doc['student']}", "",
             f"**Total: {doc['total']} / {doc['max_total']} points**", "",
             "| Concept | Result | Points |", "| --- | --- | --- |"]
    for c in doc["concepts"]:
        lines.append(f"| {c['id']} {c['title']} | {c['status']} | "
                     f"{c['points']} / {c['max_points']} |")
    lines.append("")
    for c in doc["concepts"]:
        if c["status"] == "pass":
            continue
        lines += [f"## {c['id']} {c['slug']}: {c['status']}", ""]
        bad = [t for t in c["tests"] if t["status"] != "pass"]
        if not bad:
            first, _, rest = _shown_message(c, c.get("failed_hidden", False)).partition("\n")
            lines += [f"- {html.escape(first, quote=False)}", ""]
            continue
        for test in bad:
            label = ("a hidden test" if test["hidden"]
                     else f"`{test['name'].split('::', 1)[-1]}`")
            shown = _shown_message(test, test["hidden"]) or test["status"]
            lines += _md_item(f"{label} ({test['status']})", shown)
        lines.append("")
    return "\n".join(lines) + "\n"


def _md_item(label: str, text: str) -> list[str]:
    """A list item whose text (perhaps the learner's) cannot add markup: its first line
    with HTML escaped, the rest in a fenced block no backtick run in it can close."""
    first, _, rest = text.partition("\n")
    item = [f"- {label}: {html.escape(first, quote=False)}"]
    if rest.strip():
        longest = max((len(m) for m in re.findall(r"`+", rest)), default=0)
        fence = "`" * max(3, longest + 1)
        item += [f"  {fence}text", *(f"  {line}" for line in rest.splitlines()), f"  {fence}"]
    return item


def feedback_html(doc: dict[str, Any]) -> str:
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(c['id'])} {esc(c['title'])}</td><td>{esc(c['status'])}</td>"
                   f"<td>{c['points']} / {c['max_points']}</td></tr>" for c in doc["concepts"])
    details = []
    for c in doc["concepts"]:
        if c["status"] == "pass":
            continue
        items = []
        bad = [t for t in c["tests"] if t["status"] != "pass"]
        for test in bad:
            label = ("a hidden test" if test["hidden"]
                     else f"<code>{esc(test['name'].split('::', 1)[-1])}</code>")
            items.append(f"<li>{label} ({esc(test['status'])}): "
                         f"<pre>{esc(_shown_message(test, test['hidden']))}</pre></li>")
        if not bad:
            items.append(f"<li>{esc(_shown_message(c, c.get('failed_hidden', False)))}</li>")
        details.append(f"<h2>{esc(c['id'])} {esc(c['slug'])}: {esc(c['status'])}</h2>"
                       f"<ul>{''.join(items)}</ul>")
    return (f"<!doctype html><meta charset=utf-8><title>Feedback for {esc(doc['student'])}"
            f"</title><h1>Feedback for {esc(doc['student'])}</h1>"
            f"<p><b>Total: {doc['total']} / {doc['max_total']} points</b></p>"
            f"<table><tr><th>Concept</th><th>Result</th><th>Points</th></tr>{rows}</table>"
            + "".join(details) + "\n")


def write_gradebook(out: Path, labs: Sequence[Lab], students: Sequence[dict[str, Any]],
                    feedback_format: str = "md") -> dict[str, Any]:
    document = gradebook_document(labs, students)
    write_atomic(out / "grades.json", json.dumps(document, indent=2) + "\n")
    write_atomic(out / "grades.csv", grades_csv(document))
    write_atomic(out / "cohort.html", cohort_page(document))
    feedback = out / "feedback"
    feedback.mkdir(exist_ok=True)
    for doc in document["students"]:
        if feedback_format == "html":
            write_atomic(feedback / f"{doc['student']}.html", feedback_html(doc))
        else:
            write_atomic(feedback / f"{doc['student']}.md", feedback_markdown(doc))
    return document


def merge(dirs: Sequence[Path], out: Path, feedback_format: str = "md") -> dict[str, Any]:
    """Gather the per-student results of shard outputs into one gradebook in ``out``."""
    students: dict[str, dict[str, Any]] = {}
    for folder in dirs:
        found = results_dir(folder)
        if not found.is_dir():
            raise GradingError(f"{folder}: no results/ folder (not a 'labrunner grade' output)")
        for file in sorted(found.glob("*.json")):
            doc = read_result(file)
            if doc is None:
                continue
            current = students.get(doc["student"])
            if current is None or doc.get("graded_at", 0) > current.get("graded_at", 0):
                students[doc["student"]] = doc
    for doc in students.values():
        write_atomic(results_dir(out) / f"{doc['student']}.json", json.dumps(doc, indent=2))
    return write_gradebook(out, [], list(students.values()), feedback_format)


def comparable(document: dict[str, Any]) -> dict[str, Any]:
    """A gradebook without what differs between two equal gradings (times, durations, the
    sandbox uids the grading command happened to lease)."""
    students = []
    for doc in document["students"]:
        concepts = [{**{k: v for k, v in c.items() if k != "duration"},
                     "tests": [{k: v for k, v in t.items() if k != "duration"}
                               for t in c["tests"]]}
                    for c in doc["concepts"]]
        students.append({**{k: v for k, v in doc.items() if k not in ("graded_at",)},
                         "concepts": concepts})
    tool = {k: v for k, v in document.get("tool", {}).items() if k != "sandbox_uids"}
    return {**document, "tool": tool, "students": students}
