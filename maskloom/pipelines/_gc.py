"""Python's cyclic garbage collector paused over the driver's bookkeeping of large input sets."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for a burst of allocations that makes no reference cycles
    (usable as a decorator too); it resumes afterwards if it was running.

    Planning a job allocates a few objects per input (paths, ``Input``\\ s, JSON pairs, shard specs),
    and CPython 3.11 runs a collection every 700 net allocations of tracked objects, each older
    generation's pass walking the whole grown heap: for a million inputs the driver's planning took
    6.3 s, 3.6 s of it in the collector (``Input``\\ s 1.5 -> 0.46 s, the digest's pairs 0.73 ->
    0.08 s). Nothing in these paths makes cycles, so reference counting frees everything as before;
    an exception leaves the collector as it was."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
