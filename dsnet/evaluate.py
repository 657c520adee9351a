"""`python eval.py`: accuracy, loss, size, MAdds and latency of a supernet checkpoint, one row per subnet.

Modes: ``sweep`` measures every width choice (or a ``--widths`` subset); ``static`` one subnet, a width choice
(``--width``) or a per-layer plan file (``--plan``); ``dynamic`` the gated network, which needs a checkpoint with a
gate. Accuracy and loss come from the supernet's forward at the row's width (equal to the exported dense subnet to
1e-5); latency is measured on the exported dense subnet, which is what a user deploys. In dynamic mode every figure
is the gated network's own: each image runs at the route its gate picks (no noise), sliced, and latency is measured
on validation images. Dynamic mode also measures the uniform widths of the same supernet whose MAdds bracket the gated
network's mean MAdds, and reports their top-1 linearly interpolated at that MAdds: the static width curve the gated
network should lie above (``--no-static-curve`` skips them).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm import tqdm

from . import report as schema
from .bn_slots import calibrate_routes, recalibrate_bn
from .cli import NON_NEGATIVE_INT, POSITIVE_INT, ArgumentParser
from .errors import UserError
from .files import write_text_atomic
from .cli_inputs import (add_checkpoint_args, add_device_arg, check_output_path, open_checkpoint, resolve_device,
                         training_data_options)
from .cpu_memory import keep_freed_memory, return_freed_memory
from .data import DATASETS, build_dataset, build_loader, calibration_batches, num_classes_of
from .export import export_subnet
from .gate import GatedDSNet
from .latency import LatencyTable, read_table_for
from .madds import count_madds, count_params
from .metrics import batch_sums, metric_sums, summarize
from .plans import load_plan
from .report import Latency, Report, format_table, report_json, rows_csv, validate_report
from .supernet import SlimNetwork
from .widths import WidthPlan
from .timing import median_seconds, reserve_kernel_cache, torch_threads

DEFAULT_RECALIBRATION_BATCHES = 8
MODES = ("sweep", "static", "dynamic")

# ---- measuring ----------------------------------------------------------------------------------------------------


@dataclass
class LatencyOptions:
    batch_size: int = 32
    repeats: int = 10
    warmup: int = 3


def evaluate_accuracy(forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: torch.device,
                      progress: tqdm | None = None) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) and mean cross-entropy of `forward` over every batch of `loader`."""
    figures = summarize(metric_sums(lambda images, targets: batch_sums(forward(images), targets), loader, device,
                                     progress=progress))
    return {key: figures[key] for key in ("top1", "top5", "loss")}


def measure_latency_ms(module: torch.nn.Module, input_shape: tuple[int, ...], device: torch.device,
                       repeats: int, warmup: int) -> float:
    """Median wall time in milliseconds of one forward of `module` on a batch of `input_shape`, after warm-up."""
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    return median_seconds([lambda: module(x)], repeats, warmup, device)[0] * 1e3


def subnet_label(model: SlimNetwork, plan: WidthPlan) -> str:
    """A row's label: the width choice as a report prints it ("0.35", "1"), or "plan"."""
    return f"{model.widths[plan.choice]:g}" if plan.choice is not None else "plan"


def subnet_row(model: SlimNetwork, plan: WidthPlan, loader: Iterable, device: torch.device, img_size: int, *,
               label: str | None = None, calibration: list | None = None, latency: LatencyOptions | None = None,
               progress: tqdm | None = None) -> dict[str, Any]:
    """Measure the supernet at one width: a report row.

    With `calibration` (a list of training batches) the width's BN statistics are re-estimated first; only its
    statistics slot changes. Latency (when `latency` is given) is that of the exported dense subnet.
    """
    recalibrated = recalibrate_bn(model, plan, calibration) if calibration else 0
    model.eval()
    row: dict[str, Any] = {"kind": "width" if plan.choice is not None else "plan",
                           "label": label or subnet_label(model, plan),
                           "width": model.widths[plan.choice] if plan.choice is not None else None}
    if plan.choice is None:
        row["plan"] = plan.as_dict()
    row.update(evaluate_accuracy(lambda x: model(x, plan), loader, device, progress))
    row["params"] = count_params(model, plan)
    row["madds"] = count_madds(model, plan, img_size)
    row["latency_ms_b1"] = row["latency_ms_bN"] = None
    if latency is not None:
        dense = export_subnet(model, plan).to(device)
        shape = (model.config.in_chans, img_size, img_size)
        row["latency_ms_b1"] = measure_latency_ms(dense, (1, *shape), device, latency.repeats, latency.warmup)
        row["latency_ms_bN"] = measure_latency_ms(dense, (latency.batch_size, *shape), device, latency.repeats,
                                                  latency.warmup)
    row["bn_recalibration_batches"] = recalibrated
    return row


