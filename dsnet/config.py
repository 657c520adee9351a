"""Run configuration: defaults ← YAML recipe (`-c`) ← command-line flags, one flat set of keys.

The defaults are the digits recipe (`configs/digits.yaml` spells them out), so the bare command trains on the
built-in dataset in minutes on a CPU; the other recipes set every key that differs.

Every key is a command-line flag (`num_random_widths` is `--num-random-widths`); a recipe may only use known keys.
The merged config is saved with the run as `args.yaml` and inside every checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch
import yaml

from .cli import (FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, PROBABILITY, Number,
                  config_file_values, parse_args_with_config)
from .errors import UserError
from .data import DATASETS, DataOptions
from .gate_training import MADDS_LOSSES, SGS_MODES
from .archs import ARCHS, DEFAULT_ARCH, config_class, create_model
from .mobilenetv2 import MOBILENETV2_STAGES, scale_depth


@dataclasses.dataclass(frozen=True)
class Key:
    name: str
    default: Any
    help: str
    type: Any = None  # str, int, float, bool, "floats", "ints", a cli.Number (a range); None: from the default
    choices: tuple | None = None


KEYS: tuple[Key, ...] = (
    # what to train
    Key("stage", "supernet", "supernet: stage I (sandwich + in-place bootstrapping); gate: stage II", str,
        ("supernet", "gate")),
    Key("output", None, "run directory (default: runs/<stage>-<data>)", str),
    Key("resume", None, "checkpoint to resume from (restores model, EMA, optimizer, scheduler, RNG, and the position "
        "in the epoch)", str),
    Key("overwrite", False, "allow writing into an output directory that holds another run"),
    Key("init", None, "stage II: the stage-I checkpoint to start from; its model and data keys are the defaults",
        str),
    Key("init_timm", None, "stage I: start from a timm MobileNetV2's or ResNet's weights, a state-dict file or "
        "a name (mobilenetv2_100, resnet50, ...; downloaded where a model hub can be reached); needs the full "
        "depth, widths ending at its width and, for a ResNet, no small-input stem (a MobileNetV2 takes it: same "
        "weights at stride 1); another number of classes re-initialises the classifier", str),
    Key("init_permute", False, "stage I, with init_timm: reorder each coupled channel group of the imported network "
        "by its BN scales |γ|, largest first, so that every narrower width starts from the most important channels"),
    Key("seed", 0, "seed of weights, data order, augmentation and sampled widths", NON_NEGATIVE_INT),
    Key("device", None, "cpu, cuda, cuda:1, ... (default: cuda when available)", str),
    # data
    Key("data", "digits", "dataset", str, DATASETS),
    Key("data_dir", None, "dataset root (torchvision layout, or DIR/train and DIR/val for imagefolder)", str),
    Key("download", False, "let torchvision download the dataset where a network exists"),
    Key("img_size", 8, "input resolution", POSITIVE_INT),
    Key("crop_scale_min", 0.6, "training random-resized crop keeps at least this fraction of the image",
        Number(float, 0, 1, open_low=True)),
    Key("crop_pct", 1.0, "evaluation: resize to img_size / crop_pct, then center-crop (timm uses 0.875)",
        POSITIVE),
    Key("hflip", None, "horizontal flip probability (default: 0.5 where mirroring keeps the label, else 0)",
        PROBABILITY),
    Key("randaugment", None, "timm RandAugment spec, e.g. rand-m9-mstd0.5", str),
    Key("reprob", 0.0, "random erasing probability", PROBABILITY),
    Key("color_jitter", 0.0, "color jitter strength", NON_NEGATIVE),
    Key("batch_size", 64, "images per step on each process", POSITIVE_INT),
    Key("val_batch_size", 256, "images per validation batch", POSITIVE_INT),
    Key("workers", 0, "data-loader worker processes", NON_NEGATIVE_INT),
    Key("skip_bad_images", False, "skip an image file that cannot be decoded, with a warning naming it, instead of "
        "stopping with an error that names it"),
    # model
    Key("arch", DEFAULT_ARCH, "supernet architecture: mobilenetv2, the ImageNet ResNets (timm's layout) or the CIFAR "
        "ResNets resnet20 and resnet56", str, tuple(ARCHS)),
    Key("widths", None, "width multipliers of the supernet, increasing (default: the arch's: 0.35 to 1.0 in steps "
        "of 0.05 for MobileNetV2, 0.25 0.5 0.75 1.0 for a ResNet)", "floats"),
    Key("num_classes", None, "number of classes (default: the dataset's)", POSITIVE_INT),
    Key("small_input", True, "small-input stem for ~32 px images (stem and second stage at stride 1)"),
    Key("depth_multiplier", 0.5, "MobileNetV2: blocks per stage times this, rounded up, as timm's depth_multiplier "
        "(0.5: 11 blocks instead of 17); a ResNet's depth is its arch's", POSITIVE),
    Key("dropout", 0.0, "dropout before the classifier", FRACTION),
    Key("se_ratio", 0.0, "MobileNetV2: squeeze-excitation in every block (0: none)", PROBABILITY),
    Key("slim_from", None, "gate-aware layout (DS-Net's): the first block of a stage, e.g. blocks.3.0; the layers "
        "before it keep trunk_width in every width choice, so the width choices are the routes of a gate there and "
        "stage I trains them (it needs num_random_plans 0)", str),
    Key("trunk_width", None, "gate-aware layout: the width of every layer before slim_from (default: the largest "
        "width); a narrower trunk makes the narrowest route cheaper", POSITIVE),
    # the sandwich
    Key("num_random_widths", 1, "random widths between the largest and the smallest in every step", NON_NEGATIVE_INT),
    Key("num_random_plans", 1, "random per-stage plans (each stage at its own random width choice) in every step, "
        "learning like the random widths; trains the mixed widths of gate routes and searched plans", NON_NEGATIVE_INT),
    Key("ensemble_smallest", True, "smallest width learns from the mean of the teacher's outputs of the step"),
    Key("ema", False, "EMA teacher (in-place bootstrapping); without it, distil from the live largest width"),
    Key("ema_decay", 0.99, "EMA decay per optimizer update", FRACTION),
    Key("teacher_batch_stats", False, "the EMA teacher normalises with each batch's statistics instead of its "
        "running statistics, which lag its weights early in a run"),
    Key("ema_warmup", True, "ramp the EMA decay up from 0 (timm ModelEmaV3 warm-up) for short runs"),
    Key("label_smoothing", 0.1, "label smoothing of the largest width's cross-entropy",
        FRACTION),
    # the gate (stage II)
    Key("init_weights", "ema", "stage II: which weights of the --init checkpoint (ema falls back to model when it "
        "has none)", str, ("ema", "model")),
    Key("finetune_supernet", False, "stage II: train the supernet's weights with the gate (BN statistics stay "
        "frozen); default: only the gate trains"),
    Key("gate_block", None, "stage II: the block the gate sits in, the first block of a stage; it reads the block's hidden "
        "features (a ResNet block's input). "
        "The layers after it run at the routed width (default: a gate-aware supernet's slim_from, else the first "
        "block of the middle stage: blocks.3.0 in MobileNetV2, layer3.0 or layer2.0 in a ResNet)",
        str),
    Key("gate_routes", None, "stage II: the widths the gate routes to, a subset of widths (default: gate_num_routes "
        "choices spread from the smallest to the largest)", "floats"),
    Key("gate_num_routes", 4, "stage II: number of routes when gate_routes is not given", POSITIVE_INT),
    Key("gate_input_width", None, "stage II: the fixed width of every layer before the gate, a width choice "
        "(default: a gate-aware supernet's trunk_width, else the largest, which is then also the widest route's "
        "width and gives the gate the strongest features)", float),
    Key("gate_se_ratio", 0.25, "stage II: the gate's squeeze width relative to its input channels (a block with "
        "squeeze-excitation keeps its own)", Number(float, 0, 1, open_low=True)),
    Key("gate_tau", 1.0, "stage II: temperature of the straight-through Gumbel-softmax routes in training", POSITIVE),
    Key("gate_calibration_batches", 8, "stage II: training batches on which each new route's BN statistics are "
        "collected when the gate is inserted, and every route's again before each validation", POSITIVE_INT),
    Key("sgs", "budget", "stage II: gate labels (SGS). budget: the route with the least cross-entropy plus a price "
        "times its cost, the price chosen on each batch so that the labels meet the target; sandwich (DS-Net's): the "
        "smallest route if it classifies the image correctly, else the largest; graded: the narrowest route that "
        "classifies it correctly, else the largest", str, SGS_MODES),
    Key("calibrate_target", True, "stage II: before each validation, bias the route logits by a price times each "
        "route's cost, the price chosen on the calibration images so that the routes' mean cost is the target; the "
        "bias is part of the gate and of its exports"),
    Key("gate_min_route_share", 0.06, "stage II, with calibrate_target: the least share of the calibration images "
        "each route gets; a route below it is lifted by a bias of its own (0: none)", FRACTION),
    Key("task_loss_weight", 1.0, "stage II: weight of the dynamic network's cross-entropy", NON_NEGATIVE),
    Key("gate_loss_weight", 1.0, "stage II: weight of the gate's cross-entropy against the SGS labels", NON_NEGATIVE),
    Key("madds_loss", "target", "stage II: the cost penalty on E[MAdds], the batch mean of the expected MAdds per "
        "image. square: weight · (E / target)², DS-Net's, which only pushes down; excess: weight · max(0, E / target "
        "− 1)², zero up to the target; target: weight · (E / target − 1)², zero at the target, growing on both sides",
        str, MADDS_LOSSES),
    Key("madds_loss_weight", 0.1, "stage II: weight of the MAdds loss (0: none)", NON_NEGATIVE),
    Key("target_madds", None, "stage II: MAdds target per image: a count (e.g. 3e8), or a fraction (≤ 1) of the "
        "widest route's MAdds (default: halfway between the narrowest route's and the widest's)", POSITIVE),
    Key("target_latency", None, "stage II: a latency budget per image instead of --target-madds (4ms, 800us), as "
        "--lut predicts the routes' dense networks; the cost penalty then works on predicted latency", str),
    Key("lut", None, "stage II: the latency table (python -m dsnet.latency) that --target-latency needs", str),
    # optimisation
    Key("epochs", 12, "epochs of the learning-rate schedule", POSITIVE_INT),
    Key("epoch_limit", None, "stop after this many epochs in this run (resume later); the schedule is unchanged",
        POSITIVE_INT),
    Key("opt", "sgd", "timm optimizer name (sgd is SGD with Nesterov momentum)", str),
    Key("lr", None, "learning rate (default: lr_base · global batch / lr_base_size)", POSITIVE),
    Key("lr_base", 0.32, "learning rate per lr_base_size images", POSITIVE),
    Key("lr_base_size", 512, "batch size lr_base refers to", POSITIVE_INT),
    Key("momentum", 0.9, "optimizer momentum", FRACTION),
    Key("weight_decay", 1e-4, "weight decay (not applied to BN and biases)", NON_NEGATIVE),
    Key("sched", "cosine", "timm scheduler name", str),
    Key("warmup_epochs", 2, "linear warm-up epochs", NON_NEGATIVE_INT),
    Key("warmup_lr", 1e-5, "learning rate at the start of warm-up", NON_NEGATIVE),
    Key("min_lr", 0.0, "floor of the schedule", NON_NEGATIVE),
    Key("clip_grad", None, "clip the gradient norm to this value (0: no clipping, which turns a recipe's clip off)",
        NON_NEGATIVE),
    Key("accum_steps", 1, "micro-batches per optimizer update", POSITIVE_INT),
    Key("amp", False, "mixed precision: bf16 autocast on CPU, fp16 with a GradScaler on CUDA"),
    Key("channels_last", True, "channels_last memory format for the model and its activations"),
    Key("keep_freed_memory", True, "let glibc's malloc keep the memory a step frees for the next step instead of "
        "returning it to the OS (no page faults per step; the process keeps its peak memory)"),
    # validation and logging
    Key("val_widths", None, "widths validated each epoch (default: smallest, middle, largest)", "floats"),
    Key("bn_recalibrate_batches", 2, "before validating, re-estimate each validated width's BN statistics on this many "
        "training batches (every width after the last epoch); 0: use the running statistics", NON_NEGATIVE_INT),
    Key("save_every_steps", 0, "also write last.pth every this many steps inside an epoch (0: only at epoch ends)",
        NON_NEGATIVE_INT),
    Key("val_every", 1, "validate every k epochs (and after the last)", POSITIVE_INT),
    Key("best_metric", None,
        "summary column that picks best.pth; @smallest/@middle/@largest or a width, e.g. val_top1@0.5 (default: "
        "ema_val_top1@smallest in stage I, ema_val_top1 of the dynamic network in stage II)", str),
    Key("log_interval", 20, "steps between progress-bar updates of the loss", POSITIVE_INT),
)
FLOATS, INTS = "floats", "ints"


def _key_type(key: Key):
    if key.type is not None:
        return key.type
    return type(key.default)


def defaults() -> dict[str, Any]:
    return {k.name: (list(k.default) if isinstance(k.default, list) else k.default) for k in KEYS}


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    from .cli import ArgumentParser

    parser = ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", help="YAML recipe; its keys are the long flags below, with underscores")
    for key in KEYS:
        flag = "--" + key.name.replace("_", "-")
        kind = _key_type(key)
        ranged = f"{kind.range_text()}, " if isinstance(kind, Number) else ""
        help_text = f"{key.help} ({ranged}default: {key.default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif kind == FLOATS:
            parser.add_argument(flag, type=float, nargs="+", metavar="W", help=help_text)
        elif kind == INTS:
            parser.add_argument(flag, type=int, nargs="+", help=help_text)
        else:
            parser.add_argument(flag, type=kind, choices=key.choices, help=help_text)
    return parser


def load_recipe(path: str) -> dict[str, Any]:
    """A recipe's values, checked as train.py's flags are."""
    return config_file_values(build_parser("train.py", ""), path)


def parse_config(argv: list[str] | None, prog: str = "train.py", description: str = "") -> tuple[dict, set[str]]:
    """Merge defaults, the `-c` recipe and the flags. Returns the config and the keys the user set explicitly."""
    # Flags default to "not given" (argparse.SUPPRESS), so `args` holds only what the recipe or the flags set.
    args = vars(parse_args_with_config(build_parser(prog, description), argv))
    args.pop("config", None)
    config = {**defaults(), **args}
    validate(config)
    return config, set(args)


def validate(config: dict[str, Any]) -> None:
    """What the keys' own ranges (checked as they are parsed) cannot say: a recipe's `null` for a key that needs a
    value, and the supernet the keys describe."""
    for key in KEYS:
        if config[key.name] is None and key.default is not None:
            raise UserError(f"{key.name} needs a value (default: {key.default})")
    if config["arch"] != "mobilenetv2" and config["se_ratio"]:
        raise UserError(f"--se-ratio is MobileNetV2's; {config['arch']} has no squeeze-excitation")
    try:
        with torch.device("meta"):  # the layout's own checks (slim_from among them), without allocating weights
            create_model(model_config(config, num_classes=config["num_classes"] or 1))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if config["slim_from"] is not None:
        if config["stage"] == "supernet" and config["num_random_plans"]:
            raise UserError("a gate-aware supernet (--slim-from) trains its width choices, which are its gate's "
                            "routes; random per-stage plans would train other networks: set --num-random-plans 0")


# Keys added after runs were recorded without them, each with the value those runs had (not today's default).
RECORDED_BEFORE = {"depth_multiplier": 1.0, "arch": DEFAULT_ARCH}


def recorded_config(state: dict[str, Any]) -> dict[str, Any]:
    """The run config a checkpoint records, completed with `RECORDED_BEFORE` where it predates a key."""
    config = state.get("config")
    return {**RECORDED_BEFORE, **config} if isinstance(config, dict) else {}


def model_config(config: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """The supernet's part of a run config."""
    widths = config["widths"] if config["widths"] is not None else list(config_class(config["arch"])().widths)
    values = {"arch": config["arch"], "widths": widths, "num_classes": num_classes,
              "img_size": config["img_size"], "small_input": config["small_input"], "dropout": config["dropout"],
              "slim_from": config["slim_from"], "trunk_width": config["trunk_width"]}
    if config["arch"] == "mobilenetv2":
        values.update(se_ratio=config["se_ratio"], stages=scale_depth(MOBILENETV2_STAGES, config["depth_multiplier"]))
    return values


def data_options(config: dict[str, Any]) -> DataOptions:
    return DataOptions.from_config(config)


def to_yaml(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)
