"""The results table laid out like the paper's Table 1 (rich, Markdown and CSV).

Methods are rows; AD and IC at every kept fraction, the other listed metrics' numbers when
measured (deletion, insertion, ROAD's MoRF and LeRF, plugins') and #FW are columns. Which
direction is better, each column's header and its decimals are the metrics' own
declarations (``harness.metrics.registry``: ``direction``, ``header``, ``digits``; #FW:
lower). A value with an interval (``<col>_ci_low``/``_ci_high`` in the row) is shown as
``value ± half-width``, the half-width being half the interval's width (BCa intervals are
not symmetric: the CSV keeps both bounds).

Marks: #FW is exact, so its lowest value is bold and the second lowest underlined. Every
other column is a mean over images: a row is bold there only when it is *significantly*
better than every other row (``harness.metrics.statistics``: paired sign-flip tests,
Holm-corrected), and underlined when it is so against every row but the bold one; the marks
come with the rows (``row["marks"] = {column: 1 | 2}``). Without tests, nothing is marked.

The paper's Table 1: a row of a Table 1 preset run carries ``row["paper"] = {column: value}``
(``harness.results.table1``); each of its cells then shows, under ours, the paper's value
and the difference: ``paper 32.12`` and ``Δ +0.38`` (Δ = ours - paper).
"""
from __future__ import annotations

from rich.table import Table

from harness.metrics import registry
CAPTION = ("± half the {level} interval; bold: significantly better than every other row "
           "(paired test, Holm-adjusted p < {alpha:g}), underlined: the same against every "
           "row but the bold one; #FW: lowest bold")


def extra_columns() -> list[str]:
    """The Table 1 columns of the metrics other than AD/IC, when measured (registry order:
    ``deletion_auc``, ``insertion_auc``, ``road_morf``, ``road_lerf``, plugins')."""
    return registry.table_columns()


def metric_columns(fractions_keys: list[str], causal: tuple[str, ...] = ()) -> list[str]:
    """Table 1's columns; ``causal``: the other metrics' columns present
    (``extra_columns``)."""
    cols = []
    for k in fractions_keys:
        cols += [f"AD_{k}", f"IC_{k}"]
    return cols + [c for c in extra_columns() if c in causal] + ["FW"]


def lower_is_better(col: str) -> bool:
    """The column's declared direction (``harness.metrics.registry.direction``)."""
    return registry.lower_is_better(col)


def header(col: str) -> str:
    return registry.header(col)


def caption(level: str = "95% BCa", alpha: float = 0.05) -> str:
    """What the ± and the marks mean (``CAPTION``)."""
    return CAPTION.format(level=level, alpha=alpha)


def ranks(rows: list[dict], col: str) -> dict[int, int]:
    """Row index -> 1 (best) or 2 (second) for column ``col`` (see the module docstring)."""
    if col != "FW":
        return {i: r["marks"][col] for i, r in enumerate(rows)
                if r.get("marks", {}).get(col) in (1, 2)}
    values = sorted({r[col] for r in rows if r.get(col) is not None},
                    reverse=not lower_is_better(col))
    out = {}
    for i, r in enumerate(rows):
        v = r.get(col)
        if v is not None and values and v == values[0]:
            out[i] = 1
        elif v is not None and len(values) > 1 and v == values[1]:
            out[i] = 2
    return out


def fmt(col: str, value) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if col == "FW" else f"{value:.{registry.digits(col)}f}"


def cell(row: dict, col: str) -> str:
    """``fmt`` of the row's value, with ``± half-width`` where the row has its interval."""
    text, low, high = fmt(col, row.get(col)), row.get(f"{col}_ci_low"), row.get(f"{col}_ci_high")
    if row.get(col) is None or low is None or high is None:
        return text
    return f"{text} ± {fmt(col, (high - low) / 2)}"


def paper_lines(row: dict, col: str) -> list[str]:
    """``['paper <value>', 'Δ <ours - paper>']`` where the row has the paper's value (the
    second line only where it has ours too), else []."""
    paper, ours = (row.get("paper") or {}).get(col), row.get(col)
    if paper is None:
        return []
    lines = [f"paper {fmt(col, paper)}"]
    if ours is not None:
        lines.append(f"Δ {'+' if ours - paper >= 0 else '-'}{fmt(col, abs(ours - paper))}")
    return lines


def rich_table(title: str, rows: list[dict], cols: list[str], note: str | None = None) -> Table:
    """``rows``: dicts with 'method' (display name) and the metric columns; ``note``: the
    caption (default: ``caption()``)."""
    table = Table(title=title, title_justify="left")
    table.add_column("Method")
    for c in cols:
        table.add_column(header(c), justify="right")
    marks = {c: ranks(rows, c) for c in cols}
    for i, r in enumerate(rows):
        cells = []
        for c in cols:
            text = cell(r, c)
            rank = marks[c].get(i)
            text = (f"[bold]{text}[/bold]" if rank == 1 else
                    f"[underline]{text}[/underline]" if rank == 2 else text)
            cells.append("\n".join([text, *(f"[dim]{line}[/dim]" for line in paper_lines(r, c))]))
        table.add_row(r["method"], *cells)
    table.caption = note or caption()
    return table


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    marks = {c: ranks(rows, c) for c in cols}
    lines = ["| Method | " + " | ".join(header(c) for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for i, r in enumerate(rows):
        cells = []
        for c in cols:
            text, rank = cell(r, c), marks[c].get(i)
            text = f"**{text}**" if rank == 1 else f"<u>{text}</u>" if rank == 2 else text
            cells.append("<br>".join([text, *paper_lines(r, c)]))
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

