"""`python -m dsnet.prune`: a static pruning mode from the literature, ending in a dense subnet and a report."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..cli import (FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, ArgumentParser,
                   parse_args_with_config, run_main)
from ..errors import UserError
from ..files import atomic_path, write_text_atomic
from ..archs import ARCHS
from ..cli_inputs import (add_data_args, add_device_arg, input_size, open_checkpoint, resolve_device,
                          training_data_options)
from ..cpu_memory import keep_freed_memory
from ..data import build_dataset, build_loader, build_transform, calibration_batches, num_classes_of
from ..latency import check_latency_budget, format_ms, parse_latency, read_table_for
from ..madds import count_madds, count_params
from ..plans import write_plan_file
from ..search import narrowest_plan, parse_madds_target
from ..supernet import SlimNetwork
from ..timm_import import supernet_from_timm
from .base import PruneSettings
from .methods import METHODS
from .pipeline import prune_supernet


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m dsnet.prune",
        description="Static pruning by a published method, of a trained supernet (--checkpoint) or of an ordinary "
                    "timm network (--from-timm): on a copy of the largest width, "
                    "score the channels of every coupled group (with the method's training-time regularizer), "
                    "permute each group so its best channels come first, choose per-group widths (the method's own "
                    "rule, or the cut that meets --target-madds), slice, recalibrate BN, optionally fine-tune, and "
                    "write the dense subnet, its plan, the scores and a report into --out.")
    parser.add_argument("-c", "--config", metavar="YAML",
                        help="settings from a YAML file (configs/prune/*.yaml), keyed by the long option names below "
                             "(method, epochs, finetune_epochs, ...); flags on the command line override them")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="CKPT", help="dsnet checkpoint (.pth) holding the trained supernet")
    source.add_argument("--from-timm", metavar="FILE",
                        help="instead: a timm network's state dict (mobilenetv2_*, resnet18/34/50; read weights-only) "
                             "or its name where a model hub can be reached; needs --data")
    parser.add_argument("--weights", choices=("ema", "model"),
                        help="which weights of the checkpoint to use (default: ema when it has EMA weights, else "
                             "model)")
    parser.add_argument("--arch", choices=tuple(ARCHS),
                        help="with --from-timm: the architecture the weights must be (default: the one they are)")
    parser.add_argument("--img-size", type=POSITIVE_INT, metavar="S",
                        help="with --from-timm: the input size (default 224)")
    parser.add_argument("--method", required=True, choices=METHODS,
                        help="l1: Distiller's L1 ranking with AGP; bn-scale: Network Slimming; polarization: the "
                             "Polarization regularizer; taylor: Gate Decorator's Taylor scores with tick-tock; dcp: "
                             "Discrimination-aware Channel Pruning")
    parser.add_argument("--target-madds", metavar="M",
                        help="MAdds budget per image: an absolute count (150M, 1.2e8) or, for a value ≤ 1, a "
                             "fraction of the largest width's MAdds (0.5); default: the method's own rule with --sparsity")
    parser.add_argument("--target-latency", metavar="T",
                        help="instead of --target-madds: a latency budget of the pruned dense network as --lut "
                             "predicts it (4ms, 800us); the method's target cut meets it")
    parser.add_argument("--lut", metavar="LUT.json",
                        help="latency table of this supernet (python -m dsnet.latency); needed by --target-latency")
    parser.add_argument("--sparsity", type=FRACTION, default=0.5, metavar="F",
                        help="without --target-madds: the fraction of channels the method's own rule prunes (l1: "
                             "per group; bn-scale: global percentile; taylor: of all channels; dcp: η per group; "
                             "polarization cuts at histogram valleys instead) (default 0.5)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory (created if missing; its parent must exist): model.pt, plan.json, "
                             "scores.json, report.json")
    add_data_args(parser)
    parser.add_argument("--epochs", type=NON_NEGATIVE_INT, default=1, metavar="N",
                        help="epochs of the method's training phase: sparsity training (bn-scale, polarization), "
                             "AGP pruning steps (l1), tock phases in all (taylor); unused by dcp (default 1)")
    parser.add_argument("--finetune-epochs", type=NON_NEGATIVE_INT, default=1, metavar="N",
                        help="epochs of fine-tuning the dense subnet after BN recalibration (default 1; 0: none)")
    parser.add_argument("--lr", type=POSITIVE, default=0.01, help="learning rate of the training phase (default 0.01)")
    parser.add_argument("--finetune-lr", type=POSITIVE, default=0.01,
                        help="peak learning rate of the fine-tuning, cosine to 0 (default 0.01)")
    parser.add_argument("--penalty", type=NON_NEGATIVE, metavar="S",
                        help="strength of the method's regularizer (default: bn-scale 1e-5, polarization 1e-4, "
                             "taylor 1e-4, dcp 0.01: the weight of the auxiliary cross-entropy against a "
                             "reconstruction error measured in units of its target)")
    parser.add_argument("--polarization-t", type=POSITIVE, metavar="T",
                        help="polarization: the t of its regularizer t·Σ|γ| − Σ|γ − mean γ| (default 1.2, the "
                             "authors' ResNet-50 value; their MobileNetV2 ImageNet run uses 1)")
    parser.add_argument("--min-channels", type=POSITIVE_INT, default=8, metavar="N",
                        help="no group is pruned below this many channels (default 8; never zero)")
    parser.add_argument("--score-batches", type=POSITIVE_INT, default=4, metavar="N",
                        help="batches per Taylor scoring pass, and the images of DCP's per-layer problems "
                             "(default 4)")
    parser.add_argument("--recalibrate-batches", type=POSITIVE_INT, default=8, metavar="N",
                        help="training batches for the BN recalibration of the pruned plan (default 8)")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=64, metavar="N", help="batch size (default 64)")
    parser.add_argument("--workers", type=NON_NEGATIVE_INT, default=0, metavar="N",
                        help="data-loader workers (default 0)")
    parser.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, metavar="N", help="random seed (default 0)")
    add_device_arg(parser, "prune")
    return parser


def check_args(args) -> None:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out!r} exists and is not a directory")
    if not out.parent.is_dir():
        raise UserError(f"--out {args.out!r}: directory {str(out.parent)!r} does not exist")
    if (args.target_latency is None) != (args.lut is None):
        raise UserError("--target-latency and --lut go together")
    if args.target_latency is not None and args.target_madds is not None:
        raise UserError("give one target: --target-madds or --target-latency")
    if args.from_timm is None and (args.arch is not None or args.img_size is not None):
        raise UserError("--arch and --img-size describe a --from-timm network; a checkpoint records its own")
    if args.from_timm is not None and args.weights is not None:
        raise UserError("--weights chooses among a checkpoint's weights; --from-timm has one set")
    if args.from_timm is not None and args.data is None:
        raise UserError("--from-timm needs --data (and --data-dir): the images to train, score and fine-tune on")
    if args.polarization_t is not None and args.method != "polarization":
        raise UserError(f"--polarization-t applies to --method polarization, not {args.method}")


def network_from_timm(args) -> tuple[dict, SlimNetwork, str]:
    """`--from-timm`: a supernet whose largest width is the timm network (the pruning runs on that width), and a
    run config of the data flags, as a checkpoint would record it."""
    img_size = args.img_size or 224
    state = {"config": {"data": args.data, "data_dir": args.data_dir, "img_size": img_size}}
    classes = num_classes_of(build_dataset(training_data_options(state, None), train=False))
    config = {"num_classes": classes, "img_size": img_size, **({"arch": args.arch} if args.arch else {})}
    return state, supernet_from_timm(args.from_timm, config, "--from-timm").eval(), "timm"


def main(argv: list[str] | None = None) -> int:
    args = parse_args_with_config(build_parser(), argv)
    check_args(args)
    if args.from_timm is not None:
        state, model, weights = network_from_timm(args)
    else:
        state, model, weights = open_checkpoint(args.checkpoint, args.weights)
    img_size = input_size(state, model)
    largest = count_madds(model, model.largest, img_size)
    floor = count_madds(model, narrowest_plan(model, args.min_channels), img_size)
    target = None if args.target_madds is None else parse_madds_target(args.target_madds, largest, floor)
    table = target_latency = None
    if args.lut is not None:
        table = read_table_for(args.lut, model, img_size)
        target_latency = check_latency_budget(parse_latency(args.target_latency), table,
                                              narrowest_plan(model, args.min_channels), model.largest)
    model.to(resolve_device(args.device))
    keep_freed_memory()  # as train.py does by default: batches reuse freed memory instead of page-faulting fresh
    torch.manual_seed(args.seed)
    options = training_data_options(state, model, args.data, args.data_dir)
    train_set = build_dataset(options, train=True, transform=build_transform(options, train=True))
    if len(train_set) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images")
    train_loader = build_loader(train_set, args.batch_size, train=True, workers=args.workers, seed=args.seed)
    val_loader = build_loader(build_dataset(options, train=False), 2 * args.batch_size, train=False,
                              workers=args.workers)
    calibration = calibration_batches(options, args.recalibrate_batches, args.batch_size, args.seed)
    settings = PruneSettings(args.method, target, args.sparsity, args.min_channels, args.epochs, args.lr,
                             args.penalty, args.score_batches)
    if args.polarization_t is not None:
        settings.polarization_t = args.polarization_t
    settings.target_latency = target_latency
    goal = (f" to a predicted latency ≤ {format_ms(target_latency)} ({table.describe()})" if table else
            f" to MAdds ≤ {target / 1e6:.2f}M" if target else f" at sparsity {args.sparsity:g}")
    print(f"pruning {args.checkpoint or args.from_timm} ({weights} weights) with {args.method}" + goal
          + f", {options.data} at {img_size}×{img_size}")
    result = prune_supernet(model, settings, train_loader, calibration, val_loader, img_size, args.finetune_epochs,
                            args.finetune_lr, print, table.predict if table else None)

    out = Path(args.out)
    out.mkdir(exist_ok=True)
    network = result.network.cpu()
    with atomic_path(out / "model.pt") as tmp:
        torch.save(network, tmp)
    report = dict(method=args.method, checkpoint=None if args.checkpoint is None else str(args.checkpoint),
                  **({"from_timm": str(args.from_timm), "arch": model.arch} if args.from_timm else {}),
                  weights=weights, data=options.data,
                  img_size=img_size, rule=result.outcome.rule, target_madds=target,
                  **({"target_latency_s": target_latency, "lut": args.lut,
                      "predicted_latency_s": table.predict(result.plan)} if table else {}),
                  largest=dict(madds=largest, params=count_params(model, model.largest),
                               top1=result.top1_unpruned),
                  pruned=dict(madds=result.madds, params=result.params, top1_recalibrated=result.top1_recalibrated,
                              top1_finetuned=result.top1_finetuned),
                  settings=dict(config=args.config, sparsity=args.sparsity, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                                lr=args.lr, finetune_lr=args.finetune_lr, penalty=args.penalty,
                                polarization_t=settings.polarization_t if args.method == "polarization" else None,
                                min_channels=args.min_channels, batch_size=args.batch_size, seed=args.seed),
                  **result.outcome.extra)
    write_plan_file(out / "plan.json", result.plan, madds=result.madds, params=result.params,
                    note="channels per group of the permuted copy; model.pt is the dense subnet")
    scores = {g.name: dict(scores=result.outcome.scores[g.name].tolist(), order=result.orders[g.name].tolist(),
                           kept=result.plan[g.name]) for g in result.groups}
    write_text_atomic(out / "scores.json", json.dumps(scores) + "\n")
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    after = "" if result.top1_finetuned is None else f", {result.top1_finetuned:.2f}% after fine-tuning"
    print(f"wrote {out}/model.pt, plan.json, scores.json, report.json: MAdds {result.madds / 1e6:.2f}M of "
          f"{largest / 1e6:.2f}M, params {result.params / 1e6:.3f}M, val top-1 {result.top1_unpruned:.2f}% → "
          f"{result.top1_recalibrated:.2f}% after BN recalibration{after}")
    return 0


if __name__ == "__main__":
    run_main(main)