def measure_dynamic_latency_ms(gated: GatedDSNet, images: torch.Tensor, batch_size: int, device: torch.device,
                               repeats: int, warmup: int) -> float:
    """Median wall time in milliseconds of the gated network on `batch_size` real images, after warm-up.

    Each run takes the next `batch_size` of `images` (cycling), so the runs see the routes those images take.
    """
    images = images.to(device)
    while len(images) < batch_size:
        images = torch.cat([images, images])
    batches = iter([images[start:start + batch_size] for start in
                    ((i * batch_size) % (len(images) - batch_size + 1) for i in range(warmup + repeats))])
    return median_seconds([lambda: gated(next(batches))], repeats, warmup, device)[0] * 1e3


def dynamic_row(gated: GatedDSNet, loader: Iterable, device: torch.device, img_size: int, *,
                calibration: list | None = None, latency: LatencyOptions | None = None,
                progress: tqdm | None = None) -> dict[str, Any]:
    """Measure the gated network: a report row of kind "dynamic", with a breakdown per route.

    With `calibration` (a list of training batches) the BN statistics of every route are re-estimated first.
    """
    num_routes = len(gated.route_plans)
    recalibrated = calibrate_routes(gated, calibration, routes=range(num_routes)) if calibration else 0
    gated.eval()
    kept = []  # validation images for the latency runs

    def forward(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, info = gated(images, return_info=True)
        if latency is not None and sum(len(x) for x in kept) < latency.batch_size + latency.repeats:
            kept.append(images.cpu())
        per_route = batch_sums(logits, targets, groups=info.routes, num_groups=num_routes)
        madds = torch.zeros(num_routes, 1, dtype=torch.float64).index_add_(0, info.routes.cpu(),
                                                                            info.madds.double().cpu()[:, None])
        return torch.cat([per_route, madds], dim=1)  # one row per route: top-1, top-5, loss, images, MAdds sums

    sums = metric_sums(forward, loader, device, progress=progress)
    correct1, images_per_route = sums[:, 0].long(), sums[:, 3].long()
    count = int(images_per_route.sum())
    figures = summarize(sums.sum(0))
    route_madds = gated.route_madds(img_size)
    row: dict[str, Any] = {
        "kind": "dynamic", "label": "dynamic", "width": None,
        "top1": figures["top1"], "top5": figures["top5"], "loss": figures["loss"], "params": gated.num_params(),
        "madds": round(int(sums[:, 4].sum()) / count),
        "latency_ms_b1": None, "latency_ms_bN": None, "bn_recalibration_batches": recalibrated,
        "gate_block": gated.config.block, "input_width": gated.config.input_width,
        "routes": [{"width": w, "madds": int(route_madds[r]), "images": int(images_per_route[r]),
                    "top1": 100.0 * int(correct1[r]) / int(images_per_route[r]) if images_per_route[r] else None}
                   for r, w in enumerate(gated.route_widths)],
    }
    if latency is not None:
        kept_images = torch.cat(kept)
        row["latency_ms_b1"] = measure_dynamic_latency_ms(gated, kept_images, 1, device, latency.repeats,
                                                          latency.warmup)
        row["latency_ms_bN"] = measure_dynamic_latency_ms(gated, kept_images, latency.batch_size, device,
                                                          latency.repeats, latency.warmup)
    return row


def static_curve_neighbours(model: SlimNetwork, madds: float, img_size: int) -> list[WidthPlan]:
    """The uniform widths whose MAdds bracket `madds`: the two neighbours, or one where `madds` equals a width's
    MAdds or lies outside the widths' range."""
    costs = [count_madds(model, plan, img_size) for plan in model.choice_plans]
    cheapest_first = sorted(range(len(costs)), key=costs.__getitem__)
    below = [i for i in cheapest_first if costs[i] <= madds][-1:]
    above = [i for i in cheapest_first if costs[i] >= madds][:1]
    return [model.choice_plans[i] for i in sorted({*below, *above}, key=costs.__getitem__)]


def static_curve(madds: float, width_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Top-1 of the uniform-width curve at `madds`, linearly interpolated between the rows of its neighbours."""
    top1 = None
    if len(width_rows) == 2:
        low, high = width_rows
        share = (madds - low["madds"]) / (high["madds"] - low["madds"])
        top1 = low["top1"] + share * (high["top1"] - low["top1"])
    elif len(width_rows) == 1 and width_rows[0]["madds"] == madds:
        top1 = width_rows[0]["top1"]
    return {"widths": [row["width"] for row in width_rows], "top1": top1}


# ---- command line -------------------------------------------------------------------------------------------------

EXAMPLES = """\
examples:
  python eval.py --mode sweep --checkpoint output/run/checkpoint.pth --json sweep.json --plot sweep.png
  python eval.py --mode sweep --checkpoint ckpt.pth --widths 0.35 1.0 --no-latency --csv sweep.csv
  python eval.py --mode static --checkpoint ckpt.pth --width 0.5
  python eval.py --mode static --checkpoint ckpt.pth --plan plan.json --recalibrate-bn 16
  python eval.py --mode dynamic --checkpoint runs/gate-digits/best.pth --json dynamic.json
"""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python eval.py", description=f"{__doc__}\n{schema.__doc__}", epilog=EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, default="sweep",
                        help="sweep: every width choice; static: one subnet (--width or --plan); dynamic: the gated "
                             "network (needs a checkpoint with a gate). Default: sweep")
    add_checkpoint_args(parser)
    which = parser.add_argument_group("widths")
    which.add_argument("--widths", type=float, nargs="+", metavar="W",
                       help="sweep: only these width choices (multipliers, e.g. 0.35 1.0)")
    which.add_argument("--width", type=float, metavar="W", help="static: the width choice to evaluate")
    which.add_argument("--plan", metavar="FILE",
                       help="static: per-layer channels from a plan file (JSON or YAML); a plan whose BN statistics "
                            f"the checkpoint lacks is recalibrated first ({DEFAULT_RECALIBRATION_BATCHES} batches "
                            "unless --recalibrate-bn says)")
    which.add_argument("--no-static-curve", action="store_true",
                       help="dynamic: do not measure the uniform widths that bracket the gated network's mean MAdds "
                            "(by default their rows follow, and the dynamic row holds their top-1 interpolated at "
                            "that MAdds)")
    which.add_argument("--recalibrate-bn", type=POSITIVE_INT, metavar="N",
                       help="before measuring each width, reset its BN statistics and re-estimate them on N training "
                            "batches of --batch-size images (in memory; the checkpoint is not changed)")
    data = parser.add_argument_group("data (default: the dataset and transforms recorded in the checkpoint)")
    data.add_argument("--data", choices=DATASETS, help="dataset whose val split is evaluated")
    data.add_argument("--data-dir", metavar="DIR", help="dataset root directory")
    data.add_argument("--batch-size", type=POSITIVE_INT, default=128, help="evaluation batch size (default: 128)")
    data.add_argument("--workers", type=NON_NEGATIVE_INT, default=0, help="data-loading processes (default: 0)")
    timing = parser.add_argument_group(
        "latency (of the exported dense subnet of each width: a plain torch.nn network, what a user deploys)")
    timing.add_argument("--no-latency", action="store_true", help="do not measure latency")
    timing.add_argument("--lut", metavar="LUT.json",
                        help="a latency table of this supernet (python -m dsnet.latency): every row also gets its "
                             "predicted latency at the table's batch size")
    timing.add_argument("--latency-batch-size", type=POSITIVE_INT, default=32, metavar="N",
                        help="the second latency batch size, besides 1 (default: 32)")
    timing.add_argument("--latency-repeats", type=POSITIVE_INT, default=10, metavar="R",
                        help="timed runs per figure; the median is reported (default: 10)")
    timing.add_argument("--latency-warmup", type=NON_NEGATIVE_INT, default=3, metavar="R",
                        help="untimed runs before timing (default: 3)")
    timing.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="as train.py: glibc's malloc keeps the memory a forward frees for the next one, so a "
                             "timed run does not page-fault fresh memory for its activations (default: on)")
    timing.add_argument("--threads", type=POSITIVE_INT, default=2,
                        help="CPU threads for the whole evaluation, torch.set_num_threads (default: 2)")
    add_device_arg(timing, "evaluate")
    out = parser.add_argument_group("reports (the table is always printed)")
    out.add_argument("--json", metavar="FILE", help="write the report as JSON (keys above)")
    out.add_argument("--csv", metavar="FILE", help="write the rows as CSV")
    out.add_argument("--plot", metavar="FILE", help="write a PNG of top-1 accuracy against MAdds (640×480)")
    out.add_argument("--log-madds", action="store_true", help="plot MAdds on a logarithmic axis")
    out.add_argument("--reference", metavar="FILE",
                     help="CSV of reference points to plot, columns label,madds,top1 (absolute MAdds, top-1 in %%)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Combinations of flags that make no sense, caught before anything is loaded."""
    if args.mode == "static" and (args.width is None) == (args.plan is None):
        raise UserError("--mode static needs exactly one of --width W or --plan FILE")
    if args.mode != "static" and (args.width is not None or args.plan is not None):
        raise UserError(f"--width and --plan are for --mode static, not --mode {args.mode}")
    if args.mode != "sweep" and args.widths:
        raise UserError(f"--widths is for --mode sweep, not --mode {args.mode}")
    if args.mode != "dynamic" and args.no_static_curve:
        raise UserError(f"--no-static-curve is for --mode dynamic, not --mode {args.mode}")
    if args.plot is None and (args.log_madds or args.reference):
        raise UserError("--log-madds and --reference change the plot; give --plot FILE too")
    for flag in ("json", "csv", "plot"):
        path = getattr(args, flag)
        if path is not None:
            check_output_path(path, f"--{flag}")


def choice_plan(model: SlimNetwork, width: float) -> WidthPlan:
    index = model.choice_index(width)
    if index is None:
        choices = ", ".join(f"{w:g}" for w in model.widths)
        raise UserError(f"width {width:g} is not a width choice of this checkpoint; choices: {choices}")
    return model.choice_plans[index]


def subnets_to_measure(args: argparse.Namespace, model: SlimNetwork) -> list[tuple[WidthPlan, str | None]]:
    """(plan, label) of every row, in order."""
    if args.mode == "sweep":
        if args.widths:
            return [(choice_plan(model, w), None) for w in args.widths]
        return [(plan, None) for plan in model.choice_plans]
    if args.width is not None:
        return [(choice_plan(model, args.width), None)]
    plan = load_plan(model, args.plan)
    return [(plan, Path(args.plan).stem if plan.choice is None else None)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    reference = None
    if args.reference:
        from .plot import read_reference_csv
        reference = read_reference_csv(args.reference)
    device = resolve_device(args.device)
    if args.keep_freed_memory:
        freed_memory_kept = keep_freed_memory()  # False where the C library is not glibc
    else:
        return_freed_memory()
        freed_memory_kept = False
    reserve_kernel_cache()
    with torch_threads(args.threads):
        report = evaluate_checkpoint(args, device, freed_memory_kept)
    print(format_table(report))
    if args.json:
        write_text_atomic(args.json, report_json(report))
    if args.csv:
        write_text_atomic(args.csv, rows_csv(report["rows"]))
    if args.plot:
        from .plot import plot_report
        plot_report(report, args.plot, log_madds=args.log_madds, reference=reference)
    return 0


def evaluate_checkpoint(args: argparse.Namespace, device: torch.device, freed_memory_kept: bool) -> dict[str, Any]:
    """Everything between the parsed arguments and the finished report."""
    checkpoint, network, weights = open_checkpoint(args.checkpoint, args.weights, gated=args.mode == "dynamic")
    model = network.supernet if isinstance(network, GatedDSNet) else network
    subnets = subnets_to_measure(args, model) if args.mode != "dynamic" else []
    opts = training_data_options(checkpoint, model, args.data, args.data_dir)
    dataset = build_dataset(opts, train=False)
    classes = num_classes_of(dataset)
    if classes != model.config.num_classes:
        raise UserError(f"checkpoint has {model.config.num_classes} classes but dataset {opts.data!r} has {classes}")
    loader = build_loader(dataset, args.batch_size, train=False, workers=args.workers)

    calibration_size = args.recalibrate_bn
    if calibration_size is None and any(not model.has_bn_statistics(plan) for plan, _ in subnets):
        calibration_size = DEFAULT_RECALIBRATION_BATCHES
        print(f"the checkpoint has no BN statistics for plan {args.plan!r}; recalibrating them on "
              f"{calibration_size} training batches (set the number with --recalibrate-bn N)", file=sys.stderr)
    calibration = calibration_batches(opts, calibration_size, args.batch_size) if calibration_size else None

    network.to(device)
    latency = None if args.no_latency else LatencyOptions(args.latency_batch_size, args.latency_repeats,
                                                          args.latency_warmup)
    rows = []
    with tqdm(total=len(loader) * max(1, len(subnets)), desc="evaluating", unit="batch", file=sys.stderr,
              leave=False, disable=args.no_progress) as progress:
        if isinstance(network, GatedDSNet):
            dynamic = dynamic_row(network, loader, device, opts.img_size, calibration=calibration, latency=latency,
                                  progress=progress)
            rows.append(dynamic)
            if not args.no_static_curve:
                neighbours = static_curve_neighbours(model, dynamic["madds"], opts.img_size)
                progress.total += len(loader) * len(neighbours)
                curve_rows = [subnet_row(model, plan, loader, device, opts.img_size, calibration=calibration,
                                         latency=latency, progress=progress) for plan in neighbours]
                dynamic["static_curve"] = static_curve(dynamic["madds"], curve_rows)
                rows += curve_rows
        for plan, label in subnets:
            progress.set_description(f"width {label or subnet_label(model, plan)}")
            rows.append(subnet_row(model, plan, loader, device, opts.img_size, label=label, calibration=calibration,
                                   latency=latency, progress=progress))
    report = asdict(Report(
        checkpoint=str(args.checkpoint), mode=args.mode, weights=weights, dataset=opts.data, data_dir=opts.data_dir,
        num_samples=len(dataset), img_size=opts.img_size, num_classes=classes, device=str(device),
        threads=args.threads, rows=rows,
        latency=None if latency is None else Latency(batch_size=latency.batch_size, repeats=latency.repeats,
                                                     warmup=latency.warmup, freed_memory_kept=freed_memory_kept)))
    if args.lut:
        add_predicted_latency(report, read_table_for(args.lut, model, opts.img_size), network, args.lut)
    validate_report(report)
    return report


def add_predicted_latency(report: dict[str, Any], table: LatencyTable, network: SlimNetwork | GatedDSNet,
                          source: str) -> None:
    """Each row's predicted latency in milliseconds; a dynamic row's is the mean of its images' routes'."""
    model = network.supernet if isinstance(network, GatedDSNet) else network
    d = table.data
    report["latency_table"] = {"file": source, "batch_size": d["batch_size"], "runtime": d["runtime"],
                               "device": d["device"], "threads": d["threads"]}
    for row in report["rows"]:
        if row["kind"] == "dynamic":
            routes = [table.predict(plan) for plan in network.route_plans]
            images = [r["images"] for r in row["routes"]]
            seconds = sum(s * n for s, n in zip(routes, images)) / max(1, sum(images))
        else:
            seconds = table.predict(model.resolve_width(row["plan"] if row["kind"] == "plan" else row["width"]))
        row["predicted_latency_ms"] = seconds * 1e3
