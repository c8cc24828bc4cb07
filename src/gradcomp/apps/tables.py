"""Plain-text tables (GitHub markdown pipes) and JSON output shared by every CLI command."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _cell(v, floatfmt: str) -> str:
    if v is None:
        return "-"  # not measured (e.g. no metric step ran)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return format(v, floatfmt)
    return str(v)


def format_table(headers: list[str], rows: list[list], floatfmt: str = ".4g") -> str:
    """Markdown pipe table, right-aligned: readable in a terminal, pasteable in a README."""
    cells = [[_cell(v, floatfmt) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    body = ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join([line, sep, *body])


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # strict JSON has no NaN/inf
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return _jsonable(obj.item())
        except (ValueError, RuntimeError):
            pass
    return obj


def to_json(obj) -> str:
    """Strict JSON (NaN/inf become null)."""
    return json.dumps(_jsonable(obj), indent=2, allow_nan=False)


def write_json(path: str | Path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(obj) + "\n")
    return path
