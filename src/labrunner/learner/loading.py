"""Loading a learner module or a lab's harness, in whichever process runs it."""

from __future__ import annotations

import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType


class LearnerCodeError(Exception):
    """The learner's code could not be loaded or built; the message says where and why."""



def learner_frame(exc: BaseException, folder: Path) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if frame.filename.startswith(str(folder)):
            return f"{frame.filename}:{frame.lineno}"
    return str(folder)


def import_learner_module(folder: Path, module: str, name: str) -> ModuleType:
    """Import ``folder/<module>.py`` as a fresh module called ``name``."""
    file = folder / f"{module}.py"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except SyntaxError as exc:
        raise LearnerCodeError(f"{exc.filename}:{exc.lineno}: syntax error: {exc.msg}") from None
    except Exception as exc:  # noqa: BLE001 - any error in the learner's module
        frame = learner_frame(exc, folder)
        raise LearnerCodeError(
            f"{frame}: importing {file.name} raised {type(exc).__name__}: {exc}") from None
    return mod


def load_harness_module(source: str, filename: str, name: str) -> ModuleType:
    """A lab's harness (code the verification runs beside the learner's) as a fresh module
    called ``name``; ``filename`` names it in tracebacks."""
    mod = ModuleType(name)
    mod.__file__ = filename
    sys.modules[name] = mod
    exec(compile(source, filename, "exec"), mod.__dict__)  # noqa: S102 - the lab's own code
    return mod
