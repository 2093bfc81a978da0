"""A table's cells as CSV text: what `mnist-classify --table --csv` writes and `POST …/table?format=csv` answers."""

from __future__ import annotations

import csv
import io


def table_csv(rows: list[list[str]]) -> str:
    """One line per row, every cell quoted as text, so a spreadsheet keeps a leading 0 ("07") as written."""
    out = io.StringIO()
    csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)
    return out.getvalue()
