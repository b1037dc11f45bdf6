"""Progress of long work: tqdm's bar on a terminal; elsewhere (a log file, CI, a pipe) one plain line every
LOG_SECONDS, so a long run never looks hung. Messages go through ``logging`` (logger ``pipeline``): the CLI shows
them on stdout; in a notebook or script only warnings show, unless logging is configured."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO

from tqdm import tqdm

LOG_SECONDS = 10.0


class _Lines:
    """A stream for tqdm that writes each redraw as a line of its own instead of overwriting it with a carriage return."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable | None = None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on stderr: a bar on a terminal, a line every LOG_SECONDS elsewhere."""
    if sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    return tqdm(iterable, file=_Lines(sys.stderr), mininterval=LOG_SECONDS, ascii=True, **kwargs)
