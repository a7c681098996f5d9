"""A one-line terminal progress display (documents/s, tokens/s, MB/s); silent off a terminal.

Why not tqdm: one more dependency for twenty lines, and logs of batch jobs should not fill
up with carriage returns, so this only draws when stderr is a terminal.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total_bytes: int | None = None, enabled: bool | None = None,
                 stream=None, min_interval: float = 0.25):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total_bytes = total_bytes
        self.min_interval = min_interval
        self.documents = 0
        self.tokens = 0
        self.bytes = 0
        self._start = time.perf_counter()
        self._last_draw = 0.0
        self._drawn = False

    def update(self, documents: int = 0, tokens: int = 0, nbytes: int = 0) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bytes += nbytes
        if self.enabled:
            now = time.perf_counter()
            if now - self._last_draw >= self.min_interval:
                self._last_draw = now
                self._draw(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.perf_counter()) - self._start, 1e-9)
        done = ""
        if self.total_bytes:
            done = f"{100.0 * min(self.bytes / self.total_bytes, 1.0):5.1f}% "
        return (
            f"{done}{self.documents:,} docs {self.tokens:,} tokens | "
            f"{self.documents / elapsed:,.0f} docs/s {self.tokens / elapsed:,.0f} tok/s "
            f"{self.bytes / elapsed / 1e6:,.1f} MB/s"
        )

    def _draw(self, now: float) -> None:
        self.stream.write("\r" + self.line(now) + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled and self._drawn:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
