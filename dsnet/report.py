"""The report (``--json``) is one object::

    {
      "format": "dsnet-eval", "version": 1,
      "checkpoint": str, "mode": "sweep" | "static" | "dynamic", "weights": "ema" | "model",
      "dataset": str, "data_dir": str | null, "split": "val", "num_samples": int,
      "img_size": int, "num_classes": int, "device": str, "threads": int,
      "latency": null (not measured) | {"batch_size": N, "repeats": int, "warmup": int,
                                        "freed_memory_kept": bool},  # --keep-freed-memory
      "latency_table": {"file": str, "batch_size": int, "runtime": str, "device": str, "threads": int},
                                           # with --lut only
      "rows": [
        {
          "kind": "width" | "plan" | "dynamic",  # a width choice, a per-layer plan, or the gated network
          "label": str,                    # "0.35", the plan file's name, or "dynamic"
          "width": float | null,           # the multiplier; null for a per-layer plan and the gated network
          "plan": {group: channels},       # rows of kind "plan" only
          "top1": float, "top5": float,    # percent; top-5 is top-k with k = min(5, classes)
          "loss": float,                   # mean cross-entropy per image
          "params": int, "madds": int,     # dense subnet; MAdds of one image at img_size (dynamic: parameters of
                                           # the widest route and the gate; the mean MAdds per image, rounded)
          "latency_ms_b1": float | null,   # median milliseconds per batch of 1 ...
          "latency_ms_bN": float | null,   # ... and per batch of latency.batch_size; null when not measured
          "bn_recalibration_batches": int, # 0: BN statistics as stored in the checkpoint
          "predicted_latency_ms": float,   # with --lut only: the table's prediction at its batch size (dynamic:
                                           # the mean over the images of their route's prediction)
          # rows of kind "dynamic" only:
          "gate_block": str, "input_width": float,  # where the gate sits; the width of the layers before it
          "routes": [                      # one per route, narrowest first
            {"width": float, "madds": int,   # the route's width after the gate; MAdds of one image on it
             "images": int,                  # validation images the gate sent there
             "top1": float | null}, ...      # top-1 on those images (null: none went there)
          ],
          "static_curve": {                # absent with --no-static-curve; the rows of these widths follow
            "widths": [float, ...],          # the uniform widths whose MAdds bracket the mean MAdds (one: equal)
            "top1": float | null             # their top-1 interpolated at the mean MAdds (null: outside their range)
          }
        }, ...
      ]
    }

Rows are plain dicts: other kinds of rows may carry more keys. ``--csv`` holds the rows with the same keys as
columns (``plan`` as compact JSON, null as an empty cell). `validate_report` checks a report against these keys.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPORT_FORMAT = "dsnet-eval"
REPORT_VERSION = 1

# The dataclasses below are the schema: their fields are the keys, in order, and their annotations the JSON types
# (`float` takes an integer too, a dataclass is an object). `validate_report` and the CSV columns follow from them.


@dataclass(kw_only=True)
class Latency:
    batch_size: int
    repeats: int
    warmup: int
    freed_memory_kept: bool


@dataclass(kw_only=True)
class Report:
    format: str = REPORT_FORMAT
    version: int = REPORT_VERSION
    checkpoint: str
    mode: str
    weights: str
    dataset: str
    data_dir: str | None
    split: str = "val"
    num_samples: int
    img_size: int
    num_classes: int
    device: str
    threads: int
    latency: Latency | None
    rows: list


@dataclass(kw_only=True)
class Row:
    """The keys of every row. A row of kind "plan" adds `plan`; one of kind "dynamic" adds `gate_block`,
    `input_width`, `routes` (each a `Route`) and, unless skipped, `static_curve` (a `StaticCurve`)."""

    kind: str
    label: str
    width: float | None
    top1: float
    top5: float
    loss: float
    params: int
    madds: int
    latency_ms_b1: float | None
    latency_ms_bN: float | None
    bn_recalibration_batches: int


@dataclass(kw_only=True)
class Route:
    width: float
    madds: int
    images: int
    top1: float | None


@dataclass(kw_only=True)
class StaticCurve:
    widths: list
    top1: float | None


ROW_KEYS = tuple(f.name for f in dataclasses.fields(Row))
CSV_COLUMNS = (*ROW_KEYS[:3], "plan", *ROW_KEYS[3:])


def _json_types(hint: Any) -> tuple[type, ...]:
    """The Python types of the JSON values an annotation allows."""
    accepted: list[type] = []
    for t in typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,):
        if t is float:
            accepted += [int, float]
        elif dataclasses.is_dataclass(t):
            accepted.append(dict)
        else:
            accepted.append(typing.get_origin(t) or t)
    return tuple(accepted)


def _check_type(where: str, value: Any, types_: tuple[type, ...]) -> None:
    if types_ == (bool,):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false")
        return
    if isinstance(value, bool) or not isinstance(value, types_):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types_)
        raise ValueError(f"{where} must be {names}, got {value!r}")


def _check_fields(where: str, values: dict[str, Any], schema: type) -> None:
    """Every field of `schema` is a key of `values`, of its type."""
    for key, hint in typing.get_type_hints(schema).items():
        if key not in values:
            raise ValueError(f"{where} lacks key {key!r}")
        _check_type(f"{where}[{key!r}]", values[key], _json_types(hint))


def validate_report(report: Any) -> None:
    """Raise ValueError naming the first key of `report` that is missing or out of place (see the module doc)."""
    if not isinstance(report, dict):
        raise ValueError("a report must be a JSON object")
    _check_fields("report", report, Report)
    if report["format"] != REPORT_FORMAT:
        raise ValueError(f"report format is {report['format']!r}, not {REPORT_FORMAT!r}")
    latency = report["latency"]
    if latency is not None:
        _check_fields("report['latency']", latency, Latency)
    if not report["rows"]:
        raise ValueError("report has no rows")
    for i, row in enumerate(report["rows"]):
        where = f"rows[{i}]"
        if not isinstance(row, dict):
            raise ValueError(f"{where} must be an object")
        _check_fields(where, row, Row)
        if not 0 <= row["top1"] <= row["top5"] <= 100:
            raise ValueError(f"{where}: need 0 <= top1 <= top5 <= 100, got {row['top1']} and {row['top5']}")
        if not (math.isfinite(row["loss"]) and row["loss"] >= 0):
            raise ValueError(f"{where}: loss must be a finite number >= 0, got {row['loss']}")
        if row["params"] <= 0 or row["madds"] <= 0:
            raise ValueError(f"{where}: params and madds must be positive")
        for key in ("latency_ms_b1", "latency_ms_bN"):
            if (row[key] is None) != (latency is None):
                raise ValueError(f"{where}[{key!r}] must be a number exactly when the report has latency settings")
            if row[key] is not None and not row[key] > 0:
                raise ValueError(f"{where}[{key!r}] must be positive, got {row[key]}")
        if row["kind"] == "width" and row["width"] is None:
            raise ValueError(f"{where}: a row of kind 'width' needs a width")
        if row["kind"] == "plan":
            plan = row.get("plan")
            if not isinstance(plan, dict) or not all(isinstance(k, str) and type(v) is int for k, v in plan.items()):
                raise ValueError(f"{where}: a row of kind 'plan' needs 'plan', a mapping of group to channels")
        if row["kind"] == "dynamic":
            _validate_routes(where, row)
            if "static_curve" in row:
                _validate_static_curve(f"{where}['static_curve']", row["static_curve"])


def _validate_static_curve(where: str, curve: Any) -> None:
    if not isinstance(curve, dict) or not isinstance(curve.get("widths"), list) or \
            not all(isinstance(w, (int, float)) for w in curve["widths"]) or not 1 <= len(curve["widths"]) <= 2:
        raise ValueError(f"{where} must be an object with 'widths', a list of one or two numbers")
    _check_fields(where, curve, StaticCurve)


def _validate_routes(where: str, row: dict[str, Any]) -> None:
    routes = row.get("routes")
    if not isinstance(routes, list) or not routes:
        raise ValueError(f"{where}: a row of kind 'dynamic' needs 'routes', a list of objects")
    for j, route in enumerate(routes):
        at = f"{where}['routes'][{j}]"
        if not isinstance(route, dict):
            raise ValueError(f"{at} must be an object")
        _check_fields(at, route, Route)
        if (route["top1"] is None) != (route["images"] == 0):
            raise ValueError(f"{at}: top1 must be a number exactly when images went to the route")


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2) + "\n"


def rows_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV: the documented columns first, then any other key a row carries."""
    columns = list(CSV_COLUMNS) + [k for row in rows for k in row if k not in CSV_COLUMNS]
    columns = list(dict.fromkeys(columns))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row.get(k)) for k in columns})
    return out.getvalue()


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return value


