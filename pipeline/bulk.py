"""Work that makes many objects none of which is garbage runs with the cyclic garbage collector paused, whose passes
over them would find nothing to free: listings, store indexes and update plans (a few tuples and strings per image,
no reference cycles), and the import of torch and the libraries around it (modules, classes and functions, all
kept)."""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic collector paused inside the block, then restored to what it was (reference counting still frees
    everything as usual; only cycles wait for the next collection)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def per_image(function: Callable[P, R]) -> Callable[P, R]:
    """``function`` run with the cyclic collector paused (``collector_paused``)."""

    @functools.wraps(function)
    def paused(*args: P.args, **kwargs: P.kwargs) -> R:
        with collector_paused():
            return function(*args, **kwargs)

    return paused
