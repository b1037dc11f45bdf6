"""Work that makes a few objects per image (listings, store indexes, update plans) runs with the cyclic garbage
collector paused: such objects (tuples, strings) hold no reference cycles, and at 10^6 images the collector's passes
over them were most of that work (``make bench``, scale section)."""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def per_image(function: Callable[P, R]) -> Callable[P, R]:
    """``function`` run with the cyclic collector paused, then restored to what it was (reference counting still
    frees everything as usual; only cycles wait for the next collection)."""

    @functools.wraps(function)
    def paused(*args: P.args, **kwargs: P.kwargs) -> R:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return function(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return paused
