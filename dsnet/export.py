"""Dense subnet extraction: any width of the supernet as a plain `torch.nn` network.

The dense network is built of standard layers only (plus `Residual`, a `nn.Sequential` that adds its input, and
timm's ResNet blocks), with timm's module names, so its state dict loads into timm's `mobilenetv2_*` model of the same
width, or timm's `resnet18/34/50` at width 1.0, as it is.

`python -m dsnet.export` writes one width of a checkpoint's supernet as a `torch.export` program, TorchScript, ONNX, a
timm state dict or a pickled module, then reloads the file and checks its output against the supernet's. Without a
width it writes the whole gated network of a stage-II checkpoint, routing inside (`dense_gated.py`). In the files
that are run as they are, each BatchNorm is folded into the convolution before it, as deployment tools do, unless
`--keep-bn`.
"""
from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .bn_slots import recalibrate_bn
from .cli import NON_NEGATIVE_INT, POSITIVE_INT, ArgumentParser, Number, run_main
from .errors import UserError
from .files import atomic_directory, atomic_path, check_new_directory
from .cli_inputs import (add_checkpoint_args, add_data_args, check_output_path, input_size, open_checkpoint,
                         training_data_options)
from .data import calibration_batches
from .dense_gated import (export_gated, fold_gated, load_torch_export, run_onnx_routes, save_torch_export,
                          write_onnx_routes)
from .gate import GatedDSNet
from .madds import count_madds, count_params
from .plans import load_plan
from .supernet import SlimNetwork
from .widths import WidthPlan


