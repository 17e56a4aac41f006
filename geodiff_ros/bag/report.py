"""Command output of the bag tool and the demo: tables and summaries on stdout (logs go to stderr)."""

from __future__ import annotations

import sys

__all__ = ["format_table", "print_out"]


def print_out(text: str = "") -> None:
    """Command output (tables, summaries) goes to stdout; logs go to stderr."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)
