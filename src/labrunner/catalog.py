"""The catalog: the roadmap's phases and concepts as data, and the labs that exist for them.

The roadmap (phases, concepts, titles, categories, slugs) ships inside the package as data
files; the labs are discovered on disk from their ``lab.toml`` files. A concept whose lab
does not exist yet is still in the catalog, with ``lab = None``, so it can be listed as
"no lab yet" and never as done.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import os
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LabrunnerError
from .services import SERVICE_NAMES

KNOWN_SERVICES = SERVICE_NAMES
LANGUAGES = ("python", "c")
ID_PATTERN = re.compile(r"^ph(\d+)\.(\d+|c)$")


class CatalogError(LabrunnerError):
    """A lab file or selector is wrong; the message names the file or argument and the fix."""


@dataclass(frozen=True)
class Lab:
    """One lab on disk: a concept's exercise, or a phase's C example (id ``phN.c``)."""

    id: str
    slug: str
    title: str
    category: str
    path: Path
    services: tuple[str, ...]
    language: str
    points: int
    learner_files: tuple[str, ...]
    hints: tuple[str, ...]
    timeout: float
    build: str | None = None
    # A lab still being written: listed as such, never run, counted or checked.
    draft: bool = False
    # A lab that restarts a shared service: it runs alone, never beside another lab.
    exclusive: bool = False
    # Grading runs the learner's Python code in a process of its own (the learner package).
    # A lab whose verification shares live objects that cannot cross a process boundary
    # (sockets, event loops, in-place mutation of what it hands over) says false.
    learner_process: bool = True
    # Libraries its learners' modules import that are slow to import (ph1.7's openapi_core):
    # the learner factory imports them once, before the first test, so that the host each
    # test forks from it has them already (see learner/factory.py).
    learner_preload: tuple[str, ...] = ()

    @property
    def learner_code_in_own_process(self) -> bool:
        """Grading imports this lab's learner code in a process of its own (a Python lab
        that does not say ``learner_process = false``)."""
        return self.language == "python" and self.learner_process

    @property
    def learner_code_apart(self) -> bool:
        """Grading keeps the learner's code out of the verification's process: in a process
        of its own, or, for a C lab, as the binary it always is."""
        return self.language != "python" or self.learner_process

    @property
    def phase_id(self) -> str:
        return self.id.split(".")[0]

    @property
    def is_example(self) -> bool:
        return self.id.endswith(".c")

    @property
    def starter_dir(self) -> Path:
        return self.path / "starter"

    @property
    def solution_dir(self) -> Path:
        return self.path / "solution"

    @property
    def test_files(self) -> list[Path]:
        return sorted(self.path.glob("test_*.py"))

    @property
    def workspace_dir(self) -> str:
        """Where the learner's copy lives inside a workspace: ``ph2/05-isolation-levels``."""
        return f"{self.path.parent.name}/{self.path.name}"


@dataclass(frozen=True)
class Concept:
    id: str
    slug: str
    title: str
    category: str
    lab: Lab | None = None

    @property
    def phase_id(self) -> str:
        return self.id.split(".")[0]

    @property
    def number(self) -> int:
        return int(self.id.split(".")[1])


@dataclass(frozen=True)
class Phase:
    id: str
    name: str
    requires: tuple[str, ...]
    concepts: tuple[Concept, ...]
    examples: tuple[Lab, ...] = ()
    level: str = ""                 # the roadmap's depth label: Prerequisite ... Production
    tools: tuple[str, ...] = ()     # the tools and protocols the roadmap lists for the phase

    @property
    def number(self) -> int:
        return int(self.id[2:])


