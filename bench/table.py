"""Plain-text tables for benchmark output: a title, a header row, aligned columns."""

from __future__ import annotations

import math


def fmt(v, digits: int = 2) -> str:
    """Numbers to `digits` decimals, None as '-', anything else as str."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def table(title: str, headers: list[str], rows: list[list], digits: int = 2) -> str:
    cells = [[fmt(c, digits) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]

    def line(parts):
        # first column left-aligned (labels), the rest right-aligned (numbers)
        return "  ".join(p.ljust(w) if i == 0 else p.rjust(w)
                         for i, (p, w) in enumerate(zip(parts, widths))).rstrip()

    out = [title, line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)
