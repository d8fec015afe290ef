"""The verification's probe, installed in the learner's server as its ``sitecustomize``
(test_c10k.py puts it on the server's PYTHONPATH): nothing runs until SIGUSR1, then after a
full garbage collection one line on stderr, ``labrunner-probe {json}``:

- ``blocks``: the memory blocks Python holds (``sys.getallocatedblocks``), which come back
  to where they were once a connection and everything it made are gone;
- ``kinds``: the objects the collector tracks, counted by type (an ``Echo`` per connection
  ever accepted names a protocol kept);
- ``sizes``: the lengths of the containers that could be keeping them: each module-level
  dict, set, list or deque of the learner's modules by name, and the other big ones the
  collector tracks by id.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import signal
import sys
from types import FrameType

CONTAINERS = (dict, set, list, collections.deque)
BIG = 64


def _learner_globals() -> dict[str, int]:
    folder = os.path.dirname(os.path.abspath(sys.argv[0])) + os.sep
    sizes = {}
    for module in list(sys.modules.values()):
        if not (getattr(module, "__file__", None) or "").startswith(folder):
            continue
        prefix = "" if module.__name__ == "__main__" else module.__name__ + "."
        for name, value in list(vars(module).items()):
            if isinstance(value, CONTAINERS) and not name.startswith("__"):
                sizes[f"{type(value).__name__} {prefix}{name}"] = len(value)
    return sizes


def _report(signum: int, frame: FrameType | None) -> None:
    del signum, frame
    gc.collect()
    sys._clear_type_cache()
    objects = gc.get_objects()
    kinds = collections.Counter(type(o).__qualname__ for o in objects)
    sizes = {f"a {type(o).__name__} ({id(o):x})": len(o) for o in objects
             if isinstance(o, CONTAINERS) and len(o) >= BIG}
    del objects
    sizes.update(_learner_globals())
    line = json.dumps({"blocks": sys.getallocatedblocks(), "kinds": kinds, "sizes": sizes})
    os.write(2, f"labrunner-probe {line}\n".encode())


signal.signal(signal.SIGUSR1, _report)
