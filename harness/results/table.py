"""The results table laid out like the paper's Table 1 (rich, Markdown and CSV).

Methods are rows; AD and IC at every kept fraction and #FW are columns. Per column the best
value is bold and the second best underlined (AD and #FW: lower is better; IC: higher).
"""
from __future__ import annotations

from rich.table import Table

LOWER_IS_BETTER = ("AD_", "FW")


def metric_columns(fractions_keys: list[str]) -> list[str]:
    cols = []
    for k in fractions_keys:
        cols += [f"AD_{k}", f"IC_{k}"]
    return cols + ["FW"]


def header(col: str) -> str:
    if col == "FW":
        return "#FW"
    kind, key = col.split("_", 1)
    return f"{kind}({key}%){'↓' if kind == 'AD' else '↑'}"


def ranks(rows: list[dict], col: str) -> dict[int, int]:
    """Row index -> 1 (best) or 2 (second) for column ``col``."""
    values = sorted({r[col] for r in rows if r.get(col) is not None},
                    reverse=not col.startswith(LOWER_IS_BETTER))
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
    return f"{value:.0f}" if col == "FW" else f"{value:.2f}"


def rich_table(title: str, rows: list[dict], cols: list[str]) -> Table:
    """``rows``: dicts with 'method' (display name) and the metric columns."""
    table = Table(title=title, title_justify="left")
    table.add_column("Method")
    for c in cols:
        table.add_column(header(c), justify="right")
    marks = {c: ranks(rows, c) for c in cols}
    for i, r in enumerate(rows):
        cells = []
        for c in cols:
            text = fmt(c, r.get(c))
            rank = marks[c].get(i)
            cells.append(f"[bold]{text}[/bold]" if rank == 1 else
                         f"[underline]{text}[/underline]" if rank == 2 else text)
        table.add_row(r["method"], *cells)
    table.caption = "bold: best, underlined: second best"
    return table


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    marks = {c: ranks(rows, c) for c in cols}
    lines = ["| Method | " + " | ".join(header(c) for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for i, r in enumerate(rows):
        cells = []
        for c in cols:
            text, rank = fmt(c, r.get(c)), marks[c].get(i)
            cells.append(f"**{text}**" if rank == 1 else f"<u>{text}</u>" if rank == 2 else text)
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

