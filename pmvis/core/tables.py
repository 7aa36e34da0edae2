"""Tables for people: every table pmvis prints or writes goes through :func:`format_table`.

Cells are strings already (each caller knows how many digits its numbers deserve); this module
only lays them out, as aligned plain text for a terminal or as a Markdown table for a file.
"""

from __future__ import annotations

from typing import Literal, Sequence


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    style: Literal["text", "markdown"] = "text",
    align: str | None = None,
) -> str:
    """``headers`` and ``rows`` laid out as ``style``.

    Text: columns two spaces apart, each as wide as its widest cell, ``align`` giving ``l`` or ``r``
    per column (default all left); trailing spaces are cut. Markdown: ``| a | b |`` rows under a
    ``|---|---|`` rule (alignment is left to the renderer)."""
    if style == "markdown":
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    align = align or "l" * len(headers)
    if len(align) != len(headers) or set(align) - {"l", "r"}:
        raise ValueError(f"align needs one of 'l'/'r' per column ({len(headers)}), got {align!r}")
    table = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, align)).rstrip()
        for row in table)
