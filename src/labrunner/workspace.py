"""A learner's workspace: their copies of the starters and their progress store.

Layout::

    WORKSPACE/
      labrunner.toml            marks the folder (and records the labrunner version)
      .labrunner/progress.db    every attempt
      ph2/05-isolation-levels/  the learner's files for that lab, plus its README.md
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .catalog import Catalog, Lab
from .errors import LabrunnerError
from .store import ProgressStore

MARKER = "labrunner.toml"
ENV_WORKSPACE = "LABRUNNER_WORKSPACE"


class WorkspaceError(LabrunnerError):
    pass


@dataclass
class Workspace:
    root: Path

    @property
    def store_path(self) -> Path:
        return self.root / ".labrunner" / "progress.db"

    def store(self) -> ProgressStore:
        return ProgressStore(self.store_path)

    def lab_dir(self, lab: Lab) -> Path:
        return self.root / lab.workspace_dir


def find_workspace(explicit: Path | None = None) -> Workspace:
    if explicit is not None:
        if not (explicit / MARKER).is_file():
            raise WorkspaceError(
                f"{explicit}: not a labrunner workspace (no {MARKER}). "
                f"Create one with: labrunner init {explicit}")
        return Workspace(explicit.resolve())
    env = os.environ.get(ENV_WORKSPACE)
    if env:
        return find_workspace(Path(env))
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / MARKER).is_file():
            return Workspace(folder)
    raise WorkspaceError(
        "no labrunner workspace here or above. Create one with: labrunner init [DIR] "
        "(or pass --workspace DIR, or --solutions / --starters to check the references)")


def write_marker(root: Path) -> None:
    """What makes ``root`` a workspace: its ``labrunner.toml``, naming this version."""
    (root / MARKER).write_text(
        f'# A labrunner workspace: your code for each lab, and your progress.\n'
        f'labrunner_version = "{__version__}"\n', encoding="utf-8")


def init_workspace(root: Path, catalog: Catalog) -> tuple[Workspace, list[str], list[str]]:
    """Create or complete a workspace: copy each lab's starter files and README. Files the
    learner already has are never overwritten. Returns (workspace, created, kept)."""
    for folder in root.resolve().parents:
        if (folder / MARKER).is_file():
            raise WorkspaceError(
                f"{root} is inside the workspace {folder}: a workspace in a workspace would "
                f"keep progress apart. To refresh yours, run: labrunner init {folder}")
    root.mkdir(parents=True, exist_ok=True)
    if not (root / MARKER).exists():
        write_marker(root)
    created: list[str] = []
    kept: list[str] = []
    for lab in catalog.labs:
        target = root / lab.workspace_dir
        target.mkdir(parents=True, exist_ok=True)
        readme = lab.path / "README.md"
        if readme.is_file():
            shutil.copyfile(readme, target / "README.md")  # ours: refreshed every time
        for provided in provided_files(lab):
            # A C lab's driver and headers, which its README points to: ours, refreshed.
            shutil.copyfile(provided, target / provided.name)
        for item in sorted(lab.starter_dir.rglob("*")):
            if item.is_dir() or "__pycache__" in item.parts:
                continue
            rel = item.relative_to(lab.starter_dir)
            dest = target / rel
            shown = f"{lab.workspace_dir}/{rel}"
            if dest.exists():
                kept.append(shown)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, dest)
            created.append(shown)
    workspace = Workspace(root.resolve())
    workspace.store().close()
    return workspace, created, kept


# A C lab's own files beside the learner's: its driver and headers (the verification's
# Makefile target builds them with the learner's file), so the learner can compile by hand.
PROVIDED_SUFFIXES = (".c", ".h")


def provided_files(lab: Lab) -> list[Path]:
    if lab.language != "c":
        return []
    learner = set(lab.learner_files)
    return sorted(p for p in lab.path.iterdir()
                  if p.is_file() and p.suffix in PROVIDED_SUFFIXES and p.name not in learner)


def reset_lab(workspace: Workspace, lab: Lab) -> tuple[list[str], Path | None]:
    """Put the starter back for ``lab``; the learner's files go to a backup folder first.
    Returns the restored names and the backup folder (None when nothing was kept)."""
    target = workspace.lab_dir(lab)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup = workspace.root / ".labrunner" / "backups" / f"{lab.id}-{stamp}"
    kept = False
    restored = []
    for item in sorted(lab.starter_dir.rglob("*")):
        if item.is_dir() or "__pycache__" in item.parts:
            continue
        rel = item.relative_to(lab.starter_dir)
        dest = target / rel
        if dest.is_file():
            (backup / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(dest, backup / rel)
            kept = True
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(item, dest)
        restored.append(str(rel))
    return restored, backup if kept else None


def next_concept(catalog: Catalog, done: set[str]) -> tuple[Lab | None, str]:
    """The first concept not done yet of the earliest phase whose prerequisites are done
    (the roadmap's order), with why; (None, why) when nothing is left to do."""
    finished = {p.id for p in catalog.phases
                if all(c.lab is None or c.id in done for c in p.concepts)}
    for phase in catalog.phases:
        if phase.id in finished:
            continue
        waiting = [r for r in phase.requires if r not in finished]
        if waiting:
            continue
        for concept in phase.concepts:
            if concept.lab is not None and concept.id not in done:
                return concept.lab, f"the first concept of {phase.id} not done yet"
    locked = [p.id for p in catalog.phases if p.id not in finished]
    if locked:
        return None, (f"every unlocked phase is done; {', '.join(locked)} wait for labs or "
                      "prerequisites")
    return None, "every concept with a lab is done"


def hints_unlocked(lab: Lab) -> int:
    """How many of a lab's hints the learner may see: one, and one more per failed attempt
    recorded in the workspace (one outside a workspace)."""
    try:
        store = find_workspace().store()
    except WorkspaceError:
        return 1
    failures = sum(1 for a in store.attempts(lab.id) if a.outcome != "passed")
    return min(len(lab.hints), failures + 1)
