"""The roadmap page: progress as the roadmap shows it, as one self-contained HTML document.

Two pages share one look: a learner's (every concept's state earned from the progress store,
so nothing on it can be ticked by hand) and a cohort's (students x concepts from a gradebook,
with each concept's pass rate). Everything is inline - no CDN, no fonts, no network - so the
file opens anywhere, and every state is written as text and a symbol as well as a colour.
"""

from __future__ import annotations

import datetime as dt
import html
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .catalog import Catalog, Lab
from .store import Attempt, ConceptStatus

PAGE_VERSION = 1

# A concept's state on the page, with its symbol and the words a screen reader says.
STATES: dict[str, tuple[str, str]] = {
    "done": ("✓", "done"),
    "failed": ("✗", "failed"),
    "regressed": ("↺", "regressed: passed before, fails now"),
    "not tried": ("○", "not tried"),
    "no lab yet": ("–", "no lab yet"),
}

# The store's words for a concept's history, in the page's words.
_FROM_STORE = {"done": "done", "regressed": "regressed", "failing": "failed",
               "not verified": "not tried", "not started": "not tried"}


@dataclass(frozen=True)
class ConceptView:
    id: str
    slug: str
    title: str
    category: str
    state: str
    attempts: int
    last_try: str          # ISO-8601 UTC, "" when never tried
    time_spent: float      # seconds, the sum of every attempt's run time
    readme: str | None     # a link to the lab's README, None without a lab


@dataclass(frozen=True)
class PhaseView:
    id: str
    name: str
    level: str
    requires: tuple[str, ...]
    tools: tuple[str, ...]
    concepts: tuple[ConceptView, ...]
    example: ConceptView | None  # the phase's C example, when it has one

    @property
    def available(self) -> int:
        return sum(1 for c in self.concepts if c.state != "no lab yet")

    @property
    def done(self) -> int:
        return sum(1 for c in self.concepts if c.state == "done")


@dataclass(frozen=True)
class ProgressView:
    phases: tuple[PhaseView, ...]

    @property
    def total(self) -> int:
        return sum(len(p.concepts) for p in self.phases)

    @property
    def available(self) -> int:
        return sum(p.available for p in self.phases)

    @property
    def done(self) -> int:
        return sum(p.done for p in self.phases)

    def to_json(self) -> dict[str, Any]:
        return {"version": PAGE_VERSION, "done": self.done, "available": self.available,
                "total": self.total,
                "phases": [{**asdict(p), "done": p.done, "available": p.available}
                           for p in self.phases]}


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _concept_view(lab: Lab | None, concept_id: str, slug: str, title: str, category: str,
                  status: ConceptStatus | None, history: Sequence[Attempt],
                  readme: Callable[[Lab], str | None]) -> ConceptView:
    if lab is None:
        state = "no lab yet"
    elif status is None:
        state = "not tried"
    else:
        state = _FROM_STORE.get(status.state, "failed")
    return ConceptView(
        id=concept_id, slug=slug, title=title, category=category, state=state,
        attempts=len(history), last_try=_iso(history[-1].started_at) if history else "",
        time_spent=round(sum(a.duration for a in history), 1),
        readme=readme(lab) if lab is not None else None)


def progress_view(catalog: Catalog, status: dict[str, ConceptStatus],
                  attempts: Sequence[Attempt],
                  readme: Callable[[Lab], str | None]) -> ProgressView:
    """Every phase and concept with the state its verifications earned."""
    history: dict[str, list[Attempt]] = {}
    for attempt in attempts:
        history.setdefault(attempt.concept_id, []).append(attempt)
    phases = []
    for phase in catalog.phases:
        concepts = tuple(
            _concept_view(c.lab, c.id, c.slug, c.title, c.category, status.get(c.id),
                          history.get(c.id, []), readme)
            for c in phase.concepts)
        example = None
        if phase.examples:
            lab = phase.examples[0]
            example = _concept_view(lab, lab.id, lab.slug, lab.title, lab.category,
                                    status.get(lab.id), history.get(lab.id, []), readme)
        phases.append(PhaseView(phase.id, phase.name, phase.level, phase.requires,
                                phase.tools, concepts, example))
    return ProgressView(tuple(phases))


# --------------------------------------------------------------------------------------
# HTML

