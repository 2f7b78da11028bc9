"""Text for people: byte counts in binary units and plain tables, shared by the reports and the CLI."""

from __future__ import annotations


def fmt_bytes(n: float) -> str:
    """Bytes in binary units, three significant figures.

    Example:
        >>> fmt_bytes(1536)
        '1.50 KiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def table(rows: list[list[str]], header: list[str]) -> str:
    """Left-aligned text table.

    Example:
        >>> print(table([["fc", "int8"]], ["layer", "action"]))
        layer  action
        -----  ------
        fc     int8
    """
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]

    def line(r: list) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
