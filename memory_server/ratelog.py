"""Logging what clients did wrong without letting them write the log.

A server logs each request it rejects, but the rejections are the attacker's to make: 50 requests
naming an op of 64 KiB each once wrote 26 MB of log. So such lines go through a ``RateLimitedLog``:
at most ``per_second`` lines a second, the rest counted and reported with the next line that is
written, and every piece of client text cut to ``CLIP_CHARS`` characters.
"""

from __future__ import annotations

import logging
import threading
import time

CLIP_CHARS = 200
"""The most characters of a client's text a log line repeats."""


def clip(text: object, limit: int = CLIP_CHARS) -> str:
    """``text`` (converted with ``str``) cut to ``limit`` characters, saying how long it was."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class RateLimitedLog:
    """At most ``per_second`` lines a second to ``logger``; the others are counted, and the next
    line written says how many were not. Thread-safe."""

    def __init__(self, logger: logging.Logger, per_second: int = 10, level: int = logging.INFO):
        self._log = logger
        self._level = level
        self._per_second = per_second
        self._lock = threading.Lock()
        self._window = -1  # the whole second of the current window
        self._written = 0  # lines written in it
        self._suppressed = 0  # lines not written since the last one that was
        self.suppressed_total = 0

    def __call__(self, message: str, *args, level: int | None = None) -> None:
        """Log ``message % args`` (at ``level``, by default the limiter's), each argument but
        integers clipped to ``CLIP_CHARS`` characters; or count it."""
        level = self._level if level is None else level
        if not self._log.isEnabledFor(level):
            return
        window = int(time.monotonic())
        with self._lock:
            if window != self._window:
                self._window, self._written = window, 0
            if self._written >= self._per_second:
                self._suppressed += 1
                self.suppressed_total += 1
                return
            self._written += 1
            suppressed, self._suppressed = self._suppressed, 0
        if suppressed:
            message += " (and %d similar lines not logged: at most %d a second)"
            args = (*args, suppressed, self._per_second)
        self._log.log(level, message, *(a if isinstance(a, int) else clip(a)
                                                for a in args))

    def flush(self) -> None:
        """Log how many lines were not written since the last one that was, if any."""
        with self._lock:
            suppressed, self._suppressed = self._suppressed, 0
        if suppressed:
            self._log.log(self._level, "%d similar lines not logged (at most %d a second)",
                          suppressed, self._per_second)
