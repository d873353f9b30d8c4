"""The terminal progress bar of long tasks (tasks/common.py): drawn by rich on the console Prefect prints its log
lines through, so they scroll above it; nothing at all when that console is not a terminal or with --verbose."""

from __future__ import annotations

import io

from rich.console import Console
from rich.theme import Theme

from tasks.common import TerminalBar


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    """A console like Prefect's handler's: a theme of its own, without rich's default styles."""
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=100, color_system=None, theme=Theme(inherit=False)), out


def test_bar_on_a_terminal_with_log_lines_above_it(monkeypatch):
    monkeypatch.delenv("LEANPO_VERBOSE", raising=False)
    console, out = _console(terminal=True)
    bar = TerminalBar("sample-progress", console=console)
    bar.update(50.0)
    bar.progress.refresh()
    console.print("12:00:01 | INFO | Task run 'frames' - frames: 8 rows")  # as Prefect's handler prints
    bar.update(75.0)
    bar.progress.refresh()
    text = out.getvalue()
    assert "sample-progress" in text and "50%" in text and "75%" in text
    assert text.index("frames: 8 rows") < text.rindex("75%")  # the line went above; the bar was drawn again below
    bar.update(100.0)
    assert bar.progress is None  # done: the bar is taken away (transient)


def test_no_bar_in_a_pipe_or_with_verbose(monkeypatch):
    monkeypatch.delenv("LEANPO_VERBOSE", raising=False)
    console, out = _console(terminal=False)
    bar = TerminalBar("train-progress", console=console)
    bar.update(40.0)
    bar.close()
    assert bar.progress is None and out.getvalue() == ""
    monkeypatch.setenv("LEANPO_VERBOSE", "1")
    console, out = _console(terminal=True)
    bar = TerminalBar("train-progress", console=console)
    bar.update(40.0)
    assert bar.progress is None and out.getvalue() == ""
