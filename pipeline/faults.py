"""Named points at which the fault-injection tests kill the process, to prove every crash point is safe.

``PIPELINE_KILL_AT=<point>[:<n>][@<rank>]`` sends SIGKILL to this process the n-th time (default: the
first) it reaches ``<point>`` (under torchrun, only on that rank). Unset, a point costs a comparison.
"""

from __future__ import annotations

import os
import re
import signal
from collections import Counter

_POINT, _COUNT, _RANK = (re.fullmatch(r"([\w-]*)(?::(\d+))?(?:@(\d+))?", os.environ.get("PIPELINE_KILL_AT", ""))
                         or re.match("()()()", "")).groups()
_reached: Counter[str] = Counter()

def reached(point: str) -> None:
    """Kill this process here if the environment asks for it (see the module docstring)."""
    if point != _POINT or (_RANK and os.environ.get("RANK", "0") != _RANK):
        return
    _reached[point] += 1
    if _reached[point] == int(_COUNT or 1):
        os.kill(os.getpid(), signal.SIGKILL)
