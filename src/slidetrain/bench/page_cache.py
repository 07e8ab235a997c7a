"""Cold reads for the reading benchmarks: evict a file from the OS page cache, and check that it left.

A real cohort of multi-GB slides is read cold: the page cache cannot hold it,
and a training epoch reads each slide once. A benchmark that reads its few
small slides twice times warm reads unless it evicts them first.

`drop_page_cache(path)` asks the kernel to drop the file's clean cached pages
(`posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)`). It needs no privileges, only
read access to the file, and leaves every other file's cache alone (unlike
`echo 3 > /proc/sys/vm/drop_caches`, which needs root). It is advice: dirty
pages stay until written back, and a file system may ignore it (network file
systems), so `cached_fraction(path)` measures what is left (mincore(2) on a
read-only mapping) and the benchmarks write that number beside their cold
figures.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import os
from pathlib import Path

from slidetrain.errors import SlidetrainError

_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value


def drop_page_cache(path: str | Path) -> None:
    """Evict `path`'s clean pages from the page cache (advice to the kernel, no root needed)."""
    if not hasattr(os, "posix_fadvise"):
        raise SlidetrainError(f"cold reads of {path}: os.posix_fadvise is not available on this system")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # length 0: to the end of the file
    finally:
        os.close(fd)


def _mincore_tells(path: str | Path) -> bool:
    """Whether mincore reports `path`'s real page-cache state to this process.

    Since Linux 5.0, mincore tells only for files the caller owns or may write
    (a side-channel guard); for any other file it reports every page resident.
    posix_fadvise has no such limit (checked: uid 65534 evicted a root-owned 0644 file).
    """
    return os.geteuid() == 0 or os.stat(path).st_uid == os.geteuid() or os.access(path, os.W_OK)


def cached_fraction(path: str | Path) -> float:
    """Share of `path`'s pages in the page cache now (0..1); NaN where mincore cannot tell
    (a file this process neither owns nor may write, or a file system without it).

    Mapping a file does not read it, and mincore only looks, so this leaves the cache as it was.
    """
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    if not _mincore_tells(path):
        return math.nan
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            return math.nan
        try:
            pages = (size + _PAGE - 1) // _PAGE
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                return math.nan
            return (pages - bytes(vec).count(0)) / pages  # a non-zero byte (bit 0): resident
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def largest_left(fractions: list[float]) -> float:
    """The largest cached share; NaN if any is unknown (unknown for one file is unknown, not cold)."""
    if any(math.isnan(x) for x in fractions):
        return math.nan
    return max(fractions, default=0.0)


def drop_and_measure(paths: list[str | Path]) -> float:
    """Evict every file in `paths`; return the largest share of any of them still cached (0 = all cold)."""
    left = []
    for path in dict.fromkeys(map(str, paths)):  # each file once, in order
        drop_page_cache(path)
        left.append(cached_fraction(path))
    return largest_left(left)


__all__ = ["cached_fraction", "drop_and_measure", "drop_page_cache", "largest_left"]
