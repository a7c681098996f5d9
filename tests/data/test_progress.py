"""The one progress display (engine.data.progress, on tqdm): draws on a terminal, silent
otherwise."""

from __future__ import annotations

import io

from engine.data.progress import Progress


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_count_and_rates_on_a_terminal():
    stream = FakeTerminal()
    progress = Progress("preprocess", unit="docs", stream=stream, min_interval=0.0)
    progress.update(3, tokens=1200, nbytes=5_000_000)
    progress.update(2, tokens=800, nbytes=1_000_000)
    progress.close()
    out = stream.getvalue()
    assert out.startswith("\r") and out.endswith("\n")
    final = out.rstrip().rsplit("\r", 1)[-1]
    assert final.startswith("preprocess: 5 docs")
    assert "2,000 tokens" in final and "tok/s" in final and "MB/s" in final


def test_progress_with_a_total_shows_a_bar():
    stream = FakeTerminal()
    progress = Progress("lambada", 10, "requests", stream=stream, min_interval=0.0)
    progress.update(4, tokens=100)
    progress.update(6, tokens=100)
    progress.close()
    final = stream.getvalue().rstrip().rsplit("\r", 1)[-1]
    assert "100%" in final and "10/10 requests" in final and "200 tokens" in final


def test_progress_is_quiet_off_a_terminal_but_still_counts():
    stream = io.StringIO()
    progress = Progress(unit="docs", stream=stream, min_interval=0.0)
    progress.update(1, tokens=10, nbytes=100)
    progress.close()
    assert stream.getvalue() == ""
    assert (progress.count, progress.tokens, progress.bytes) == (1, 10, 100)


def test_print_goes_above_a_live_bar(capsys):
    stream = FakeTerminal()
    progress = Progress("train", 4, "steps", stream=stream, min_interval=0.0)
    progress.update(1)
    progress.print("step 1/4 | loss 2.0")
    progress.close()
    assert capsys.readouterr().out == "step 1/4 | loss 2.0\n"
    quiet = Progress("train", 4, "steps", stream=io.StringIO())
    quiet.print("plain line")
    assert capsys.readouterr().out == "plain line\n"