_STYLE = """
:root{--ok:#1a7f37;--bad:#cf222e;--warn:#9a6700;--dim:#57606a;--bg:#fff;--fg:#1f2328;
--line:#d0d7de;--bar:#eaeef2}
@media (prefers-color-scheme:dark){:root{--ok:#3fb950;--bad:#f85149;--warn:#d29922;
--dim:#8d96a0;--bg:#0d1117;--fg:#e6edf3;--line:#30363d;--bar:#21262d}}
*{box-sizing:border-box}body{margin:0 auto;max-width:60rem;padding:1rem;background:var(--bg);
color:var(--fg);font:16px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif}
h1{font-size:1.6rem;margin:.2rem 0}h2{font-size:1.2rem;margin:0}
.meter{display:block;width:100%;height:.8rem;background:var(--bar);border-radius:.4rem;
overflow:hidden}.meter>span{display:block;height:100%;background:var(--ok)}
section.phase{border:1px solid var(--line);border-radius:.5rem;margin:1rem 0;padding:.8rem}
.phase header{display:flex;flex-wrap:wrap;gap:.3rem 1rem;align-items:baseline}
.meta{color:var(--dim);font-size:.9rem}.tools{color:var(--dim);font-size:.85rem}
ul.concepts{list-style:none;padding:0;margin:.6rem 0 0}
ul.concepts li{display:grid;grid-template-columns:1.6rem 1fr auto;gap:.2rem .5rem;
padding:.35rem 0;border-top:1px solid var(--line)}
.sym{font-weight:bold;text-align:center}.state{font-size:.85rem;color:var(--dim)}
.s-done .sym{color:var(--ok)}.s-failed .sym,.s-regressed .sym{color:var(--bad)}
.s-no-lab-yet{color:var(--dim)}.figures{font-size:.8rem;color:var(--dim);text-align:right}
table.heat{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
.heat th,.heat td{border:1px solid var(--line);padding:.25rem .4rem;text-align:center}
.heat th[scope=row]{text-align:left}.heat .pass{background:#dafbe1;color:#116329}
.heat .fail,.heat .error,.heat .timeout{background:#ffebe9;color:#a40e26}
.scroll{overflow-x:auto}.hardest{font-weight:bold}
@media (max-width:40rem){ul.concepts li{grid-template-columns:1.4rem 1fr}
.figures{grid-column:2;text-align:left}}
"""

# The served page reloads itself when a run records an attempt: server-sent events, with a
# slow poll of state.json as the fallback where EventSource is missing or the stream drops.
_LIVE_SCRIPT = """
<script>
(function(){var seen=document.body.dataset.revision;
function check(){fetch('state.json',{cache:'no-store'}).then(function(r){return r.json()})
.then(function(s){if(String(s.revision)!==seen){location.reload()}}).catch(function(){})}
if(window.EventSource){var es=new EventSource('events');
es.addEventListener('progress',function(e){if(e.data!==seen){location.reload()}});
es.onerror=function(){setTimeout(check,2000)}}else{setInterval(check,3000)}})();
</script>
"""


def _meter(done: int, total: int, label: str) -> str:
    percent = done * 100 // total if total else 0
    return (f'<span class="meter" role="progressbar" aria-label="{html.escape(label)}" '
            f'aria-valuemin="0" aria-valuemax="{total}" aria-valuenow="{done}">'
            f'<span style="width:{percent}%"></span></span>')


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def _concept_item(c: ConceptView, label_prefix: str = "") -> str:
    symbol, words = STATES[c.state]
    esc = html.escape
    title = esc(c.title)
    if c.readme:
        title = f'<a href="{esc(c.readme)}">{title}</a>'
    figures = ""
    if c.attempts:
        figures = (f'{c.attempts} attempt{"s" if c.attempts != 1 else ""} · '
                   f'{esc(_duration(c.time_spent))} · last '
                   f'<time datetime="{esc(c.last_try)}">{esc(c.last_try.replace("T", " "))}'
                   f'</time>')
    css = "s-" + c.state.replace(" ", "-")
    return (f'<li class="{css}" data-concept="{esc(c.id)}" data-state="{esc(c.state)}">'
            f'<span class="sym" aria-hidden="true">{symbol}</span>'
            f'<span>{esc(label_prefix)}<b>{esc(c.id)}</b> {title} '
            f'<span class="state">({esc(words)})</span></span>'
            f'<span class="figures">{figures}</span></li>')