@dataclass
class Catalog:
    phases: list[Phase]
    drafts: list[Lab] = field(default_factory=list)
    labs_root: Path | None = None
    _by_id: dict[str, Concept] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {c.id: c for p in self.phases for c in p.concepts}

    @property
    def concepts(self) -> list[Concept]:
        return [c for p in self.phases for c in p.concepts]

    @property
    def labs(self) -> list[Lab]:
        """Every runnable item: concept labs, then each phase's C example."""
        out: list[Lab] = []
        for phase in self.phases:
            out.extend(c.lab for c in phase.concepts if c.lab is not None)
            out.extend(phase.examples)
        return out

    def concept(self, concept_id: str) -> Concept:
        return self._by_id[concept_id]

    def phase(self, phase_id: str) -> Phase:
        for phase in self.phases:
            if phase.id == phase_id:
                return phase
        raise KeyError(phase_id)

    def lab(self, lab_id: str) -> Lab:
        for lab in self.labs:
            if lab.id == lab_id:
                return lab
        raise KeyError(lab_id)

    def lab_at(self, folder: Path, workspace_root: Path | None = None) -> Lab | None:
        """The lab whose folder ``folder`` is or is inside: a workspace's copy of it, or the
        lab itself in this checkout."""
        folder = folder.resolve()
        for lab in self.labs:
            homes = [lab.path]
            if workspace_root is not None:
                homes.append((workspace_root / lab.workspace_dir).resolve())
            if any(folder == home or folder.is_relative_to(home) for home in homes):
                return lab
        return None

    def select(self, selectors: Sequence[str]) -> list[Concept | Lab]:
        """Resolve selectors (``all``, ``ph2``, ``ph2.5``, ``isolation-levels``, ``ph2.c``)
        to concepts and C examples, in roadmap order, without repeats."""
        if not selectors:
            raise CatalogError("no selector given: name a phase (ph2), a concept (ph2.5), "
                               "a slug (isolation-levels) or 'all'")
        chosen: dict[str, Concept | Lab] = {}
        for raw in selectors:
            for item in self._resolve(raw.strip()):
                chosen.setdefault(item.id, item)
        order = {item.id: n for n, item in enumerate(self._all_items())}
        return sorted(chosen.values(), key=lambda item: order[item.id])

    def _all_items(self) -> list[Concept | Lab]:
        items: list[Concept | Lab] = []
        for phase in self.phases:
            items.extend(phase.concepts)
            items.extend(phase.examples)
        return items

    def _resolve(self, selector: str) -> list[Concept | Lab]:
        key = selector.lower()
        if key == "all":
            return self._all_items()
        for phase in self.phases:
            if key == phase.id:
                return [*phase.concepts, *phase.examples]
        if re.fullmatch(r"ph\d+", key):
            raise CatalogError(f"unknown phase {selector!r}: the phases are "
                               f"{self.phases[0].id} to {self.phases[-1].id}")
        # A lab's folder name (05-isolation-levels) names its concept too.
        folder = re.fullmatch(r"\d+-([a-z0-9-]+)", key)
        for item in self._all_items():
            if key in (item.id, item.slug) or (folder and folder.group(1) == item.slug):
                return [item]
        candidates = ["all"] + [p.id for p in self.phases]
        candidates += [i.id for i in self._all_items()] + [i.slug for i in self._all_items()]
        close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise CatalogError(
            f"unknown selector {selector!r}.{hint} "
            "Use 'labrunner list' to see phases, concept ids and slugs."
        )


def _read_concepts_tsv(text: str) -> list[dict[str, str]]:
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    for row in rows:
        if set(row) != {"id", "title", "category"}:
            raise CatalogError("concepts.tsv: expected columns id, title, category")
    return rows


def _data_text(name: str) -> str:
    # The package's own folder, not importlib.resources: that imports zipfile (10 ms of every
    # command) for packages that are never zipped here.
    return (Path(__file__).parent / "data" / name).read_text(encoding="utf-8")


class _ParsedToml:
    """Parsed ``lab.toml`` files by the sha256 of their text, kept as JSON in the user's cache
    folder: every command reads all 80-odd of them, and tomllib takes 25-30 ms for that, a
    tenth of what ``labrunner run`` adds to pytest. Keyed by content, an edited file is
    parsed again; only what parsed is kept (a broken file is parsed, and reported, every
    time), and validation runs on every load as before. A cache file that is not ours, or
    does not read, is ignored."""

    def __init__(self) -> None:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        self.file = Path(base) / "labrunner" / "lab-toml.json"
        self.known: dict[str, Any] = {}
        self.used: dict[str, Any] = {}
        try:
            if self.file.stat().st_uid == os.geteuid():
                self.known = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.known = {}

    def loads(self, text: str) -> dict[str, Any]:
        key = hashlib.sha256(text.encode()).hexdigest()
        data = self.known.get(key)
        if not isinstance(data, dict):
            data = tomllib.loads(text)
        self.used[key] = data
        return data

    def save(self) -> None:
        """Keep what this load used (a file per user, rewritten only when it changed)."""
        if self.used.keys() == self.known.keys():
            return
        try:
            text = json.dumps(self.used)
            self.file.parent.mkdir(parents=True, exist_ok=True)
            staging = self.file.with_name(f"{self.file.name}.{os.getpid()}")
            staging.write_text(text, encoding="utf-8")
            os.replace(staging, self.file)
        except (OSError, TypeError, ValueError):
            pass  # a read-only home, or a value JSON cannot hold: parse again next time


