"""The planner's trade-off as pictures: bytes (and, when timed, latency) against the cosine on ONNX Runtime.

An SVG is always written (no dependency, readable in any browser); a PNG too when matplotlib is installed
(``pip install 'fxcompress[report]'``), and the HTML report then embeds the PNG.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from fxcompress.planner import Candidate


def pareto_svg(
    candidates: Sequence[Candidate], chosen: Optional[Candidate], size: Optional[float], floor: float
) -> str:
    """Bytes (x fp32) against cosine on ONNX Runtime as a small SVG scatter: the size and floor as dashed lines, the
    chosen candidate filled.

    Example:
        >>> from fxcompress.planner import Candidate
        >>> pareto_svg([Candidate("int8", 0.26, 0.9995)], None, 0.3, 0.99).startswith("<svg")
        True
    """
    measured = [c for c in candidates if c.cosine is not None and math.isfinite(c.cosine)]
    w, h, pad = 480, 320, 48
    lo = min([c.cosine for c in measured] + [floor]) - 0.001
    hi = 1.0

    def x(r: float) -> float:
        return pad + r * (w - 2 * pad)

    def y(c: float) -> float:
        return h - pad - (c - lo) / max(hi - lo, 1e-9) * (h - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="11">']
    parts.append(f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" fill="none" stroke="#888"/>')
    parts.append(f'<text x="{w / 2 - 50}" y="{h - 12}">bytes (x fp32)</text>')
    parts.append(f'<text x="4" y="{pad - 8}">cosine on ONNX Runtime ({lo:.3f} .. 1)</text>')
    parts.append(f'<line x1="{pad}" x2="{w - pad}" y1="{y(floor)}" y2="{y(floor)}" stroke="red" stroke-dasharray="4"/>')
    if size is not None:
        parts.append(
            f'<line x1="{x(size)}" x2="{x(size)}" y1="{pad}" y2="{h - pad}" stroke="blue" stroke-dasharray="4"/>'
        )
    for c in measured:
        fill = "black" if chosen is not None and c.recipe == chosen.recipe else "white"
        parts.append(f'<circle cx="{x(c.ratio):.1f}" cy="{y(c.cosine):.1f}" r="4" fill="{fill}" stroke="black">')
        parts.append(f"<title>{c.recipe}: {c.ratio:.3f}, cosine {c.cosine:.5f}</title></circle>")
    parts.append("</svg>")
    return "\n".join(parts)


def pareto_png(
    candidates: Sequence[Candidate], chosen: Optional[Candidate], size: Optional[float], floor: float
) -> Optional[bytes]:
    """The same scatter as :func:`pareto_svg` as PNG bytes, with a second panel of latency (x fp32) against cosine
    when the candidates were timed; None when matplotlib is not installed.

    Example:
        >>> from fxcompress.planner import Candidate
        >>> png = pareto_png([Candidate("int8", 0.26, 0.9995, latency_ratio=0.4)], None, 0.3, 0.99)
        >>> png is None or png[:4] == b"\\x89PNG"
        True
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: render to memory
        from matplotlib import pyplot as plt
    except ImportError:
        return None
    measured = [c for c in candidates if c.cosine is not None and math.isfinite(c.cosine)]
    timed = [c for c in measured if c.latency_ratio is not None]
    axes_x = [("ratio", "bytes (x fp32)", size)] + ([("latency_ratio", "latency (x fp32)", None)] if timed else [])
    fig, axes = plt.subplots(1, len(axes_x), figsize=(5.2 * len(axes_x), 3.8), squeeze=False)
    for ax, (field, label, limit) in zip(axes[0], axes_x):
        points = timed if field == "latency_ratio" else measured
        for c in points:
            is_chosen = chosen is not None and c.recipe == chosen.recipe
            ax.scatter(getattr(c, field), c.cosine, s=36, c="black" if is_chosen else "white", edgecolors="black",
                       zorder=3, label="chosen" if is_chosen else None)  # fmt: skip
        ax.axhline(floor, color="red", linestyle="--", linewidth=1, label=f"cosine floor {floor}")
        if limit is not None:
            ax.axvline(limit, color="blue", linestyle="--", linewidth=1, label=f"size {limit}")
        ax.set_xlabel(label)
        ax.set_ylabel("cosine on ONNX Runtime")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)
    return out.getvalue()
