"""Progress of long work: a tqdm bar on a terminal, a plain line every so often in a log.

tqdm redraws its bar with carriage returns, which a log file (``ray job logs``, a batch system's
output, ``2> job.log``) keeps as one ever-growing line; without a terminal, :class:`Progress`
writes a whole line instead, at most every ``interval`` seconds and once at the end::

    preprocess: 1200/3200 inputs (38%), 240 inputs/s, records=1,200, errors=0
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

LOG_INTERVAL_S = 30.0
"""Seconds between two progress lines in a log (no terminal)."""


class Progress:
    """``update``/``set_postfix``/``close`` like tqdm's; a context manager."""

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        unit: str,
        initial: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float = LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.postfix: dict[str, Any] = {}
        self._bar = None
        self._lines = False
        self._clock, self._interval = clock, interval
        self._t0 = self._last = clock()
        self._n0 = initial
        if not enabled:
            return
        isatty = getattr(self.stream, "isatty", None)
        if isatty is not None and isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                             dynamic_ncols=True)  # fmt: skip
        else:
            self._lines = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines and self._clock() - self._last >= self._interval:
            self._line()

    def moveto(self, n: int) -> None:
        """Set the count to ``n`` (it may go back: work counted while in flight was redone)."""
        if n >= self.n:
            self.update(n - self.n)
            return
        self.n = n
        if self._bar is not None:
            self._bar.n = n
            self._bar.refresh()

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = kw
        if self._bar is not None:
            self._bar.set_postfix(**kw)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._lines:
            self._line()  # where it ended
            self._lines = False

    def _line(self) -> None:
        now = self._clock()
        self._last = now
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self._n0) / (now - self._t0) if now > self._t0 else 0.0
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}s{pct}, {rate:.3g} {self.unit}s/s{extra}",
              file=self.stream, flush=True)  # fmt: skip