def _require(data: dict[str, object], key: str, kind: type, file: Path) -> object:
    if key not in data:
        raise CatalogError(f"{file}: missing field '{key}'")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CatalogError(
            f"{file}: field '{key}' must be {kind.__name__}, found {type(value).__name__}"
        )
    return value


def _string_list(data: dict[str, object], key: str, file: Path) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CatalogError(f"{file}: field '{key}' must be a list of strings")
    return tuple(value)


def _module_names(data: dict[str, object], file: Path) -> tuple[str, ...]:
    names = _string_list(data, "learner_preload", file)
    for name in names:
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name, re.ASCII):
            raise CatalogError(f"{file}: learner_preload: {name!r} is not a module name")
    return names


def _run_fields(data: dict[str, Any], file: Path
                ) -> tuple[tuple[str, ...], str, int, int | float, tuple[str, ...]]:
    """What running the lab needs: services, language, points, timeout, learner files."""
    services = _string_list(data, "services", file)
    for name in services:
        if name not in KNOWN_SERVICES:
            raise CatalogError(
                f"{file}: field 'services' names unknown service {name!r}; "
                f"known: {', '.join(KNOWN_SERVICES)}"
            )
    language = str(data.get("language", "python"))
    if language not in LANGUAGES:
        raise CatalogError(f"{file}: field 'language' must be one of {', '.join(LANGUAGES)}")
    points = data.get("points", 10)
    if not isinstance(points, int) or isinstance(points, bool) or points < 0:
        raise CatalogError(f"{file}: field 'points' must be a whole number >= 0")
    timeout = data.get("timeout", 120)
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise CatalogError(f"{file}: field 'timeout' must be a positive number of seconds")
    learner_files = _string_list(data, "learner_files", file)
    if not learner_files:
        raise CatalogError(f"{file}: field 'learner_files' must list the files the learner edits")
    for name in learner_files:
        if name.startswith(("/", "..")) or "/../" in name or name.startswith("test_"):
            raise CatalogError(f"{file}: learner file {name!r} must be a plain relative path")
    return services, language, points, timeout, learner_files


def _flags(data: dict[str, Any], file: Path) -> tuple[bool, bool, bool, str | None]:
    """The lab's switches (draft, exclusive, learner_process) and its C build target."""
    draft = data.get("draft", False)
    exclusive = data.get("exclusive", False)
    learner_process = data.get("learner_process", True)
    for name, value in (("draft", draft), ("exclusive", exclusive),
                        ("learner_process", learner_process)):
        if not isinstance(value, bool):
            raise CatalogError(f"{file}: field '{name}' must be true or false")
    build = data.get("build")
    if build is not None and not isinstance(build, str):
        raise CatalogError(f"{file}: field 'build' must be a make target name")
    return draft, exclusive, learner_process, build


def load_lab(lab_dir: Path, concepts: dict[str, dict[str, str]] | None = None,
             parsed: _ParsedToml | None = None) -> Lab:
    """Read and validate one ``lab.toml``; every error names the file and the field."""
    file = lab_dir / "lab.toml"
    try:
        text = file.read_text(encoding="utf-8")
        data = parsed.loads(text) if parsed is not None else tomllib.loads(text)
    except FileNotFoundError as exc:
        raise CatalogError(f"{lab_dir}: no lab.toml (every lab folder needs one)") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{file}: not valid TOML: {exc}") from exc
    lab_id = str(_require(data, "id", str, file))
    if not ID_PATTERN.match(lab_id):
        raise CatalogError(f"{file}: field 'id' must look like 'ph2.5' or 'ph2.c', got {lab_id!r}")
    if concepts is None:
        concepts = {row["id"]: row for row in _read_concepts_tsv(_data_text("concepts.tsv"))}
    known = concepts.get(lab_id, {})
    slug = str(_require(data, "slug", str, file))
    if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", slug):
        raise CatalogError(f"{file}: field 'slug' must be lowercase words joined by '-'")
    services, language, points, timeout, learner_files = _run_fields(data, file)
    draft, exclusive, learner_process, build = _flags(data, file)
    title = data.get("title", known.get("title"))
    category = data.get("category", known.get("category"))
    if not isinstance(title, str) or not isinstance(category, str):
        raise CatalogError(f"{file}: fields 'title' and 'category' are required for {lab_id}")
    return Lab(
        id=lab_id,
        slug=slug,
        title=title,
        category=category,
        path=lab_dir.resolve(),
        services=services,
        language=language,
        points=points,
        learner_files=learner_files,
        hints=_string_list(data, "hints", file),
        timeout=float(timeout),
        build=build,
        draft=draft,
        exclusive=exclusive,
        learner_process=learner_process,
        learner_preload=_module_names(data, file),
    )


