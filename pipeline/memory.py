"""Memory for a whole split's vectors: arrays filled once and kept, outside numpy's huge-page advice."""

from __future__ import annotations

import mmap

import numpy as np


def mapped_matrix(rows: int, dim: int) -> np.ndarray:
    """A new float32 ``rows`` x ``dim`` array of zeros in a private anonymous memory map, for vectors filled once and
    kept (a whole split, or a train matrix). It gets the system's default pages, where numpy advises transparent huge
    pages for every array of 4 MB and more: on a VM that hands free memory back to its host in 2 MB blocks
    (virtio-balloon free page reporting), the first touch of each huge page makes the host fault in every 4 KB of it,
    and a train matrix took several times longer to fill (``make bench``, scale section, measures both ways on the
    machine it runs on). Not for buffers made per chunk: a map costs a system call and fresh pages each time."""
    if rows * dim == 0:
        return np.zeros((rows, dim), dtype=np.float32)
    return np.frombuffer(mmap.mmap(-1, rows * dim * 4, flags=mmap.MAP_PRIVATE), dtype=np.float32).reshape(rows, dim)