def format_table(report: dict[str, Any]) -> str:
    """The report's rows as a terminal table, with a line saying what was measured and how."""
    latency = report["latency"]
    header = f"{'width':>8} {'top-1':>7} {'top-5':>7} {'loss':>7} {'params':>9} {'MAdds':>10}"
    if latency is not None:
        header += f" {'b1 ms':>8} {'b' + str(latency['batch_size']) + ' ms':>9}"
    table = report.get("latency_table")
    if table is not None:
        header += f" {'pred b' + str(table['batch_size']) + ' ms':>10}"
    lines = [header]
    for row in report["rows"]:
        line = (f"{row['label']:>8} {row['top1']:>7.2f} {row['top5']:>7.2f} {row['loss']:>7.4f} "
                f"{row['params'] / 1e6:>8.3f}M {row['madds'] / 1e6:>9.2f}M")
        if latency is not None:
            line += f" {row['latency_ms_b1']:>8.2f} {row['latency_ms_bN']:>9.2f}"
        if table is not None:
            line += f" {row['predicted_latency_ms']:>10.2f}"
        lines.append(line)
    for row in report["rows"]:
        if row.get("routes"):
            lines += ["", f"routes of the gate in {row['gate_block']} (layers before it at width "
                          f"{row['input_width']:g}):",
                      f"{'width':>8} {'images':>7} {'share':>7} {'top-1':>7} {'MAdds':>10}"]
            total = max(1, sum(r["images"] for r in row["routes"]))
            for r in row["routes"]:
                top1 = f"{r['top1']:>7.2f}" if r["top1"] is not None else f"{'-':>7}"
                lines.append(f"{r['width']:>8g} {r['images']:>7} {100 * r['images'] / total:>6.1f}% {top1} "
                             f"{r['madds'] / 1e6:>9.2f}M")
            curve = row.get("static_curve")
            if curve is not None:
                widths = " and ".join(f"{w:g}" for w in curve["widths"])
                if curve["top1"] is None:
                    lines.append(f"static width curve: {row['madds'] / 1e6:.2f}M MAdds is outside the uniform "
                                 f"widths' range (nearest: {widths})")
                else:
                    lines.append(f"static width curve at {row['madds'] / 1e6:.2f}M MAdds (uniform widths {widths}, "
                                 f"interpolated): top-1 {curve['top1']:.2f}; the gated network "
                                 f"{row['top1'] - curve['top1']:+.2f} points")
    about = (f"{Path(report['checkpoint']).name} ({report['weights']} weights) on {report['dataset']} "
             f"{report['split']}: {report['num_samples']} images at {report['img_size']}×{report['img_size']}")
    if latency is not None:
        measured = ("the gated network on validation images" if report["mode"] == "dynamic"
                    else "the dense subnet")
        about += (f"; latency of {measured} on {report['device']}, {report['threads']} "
                  f"thread{'s' if report['threads'] != 1 else ''}, "
                  f"median of {latency['repeats']}")
    return "\n".join(lines + [about])
