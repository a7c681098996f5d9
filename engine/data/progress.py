"""The one progress display of the project (preprocess, evaluation, training), on tqdm.

A bar with a count (documents, requests, windows, steps), and the rates that matter to the
job: tokens/s, and MB/s where bytes are read. Drawn only when its stream is a terminal, so
the logs of batch jobs never fill up with carriage returns; `print` writes a line above a
live bar instead of through it.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def _bar_format(label: str, total: int | None) -> str:
    """"label: 40%|####      | 4/10 requests [00:02, 1,234 tok/s]" (no bar without a total)."""
    head = "{desc}: " if label else ""
    if total:
        return head + "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed}{postfix}]"
    return head + "{n_fmt} {unit} [{elapsed}{postfix}]"


class Progress:
    """`Progress("lambada", total=500, unit="requests")`; `update(n, tokens=, nbytes=)`."""

    def __init__(
        self,
        label: str = "",
        total: int | None = None,
        unit: str = "items",
        *,
        initial: int = 0,
        enabled: bool | None = None,
        stream=None,
        min_interval: float = 0.25,
    ):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.count = initial
        self.tokens = 0
        self.bytes = 0
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=label or None,
            unit=unit,
            file=self.stream,
            disable=not self.enabled,
            mininterval=min_interval,
            bar_format=_bar_format(label, total),
            dynamic_ncols=True,
        )

    def update(self, count: int = 0, *, tokens: int = 0, nbytes: int = 0) -> None:
        """Add `count` items (and the tokens and bytes they held) and redraw when due."""
        self.count += count
        self.tokens += tokens
        self.bytes += nbytes
        if self.enabled:
            self._bar.set_postfix_str(self._rates(), refresh=False)
            self._bar.update(count)

    def _rates(self) -> str:
        elapsed = max(self._bar.format_dict["elapsed"], 1e-9)
        parts = []
        if self.tokens:
            parts.append(f"{self.tokens:,} tokens {self.tokens / elapsed:,.0f} tok/s")
        if self.bytes:
            parts.append(f"{self.bytes / elapsed / 1e6:,.1f} MB/s")
        return ", ".join(parts)

    def print(self, text: str, file=None) -> None:
        """Print a line (to stdout by default) without tearing a live bar."""
        if self.enabled:
            tqdm.write(text, file=file or sys.stdout)
        else:
            print(text, file=file or sys.stdout, flush=True)

    def close(self) -> None:
        """Draw the final state and end the line (nothing when disabled)."""
        if self.enabled:
            self._bar.set_postfix_str(self._rates(), refresh=False)
        self._bar.close()