class Residual(nn.Sequential):
    """A dense sequence of layers whose output is added to its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self:
            out = layer(out)
        return x + out


@torch.no_grad()
def export_subnet(model: nn.Module, width: Any = None) -> nn.Sequential:
    """Copy the sliced weights and BN statistics of `width` into a dense `nn.Sequential`, in eval mode."""
    plan = model.resolve_width(width)
    was_training = model.training
    model.eval()
    try:
        slot = model.stats_slot(plan)
    finally:
        model.train(was_training)
    return nn.Sequential(model.export_layers(plan, slot)).eval()


def fold_batch_norms(dense: nn.Module) -> nn.Module:
    """A copy of `dense` (in eval mode) with each BatchNorm folded into the convolution before it: torch.fx's
    conv-BN fusion, the same function of the input with one layer fewer per pair. The folded weights are computed in
    float64 and rounded once, so the folded network stays as close to the unfolded one as two float32 runs are."""
    from torch.fx.experimental.optimization import fuse

    dtype = next(dense.parameters()).dtype
    return fuse(copy.deepcopy(dense).eval().double()).to(dtype)


# ---- command line: python -m dsnet.export -----------------------------------------------------------------------

FORMATS = ("export", "torchscript", "onnx", "timm", "pt")
FOLDED = ("export", "torchscript", "onnx")  # the formats whose files are run as they are, and so fold BN by default
TOLERANCES = {"export": 1e-5, "torchscript": 1e-5, "pt": 1e-5, "timm": 1e-5, "onnx": 1e-4}
DEFAULT_OPSET = 17
ONNX_OPSETS = (7, 20)  # the opsets torch.onnx.export(dynamo=False) writes
EXAMPLE_BATCH = 2  # torch.export takes a batch of 1 for a constant
PT_WARNING = ("warning: a pt file is a pickle, and loading it (torch.load(..., weights_only=False)) runs the code "
              "it holds: load only files you wrote; share export, torchscript or onnx")
CHECK_BATCH = 3  # differs from the traced batch, so the check also proves the batch axis is dynamic


def resolve_export_width(model: SlimNetwork, width: float | None, plan_file: str | None) -> WidthPlan:
    if plan_file is not None:
        return load_plan(model, plan_file)
    choice = model.choice_index(width)
    if choice is None:
        raise UserError(f"width {width} is not one of the checkpoint's width choices {list(model.widths)}")
    return model.choice_plans[choice]


def timm_model_name(model: SlimNetwork, plan: WidthPlan) -> str:
    """The timm model whose state dict the dense subnet of `plan` is, or UserError saying why there is none."""
    if plan.choice is None:
        raise UserError("the timm format needs a uniform width; this plan is not one of the checkpoint's width "
                        f"choices {list(model.widths)}")
    width = model.widths[plan.choice]
    if model.config.in_chans != 3:
        raise UserError(f"the timm format needs 3 input channels; this supernet takes {model.config.in_chans}")
    if model.trunk_width is not None and abs(model.trunk_width - width) > 1e-6:
        raise UserError(f"timm's models have one width in every layer; width {width:g} of this gate-aware "
                        f"supernet runs the layers before {model.config.slim_from} at {model.trunk_width:g}")
    try:
        return model.timm_name(width)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def prepare_bn_statistics(model: SlimNetwork, plan: WidthPlan, state: dict[str, Any], num_batches: int,
                          batch_size: int, data: str | None, data_dir: str | None) -> str:
    """Make the statistics `plan` runs with ready for export; returns a line saying where they come from."""
    if num_batches:
        options = training_data_options(state, model, data, data_dir)
        used = recalibrate_bn(model, plan, calibration_batches(options, num_batches, batch_size=batch_size))
        return f"BN statistics recalibrated on {used} batches of {batch_size} {options.data} training images"
    if plan.choice is not None:
        return f"BN statistics of width choice {model.widths[plan.choice]}"
    if model.has_bn_statistics(plan):
        return "BN statistics of this plan, calibrated in the checkpoint"
    raise UserError("this plan is not a width choice and the checkpoint holds no BN statistics for it; "
                    "pass --recalibrate-bn N to recalibrate them on N training batches")


def write_export(fmt: str, dense: nn.Module, example: torch.Tensor, path: Path, opset: int,
                 keep_bn: bool = False) -> None:
    if fmt == "export":
        save_torch_export(dense, example, path)
    elif fmt == "torchscript":
        torch.jit.save(torch.jit.trace(dense, example), str(path))
    elif fmt == "onnx":
        # torch.onnx folds an eval-mode BatchNorm into its convolution by itself; PRESERVE exports it as it is.
        mode = torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL
        torch.onnx.export(dense, (example,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          training=mode)
    elif fmt == "timm":
        torch.save(dense.state_dict(), path)
    else:
        torch.save(dense, path)


def load_export(fmt: str, path: Path, timm_name: str | None = None, num_classes: int = 0):
    """Load a written export the way its user would: a function of an input batch to its logits."""
    if fmt == "export":
        network = load_torch_export(path)
    elif fmt == "torchscript":
        network = torch.jit.load(str(path))
    elif fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise UserError("checking an ONNX export needs onnxruntime (pip install onnxruntime)") from None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])
    elif fmt == "timm":
        import timm

        network = timm.create_model(timm_name, num_classes=num_classes, pretrained=False)
        network.load_state_dict(torch.load(path, weights_only=True), strict=True)
        network.eval()
    else:
        network = torch.load(path, weights_only=False).eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return network(x)

    return run


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m dsnet.export",
        description="Export one width of a trained supernet as a dense network (a torch.export program, "
                    "TorchScript, ONNX, a timm state dict, or a pickled torch.nn module), or, given "
                    "neither --width nor --plan, the whole gated network of a gate checkpoint with its routing "
                    "inside. Then reload the written file and check its output against the checkpoint's network.")
    add_checkpoint_args(parser)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--width", type=float, metavar="W",
                       help="a uniform width multiplier, one of the checkpoint's width choices (neither this nor "
                            "--plan: the gated network)")
    which.add_argument("--plan", metavar="FILE",
                       help="JSON or YAML file of channels per layer group (as python -m dsnet.search writes)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="export: a torch.export program (.pt2) for torch.export.load(PATH).module(); "
                             "torchscript: a module for torch.jit.load; onnx: an ONNX graph with input 'input' and "
                             "output 'logits', batch axis dynamic (the gated network: a directory of graphs, see "
                             "docs/export.md); timm: a state dict for timm's mobilenetv2_* of the same width "
                             "or its resnet18/34/50 at width 1.0 (uniform widths of an ImageNet-layout supernet only); pt: the torch.nn module saved "
                             "with torch.save (loading it needs dsnet). The gated network's torch formats return "
                             "(logits, routes)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="output file (the gated network as onnx: a new directory); its parent must exist")
    parser.add_argument("--keep-bn", action="store_true",
                        help="export, torchscript, onnx: keep each BatchNorm as a layer of its own (default: folded "
                             "into the convolution before it)")
    parser.add_argument("--recalibrate-bn", type=NON_NEGATIVE_INT, default=0, metavar="N",
                        help="re-estimate the BN statistics of the width on N training batches first; needed for a "
                             "plan that is not a width choice unless the checkpoint already holds its statistics "
                             "(default 0: none)")
    add_data_args(parser)
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=64, metavar="N",
                        help="batch size of the BN recalibration batches (default 64)")
    parser.add_argument("--opset", type=Number(int, *ONNX_OPSETS), default=DEFAULT_OPSET, metavar="N",
                        help=f"ONNX opset version, {ONNX_OPSETS[0]} to {ONNX_OPSETS[1]} (default {DEFAULT_OPSET})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.width is None and args.plan is None:
        return export_gated_network(args)
    check_output_path(args.out)

    state, model, weights = open_checkpoint(args.checkpoint, args.weights)
    plan = resolve_export_width(model, args.width, args.plan)
    timm_name = timm_model_name(model, plan) if args.format == "timm" else None
    print(f"width: {_describe(model, plan)}, {weights} weights")
    print(prepare_bn_statistics(model, plan, state, args.recalibrate_bn, args.batch_size, args.data, args.data_dir))
    img_size = input_size(state, model)
    print(f"params {count_params(model, plan) / 1e6:.3f}M, MAdds {count_madds(model, plan, img_size) / 1e6:.2f}M "
          f"at {img_size}×{img_size}")

    dense = export_subnet(model, plan)
    if args.format in FOLDED and not args.keep_bn:
        dense = fold_batch_norms(dense)
        print("BatchNorm folded into the convolutions (--keep-bn keeps it)")
    generator = torch.Generator().manual_seed(0)
    shape = (model.config.in_chans, img_size, img_size)
    example = torch.randn(EXAMPLE_BATCH, *shape, generator=generator)
    x = torch.randn(CHECK_BATCH, *shape, generator=generator)
    with torch.no_grad():
        expected = model(x, plan)
    # Relative to the logits' scale past 1: a folded network rounds differently in float32, by about 1e-6 of
    # the largest logit, which an absolute 1e-5 would refuse for a trained network's logits of 10 and more.
    tolerance = TOLERANCES[args.format] * max(1.0, expected.abs().max().item())
    with atomic_path(args.out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing and the TorchScript-based ONNX exporter warn of their deprecation
        write_export(args.format, dense, example, tmp, args.opset, keep_bn=args.keep_bn)
        diff = (load_export(args.format, tmp, timm_name, model.config.num_classes)(x) - expected).abs().max().item()
        refuse_unless_close(args.format, diff, tolerance, "the supernet")
    report_written(args.out, args.format)
    print(f"check: reloaded file vs supernet on {CHECK_BATCH} random inputs: max abs diff {diff:.3g} "
          f"(tolerance {tolerance:.3g})")
    if timm_name is not None:
        print(f"timm model: {timm_name} — timm.create_model({timm_name!r}, num_classes={model.config.num_classes})"
              f".load_state_dict(torch.load({args.out!r}))")
    return 0


def refuse_unless_close(fmt: str, diff: float, tolerance: float, reference: str) -> None:
    """Raised inside the atomic write, the error removes the file: a failed check leaves nothing behind."""
    if not diff <= tolerance:
        raise UserError(f"the reloaded {fmt} export differs from {reference} by {diff:.3g} (tolerance "
                        f"{tolerance:.3g}); nothing written")


def report_written(out: str, fmt: str, detail: str = "") -> None:
    print(f"wrote {out} ({fmt}{detail})")
    if fmt == "pt":
        print(PT_WARNING, file=sys.stderr)


GATED_FORMATS = ("export", "torchscript", "onnx", "pt")


def export_gated_network(args) -> int:
    """The gated network of a gate checkpoint as one file (a directory of graphs for ONNX), checked on reload: the
    same logits and the same route for every input, at batch 1 and on a batch."""
    if args.format not in GATED_FORMATS:
        raise UserError(f"a gated network has no {args.format} form: choose --format {', '.join(GATED_FORMATS)}, "
                        "or export one width of its supernet with --width W")
    if args.recalibrate_bn:
        raise UserError("--recalibrate-bn recalibrates one width; the gated network exports with the routes' "
                        "statistics its checkpoint holds")
    onnx_directory = args.format == "onnx"
    check_new_directory(args.out) if onnx_directory else check_output_path(args.out)
    state, gated, weights = open_checkpoint(args.checkpoint, args.weights, gated=None)
    if not isinstance(gated, GatedDSNet):
        raise UserError(f"{args.checkpoint!r} is a supernet checkpoint without a gate: pass --width W or --plan FILE "
                        "to export one width, or give a checkpoint of python train.py --stage gate")
    net, config = gated.supernet, gated.config
    img_size = input_size(state, net)
    madds = gated.route_madds(img_size).tolist()
    print(f"gated network: gate in {config.block}, layers before it at width {config.input_width:g}, {weights} "
          "weights")
    print("routes: " + ", ".join(f"{w:g} ({m / 1e6:.2f}M MAdds)" for w, m in zip(gated.route_widths, madds))
          + f" at {img_size}×{img_size}")
    try:
        dense = export_gated(gated)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.format in FOLDED and not args.keep_bn:
        dense = fold_gated(dense, fold_batch_norms)
        print("BatchNorm folded into the convolutions (--keep-bn keeps it)")
    generator = torch.Generator().manual_seed(0)
    shape = (net.config.in_chans, img_size, img_size)
    example = torch.randn(EXAMPLE_BATCH, *shape, generator=generator)
    batches = [torch.randn(1, *shape, generator=generator), torch.randn(CHECK_BATCH, *shape, generator=generator)]
    with torch.no_grad():
        expected = [gated(x, return_info=True) for x in batches]
    scale = max([1.0] + [logits.abs().max().item() for logits, _ in expected])
    tolerance = TOLERANCES[args.format] * scale
    routes_meta = [{"width": w, "madds": int(m)} for w, m in zip(gated.route_widths, madds)]
    writing = atomic_directory(args.out) if onnx_directory else atomic_path(args.out)
    with writing as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.format == "export":
            save_torch_export(dense, example, tmp)
        elif args.format == "torchscript":
            torch.jit.save(torch.jit.script(dense), str(tmp))
        elif args.format == "onnx":
            write_onnx_routes(dense, example, tmp, args.opset, routes_meta)
        else:
            torch.save(dense, tmp)
        diff, reloaded = 0.0, load_gated_export(args.format, tmp)
        for x, (logits, info) in zip(batches, expected):
            got, routes = reloaded(x)
            if not torch.equal(routes.long(), info.routes):
                raise UserError(f"the reloaded {args.format} export routes inputs differently from the gated network "
                                f"({routes.tolist()} against {info.routes.tolist()}); nothing written")
            diff = max(diff, (got - logits).abs().max().item())
        refuse_unless_close(args.format, diff, tolerance, "the gated network")
    report_written(args.out, args.format, ", a directory: manifest.json names its graphs" if onnx_directory else "")
    print(f"check: reloaded export vs gated network at batch 1 and {CHECK_BATCH}: same routes, max abs diff "
          f"{diff:.3g} (tolerance {tolerance:.3g})")
    return 0


def load_gated_export(fmt: str, path: Path):
    """Load a written gated export the way its user would: a function of an input batch to (logits, routes)."""
    if fmt == "onnx":
        return lambda x: tuple(torch.from_numpy(a) for a in run_onnx_routes(path, x.numpy()))
    return load_export(fmt, path)  # the torch formats load as one width's do


def _describe(model: SlimNetwork, plan: WidthPlan) -> str:
    if plan.choice is not None:
        return f"{model.widths[plan.choice]} (width choice {plan.choice})"
    narrowed = [f"{name} {c}" for name, c, m in zip(plan.names, plan.channels, model.max_channels) if c != m]
    return f"plan (not a width choice): the largest width with {', '.join(narrowed)}"


if __name__ == "__main__":
    # Run the package's copy of this module, so that a pickled network refers to dsnet.export.Residual rather
    # than to a class of __main__ that no other program has.
    from dsnet.export import main as package_main

    run_main(package_main)
