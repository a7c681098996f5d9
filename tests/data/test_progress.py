"""The progress line draws on a terminal and stays silent otherwise."""

from __future__ import annotations

import io

from data.progress import Progress


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_rates_on_a_terminal():
    stream = FakeTerminal()
    progress = Progress(stream=stream, min_interval=0.0)
    progress.update(documents=3, tokens=1200, nbytes=5_000_000)
    progress.update(documents=2, tokens=800, nbytes=1_000_000)
    progress.close()
    out = stream.getvalue()
    assert out.startswith("\r") and out.endswith("\n")
    assert "5 docs 2,000 tokens" in out and "docs/s" in out and "tok/s" in out and "MB/s" in out


def test_progress_is_quiet_off_a_terminal():
    stream = io.StringIO()
    progress = Progress(stream=stream, min_interval=0.0)
    progress.update(documents=1, tokens=10, nbytes=100)
    progress.close()
    assert stream.getvalue() == ""
    assert progress.documents == 1 and progress.tokens == 10
