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
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .catalog import Catalog, Lab
from .store import ProgressStore

MARKER = "labrunner.toml"
ENV_WORKSPACE = "LABRUNNER_WORKSPACE"


class WorkspaceError(Exception):
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


def init_workspace(root: Path, catalog: Catalog) -> tuple[Workspace, list[str], list[str]]:
    """Create or complete a workspace: copy each lab's starter files and README. Files the
    learner already has are never overwritten. Returns (workspace, created, kept)."""
    root.mkdir(parents=True, exist_ok=True)
    marker = root / MARKER
    if not marker.exists():
        marker.write_text(
            f'# A labrunner workspace: your code for each lab, and your progress.\n'
            f'labrunner_version = "{__version__}"\n', encoding="utf-8")
    created: list[str] = []
    kept: list[str] = []
    for lab in catalog.labs:
        target = root / lab.workspace_dir
        target.mkdir(parents=True, exist_ok=True)
        readme = lab.path / "README.md"
        if readme.is_file():
            shutil.copyfile(readme, target / "README.md")  # ours: refreshed every time
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
