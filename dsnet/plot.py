"""Top-1 accuracy against MAdds for an evaluation report, drawn headless (Agg) and written as a PNG of fixed size."""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import UserError
from .files import atomic_path

FIGSIZE = (6.4, 4.8)  # inches; at DPI this is 640×480 pixels
DPI = 100

# How each kind of report row is drawn. Width choices form the static accuracy/MAdds curve; every other kind is a
# set of markers. Rows of kind "dynamic" (gated networks, one per threshold) are drawn by the same code.
ROW_STYLES: dict[str, dict[str, Any]] = {
    "width": dict(linestyle="-", marker="o", color="tab:blue", label="static widths"),
    "plan": dict(linestyle="none", marker="s", color="tab:green", label="per-layer plan"),
    "dynamic": dict(linestyle="none", marker="*", markersize=11, color="tab:red", label="dynamic"),
}
OTHER_ROWS_STYLE = dict(linestyle="none", marker="D", color="tab:purple")
REFERENCE_STYLE = dict(linestyle="none", marker="^", color="tab:gray", label="reference")


def read_reference_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reference points from a CSV with columns label,madds,top1 (MAdds absolute, top-1 in percent)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"reference file {str(path)!r} does not exist")
    with file.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("label", "madds", "top1") if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"reference file {str(path)!r} lacks column(s) {missing}; need label,madds,top1")
        points = []
        for line, record in enumerate(reader, start=2):
            try:
                madds, top1 = float(record["madds"]), float(record["top1"])
            except (TypeError, ValueError):
                raise UserError(f"reference file {str(path)!r}, line {line}: madds and top1 must be numbers") from None
            if not (math.isfinite(madds) and madds > 0 and math.isfinite(top1)):
                raise UserError(f"reference file {str(path)!r}, line {line}: madds must be positive, top1 a number")
            points.append({"label": record["label"] or "", "madds": madds, "top1": top1})
    if not points:
        raise UserError(f"reference file {str(path)!r} has no points")
    return points


def plot_report(report: dict[str, Any], path: str | os.PathLike, log_madds: bool = False,
                reference: list[dict[str, Any]] | None = None) -> None:
    """Write top-1 against MAdds (millions) of the report's rows, plus reference points, as a PNG at `path`."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    kinds = list(dict.fromkeys(row["kind"] for row in report["rows"]))
    for kind in kinds:
        rows = sorted((r for r in report["rows"] if r["kind"] == kind), key=lambda r: r["madds"])
        style = ROW_STYLES.get(kind, {**OTHER_ROWS_STYLE, "label": kind})
        ax.plot([r["madds"] / 1e6 for r in rows], [r["top1"] for r in rows], **style)
        for r in rows:
            ax.annotate(r["label"], (r["madds"] / 1e6, r["top1"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color=style["color"])
    if reference:
        ax.plot([p["madds"] / 1e6 for p in reference], [p["top1"] for p in reference], **REFERENCE_STYLE)
        for p in reference:
            ax.annotate(p["label"], (p["madds"] / 1e6, p["top1"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=REFERENCE_STYLE["color"])
    if log_madds:
        ax.set_xscale("log")
    ax.set_xlabel("MAdds per image (millions)" + (", log scale" if log_madds else ""))
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{Path(report['checkpoint']).name}: {report['dataset']} {report['split']}, "
                 f"{report['img_size']}×{report['img_size']} input")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
