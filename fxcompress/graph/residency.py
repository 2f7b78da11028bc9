"""Keep a file-mapped model's float weights out of memory while it is compressed.

transformers (5 and later) loads safetensors by mapping the file: a weight costs memory only once it is read, and
then stays resident as page cache counted in the process's RSS. Compressing reads every weight once (to quantize it)
and the capture's reference run reads them all; left alone, a model of half the RAM would be wholly resident at the
end. :class:`WeightPager` tells the kernel (``madvise(MADV_PAGEOUT)``) that those pages may go after each layer: clean
file pages are dropped and read again from disk if needed, so at any time about one layer's float weights are
resident next to what is already compressed.

``MADV_PAGEOUT`` is a hint that never loses data (a page written since it was mapped is kept, or swapped): it is safe
on any memory, and a no-op where the weights are not file-mapped, on kernels before 5.4, and off Linux.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
import time
from typing import Iterator, Optional

from torch import nn

log = logging.getLogger(__name__)
_MADV_PAGEOUT = 21
_ACTIVE: Optional["WeightPager"] = None  # the pager checkpoint() releases (set by WeightPager.while_reading)
_EVERY_SECONDS = 0.05


def checkpoint() -> None:
    """Between slices of a large weight: let the active pager's pages go (at most every 50 ms; nothing when no
    pager is active, as for a model in ordinary memory).

    Example:
        >>> checkpoint()  # no pager active: nothing happens
    """
    pager = _ACTIVE
    if pager is not None and time.monotonic() - pager.released_at >= _EVERY_SECONDS:
        pager.release()


def _mapped_files() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's file-backed mappings."""
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip().startswith("/") and parts[4] != "0":
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    found.append((start, end, parts[5].strip()))
    except OSError:
        return []
    return found


class WeightPager:
    """The file mappings that hold ``model``'s parameters and buffers, and a way to let their pages go.

    Example:
        >>> pager = WeightPager(nn.Linear(4, 4))  # an in-memory model: nothing is file-mapped
        >>> pager.mapped_bytes, pager.release()
        (0, 0)
    """

    def __init__(self, model: nn.Module):
        self.ranges: list[tuple[int, int]] = []
        self.released_at = 0.0
        self._trim = None
        if not sys.platform.startswith("linux"):
            return
        maps = _mapped_files()
        if not maps:
            return
        pointers = sorted({t.data_ptr() for t in [*model.parameters(), *model.buffers()] if t.numel()})
        for start, end, _ in maps:
            if any(start <= p < end for p in pointers):
                self.ranges.append((start, end))
        if self.ranges:
            libc = ctypes.CDLL(None, use_errno=True)
            self._madvise = libc.madvise
            self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self._trim = getattr(libc, "malloc_trim", None)  # glibc only
            log.info("weights mapped from %d file(s), %.2f GiB", len(self.ranges), self.mapped_bytes / 2**30)

    @property
    def mapped_bytes(self) -> int:
        return sum(end - start for start, end in self.ranges)

    def release(self) -> int:
        """Let the kernel drop the mapped weights' resident pages, and give the heap that reading them freed back to
        the OS; the bytes of mappings advised."""
        self.released_at = time.monotonic()
        advised = 0
        for start, end in self.ranges:
            if self._madvise(start, end - start, _MADV_PAGEOUT) == 0:
                advised += end - start
        if self._trim is not None and self.ranges:
            # slices of float temporaries (a few MiB each, under malloc's mmap threshold) come from the heap between
            # long-lived codes; freed, they stay as holes counted in RSS (measured: 1.3 GiB on a 4B model) unless
            # returned
            self._trim(0)
        return advised

    @contextlib.contextmanager
    def while_reading(self) -> Iterator[None]:
        """Make this pager the one :func:`checkpoint` releases while the block runs: code that reads one large weight
        in slices (a 128k-token embedding is 1.5 GiB of floats) calls it between slices, so the slices already read
        go too."""
        global _ACTIVE
        previous, _ACTIVE = _ACTIVE, (self if self.ranges else None)
        try:
            yield
        finally:
            _ACTIVE = previous

    @contextlib.contextmanager
    def layer_by_layer(self, model: nn.Module) -> Iterator[None]:
        """Release after every module that holds weights of its own runs, while the block is active (a forward over
        the whole model then keeps about one layer resident)."""
        if not self.ranges:
            yield
            return
        holders = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]

        def release_after(*_: object) -> None:  # a hook that returned a value would replace the module's output
            self.release()

        handles = [m.register_forward_hook(release_after) for m in holders]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def resident_bytes() -> int:
    """This process's resident memory now (Linux; 0 elsewhere).

    Example:
        >>> resident_bytes() > 0
        True
    """
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        return 0
