"""Printed paths stay on one line whatever the terminal (CI once failed on a wrapped path)."""
import io

from harness.terminal import PIPE_WIDTH, make_console


def test_a_long_path_is_printed_on_one_line_when_piped(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr("sys.stdout", buf)
    console = make_console()
    path = "/check/work/main/.harness-cache/tests/sweeps/" + "x" * 2 * PIPE_WIDTH + "/best.yaml"
    console.print(f"best config written as a benchmark spec: {path}")
    lines = buf.getvalue().splitlines()
    assert lines == [f"best config written as a benchmark spec: {path}"]


def test_tables_keep_the_pipe_width(monkeypatch):
    from rich.table import Table
    buf = io.StringIO()
    monkeypatch.setattr("sys.stdout", buf)
    t = Table("a", "b")
    t.add_row("x" * 300, "y")
    make_console().print(t)
    assert max(len(line) for line in buf.getvalue().splitlines()) <= PIPE_WIDTH