def learner_page(view: ProgressView, revision: str = "", live: bool = False) -> str:
    """The learner's roadmap page; ``live`` adds the script that reloads it on new results."""
    esc = html.escape
    percent = view.done * 100 // view.available if view.available else 0
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta name=viewport content="width=device-width,initial-scale=1">',
        "<title>Backend Engineering Roadmap · progress</title>",
        f"<style>{_STYLE}</style></head>",
        f'<body data-revision="{esc(revision)}"><header>',
        "<h1>Backend Engineering Roadmap</h1>",
        f'<p id="overall"><b>Overall progress</b> {percent}% · '
        f'<span id="done-count">{view.done} of {view.available} available concepts done'
        f'</span> <span class="meta">({view.total} in the roadmap)</span></p>',
        _meter(view.done, view.available, "overall progress"),
        "</header><main>",
    ]
    for phase in view.phases:
        requires = ", ".join(r.capitalize() for r in phase.requires) or "no prerequisites"
        parts += [
            f'<section class="phase" id="{esc(phase.id)}" aria-labelledby="h-{esc(phase.id)}">',
            f'<header><h2 id="h-{esc(phase.id)}">{esc(phase.id.capitalize())} · '
            f'{esc(phase.name)}</h2>',
            f'<span class="meta">{esc(phase.level)} · requires {esc(requires)}</span>',
            f'<span class="meta phase-count">{phase.done}/{phase.available} done'
            + (f" · {len(phase.concepts) - phase.available} without a lab yet"
               if phase.available < len(phase.concepts) else "") + "</span></header>",
            _meter(phase.done, phase.available or len(phase.concepts), f"{phase.id} progress"),
            f'<p class="tools">{esc(" · ".join(phase.tools))}</p>' if phase.tools else "",
            '<ul class="concepts">',
            *(_concept_item(c) for c in phase.concepts),
            "</ul>",
        ]
        if phase.example is not None:
            parts += ['<ul class="concepts example">',
                      _concept_item(phase.example, "C example · "), "</ul>"]
        parts.append("</section>")
    parts.append("</main>")
    if live:
        parts.append(_LIVE_SCRIPT)
    parts.append("</body></html>\n")
    return "".join(parts)


def cohort_page(gradebook: dict[str, Any]) -> str:
    """Students x concepts from a ``grades.json`` document, with each concept's pass rate;
    the concepts the fewest passed are marked as the hardest."""
    esc = html.escape
    columns = gradebook.get("concepts", [])
    students = gradebook.get("students", [])
    rates: dict[str, float] = {}
    for column in columns:
        graded = [c for s in students for c in s.get("concepts", []) if c["id"] == column["id"]]
        passed = sum(1 for c in graded if c["status"] == "pass")
        rates[column["id"]] = passed / len(graded) if graded else 0.0
    lowest = min(rates.values(), default=1.0)
    head = "".join(
        f'<th scope=col class="{"hardest" if rates[c["id"]] == lowest and lowest < 1 else ""}"'
        f' title="{esc(c["title"])}">{esc(c["id"])}</th>' for c in columns)
    rate_row = "".join(
        f'<td data-concept="{esc(c["id"])}" data-rate="{rates[c["id"]]:.3f}">'
        f'{round(rates[c["id"]] * 100)}%</td>' for c in columns)
    symbols = {"pass": "✓", "fail": "✗", "error": "!", "timeout": "⏱"}
    body = []
    for student in students:
        by_id = {c["id"]: c for c in student.get("concepts", [])}
        cells = []
        for column in columns:
            concept = by_id.get(column["id"])
            status = concept["status"] if concept else "not graded"
            cells.append(f'<td class="{esc(status)}" data-status="{esc(status)}">'
                         f'{symbols.get(status, "–")} <span class="state">{esc(status)}'
                         f'</span></td>')
        body.append(f'<tr><th scope=row>{esc(str(student["student"]))}</th>{"".join(cells)}'
                    f'<td>{student.get("total", 0)} / {student.get("max_total", 0)}</td></tr>')
    hardest = [c["id"] for c in columns if rates[c["id"]] == lowest and lowest < 1]
    return "".join([
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta name=viewport content="width=device-width,initial-scale=1">',
        "<title>Cohort · Backend Engineering Roadmap</title>",
        f"<style>{_STYLE}</style></head><body><header><h1>Cohort grades</h1>",
        f'<p id="summary">{len(students)} students · {len(columns)} concepts'
        + (f' · hardest: <b id="hardest">{esc(", ".join(hardest))}</b>' if hardest else "")
        + "</p></header><main><div class=scroll><table class=heat>",
        "<caption>Each cell: ✓ pass, ✗ fail, ! error, ⏱ timeout</caption>",
        f"<thead><tr><th scope=col>student</th>{head}<th scope=col>total</th></tr></thead>",
        f"<tbody>{''.join(body)}</tbody>",
        f'<tfoot><tr id="pass-rates"><th scope=row>pass rate</th>{rate_row}<td></td></tr>'
        "</tfoot></table></div></main></body></html>\n",
    ])


def state_json(view: ProgressView, revision: str) -> str:
    return json.dumps({**view.to_json(), "revision": revision})