def _discover(dirs: Iterable[Path], concepts: dict[str, dict[str, str]]) -> dict[str, Lab]:
    labs: dict[str, Lab] = {}
    parsed = _ParsedToml()
    for root in dirs:
        if not root.is_dir():
            continue
        for toml in sorted(root.glob("*/lab.toml")) + sorted(root.glob("*/*/lab.toml")):
            lab = load_lab(toml.parent, concepts, parsed)
            if lab.id in labs:
                raise CatalogError(
                    f"{toml}: id {lab.id} is already used by {labs[lab.id].path / 'lab.toml'}"
                )
            labs[lab.id] = lab
    parsed.save()
    return labs


def find_project_root(start: Path | None = None) -> Path | None:
    """The labrunner checkout holding ``labs/``: from $LABRUNNER_HOME, or up from ``start``,
    or up from this file (an editable install)."""
    import os

    env = os.environ.get("LABRUNNER_HOME")
    if env:
        return Path(env).resolve()
    for base in (start or Path.cwd(), Path(__file__).resolve()):
        for candidate in (base, *base.parents):
            if (candidate / "labs").is_dir() and (candidate / "pyproject.toml").is_file():
                return candidate
    return None


def load_catalog(root: Path | None = None) -> Catalog:
    """The whole roadmap, with the labs found under ``root/labs`` and ``root/c_examples``."""
    root = root or find_project_root()
    rows = _read_concepts_tsv(_data_text("concepts.tsv"))
    meta = tomllib.loads(_data_text("catalog.toml"))
    slugs: dict[str, str] = meta["slugs"]
    by_id = {row["id"]: row for row in rows}
    labs = _discover([root / "labs", root / "c_examples"], by_id) if root else {}
    for lab_id, lab in labs.items():
        if lab.is_example:
            continue
        if lab_id not in by_id:
            raise CatalogError(f"{lab.path / 'lab.toml'}: id {lab_id} is not a roadmap concept")
        if lab.slug != slugs[lab_id]:
            raise CatalogError(f"{lab.path / 'lab.toml'}: field 'slug' is {lab.slug!r} but "
                               f"concept {lab_id} is {slugs[lab_id]!r}")
    drafts = [lab for lab in labs.values() if lab.draft]
    labs = {lab_id: lab for lab_id, lab in labs.items() if not lab.draft}
    phases: list[Phase] = []
    for entry in meta["phase"]:
        pid = entry["id"]
        concepts = tuple(
            Concept(
                id=row["id"],
                slug=slugs[row["id"]],
                title=row["title"],
                category=row["category"],
                lab=labs.get(row["id"]),
            )
            for row in rows
            if row["id"].split(".")[0] == pid
        )
        examples = tuple(lab for lab in labs.values() if lab.is_example and lab.phase_id == pid)
        phases.append(Phase(pid, entry["name"], tuple(entry["requires"]), concepts, examples,
                            level=entry.get("level", ""), tools=tuple(entry.get("tools", ()))))
    return Catalog(phases=phases, drafts=drafts, labs_root=root / "labs" if root else None)


def as_lab(item: Concept | Lab) -> Lab | None:
    return item if isinstance(item, Lab) else item.lab


def catalog_json(catalog: Catalog, chosen: set[str] | None = None) -> dict[str, Any]:
    """``labrunner list --json``: the phases, their concepts (those in ``chosen``, default
    all) with what their labs need, and the phases' C examples (version 1)."""
    return {"version": 1, "phases": [
            {"id": p.id, "name": p.name, "requires": list(p.requires),
             "concepts": [
                 {"id": c.id, "slug": c.slug, "title": c.title, "category": c.category,
                  "lab": c.lab is not None,
                  "services": list(c.lab.services) if c.lab else [],
                  "language": c.lab.language if c.lab else None,
                  "points": c.lab.points if c.lab else None}
                 for c in p.concepts if chosen is None or c.id in chosen],
             "c_examples": [{"id": e.id, "slug": e.slug, "title": e.title}
                            for e in p.examples if chosen is None or e.id in chosen]}
            for p in catalog.phases]}

