"""Pretrained timm weights in: a supernet whose largest width is a timm MobileNetV2 or ResNet, the inverse of the
timm export.

The supernet's modules carry timm's names, so a timm `mobilenetv2_*` or `resnet18/34/50` state dict is the supernet's
own at its largest width. Every BN statistics slot starts from timm's statistics (a narrower width keeps their first
channels, as it keeps the first channels of every weight); stage I re-estimates them per width.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
import torch.nn as nn

from .archs import create_model
from .errors import UserError
from .mobilenetv2 import DEFAULT_WIDTHS, MOBILENETV2_STAGES, TIMM_MODELS
from .resnet import DEFAULT_RESNET_WIDTHS
from .supernet import SlimNetwork

STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
TIMM_RESNETS = ("resnet18", "resnet34", "resnet50")  # the timm ResNets whose layout dsnet has, at width 1.0
CLASSIFIERS = {"mobilenetv2": "classifier", **{arch: "fc" for arch in TIMM_RESNETS}}


def _shapes_match(state: Mapping[str, torch.Tensor], arch: str, width: float, num_classes: int) -> bool:
    with torch.device("meta"):
        model = create_model({"arch": arch, "widths": [width], "num_classes": num_classes})
    shapes = {k: tuple(v.shape) for k, v in state.items() if not k.endswith(STATISTICS)}
    return shapes == {k: tuple(p.shape) for k, p in model.named_parameters()}


def timm_arch(state: Mapping[str, torch.Tensor]) -> tuple[str, float]:
    """(arch, width) of the timm network whose state dict `state` is; UserError if it is none dsnet has."""
    if "classifier.weight" in state:
        num_classes = state["classifier.weight"].shape[0]
        for width in TIMM_MODELS:
            if _shapes_match(state, "mobilenetv2", width, num_classes):
                return "mobilenetv2", width
        raise UserError(f"not the state dict of a timm MobileNetV2 of widths {sorted(TIMM_MODELS)} "
                        f"({', '.join(TIMM_MODELS.values())})")
    if "fc.weight" in state:
        num_classes = state["fc.weight"].shape[0]
        for arch in TIMM_RESNETS:
            if _shapes_match(state, arch, 1.0, num_classes):
                return arch, 1.0
        raise UserError(f"not the state dict of a timm {', '.join(TIMM_RESNETS)}")
    raise UserError("not a timm MobileNetV2 or ResNet state dict: it has neither 'classifier.weight' nor "
                    "'fc.weight'")


def _check_layout(arch: str, width: float, config: Mapping[str, Any]) -> None:
    """UserError where the supernet's config asks for another layout than the timm network's."""
    name = TIMM_MODELS[width] if arch == "mobilenetv2" else arch
    asked = config.get("arch")
    if asked is not None and asked != arch:
        raise UserError(f"the timm weights are {name}; they do not fit a {asked} supernet (--arch {arch})")
    stages = config.get("stages")
    if stages is not None and [list(s) for s in stages] != [list(s) for s in MOBILENETV2_STAGES]:
        raise UserError("timm's MobileNetV2 has the full depth; this supernet's stages differ from it "
                        "(depth_multiplier 1.0 builds them)")
    # A MobileNetV2's small-input stem changes two strides and no shape, so it holds timm's weights (computing
    # another function of them, as fine-tuning at 32 px wants); a ResNet's is a 3×3 conv in place of timm's 7×7.
    refused = ("se_ratio",) if arch == "mobilenetv2" else ("small_input", "se_ratio")
    layout = {k: v for k, v in config.items() if k in refused and v}
    if layout:
        raise UserError(f"timm's {'MobileNetV2' if arch == 'mobilenetv2' else arch} has no {', '.join(layout)}; a "
                        f"supernet built with {', '.join(f'{k}={v}' for k, v in layout.items())} cannot hold its "
                        "weights")
    trunk = config.get("trunk_width")
    if config.get("slim_from") is not None and trunk is not None and abs(trunk - width) > 1e-6:
        raise UserError(f"the timm weights are {name}, of width {width} in every layer; a gate-aware supernet with "
                        f"trunk_width {trunk} cannot hold them (leave trunk_width at the largest width)")


def from_timm(source: nn.Module | Mapping[str, torch.Tensor], widths: list[float] | None = None,
              num_classes: int | None = None, **config: Any) -> SlimNetwork:
    """A supernet whose largest width computes the timm network `source` (a MobileNetV2 or a ResNet-18/34/50, as a
    model or its state dict) exactly.

    `widths` must end at the timm model's width (default: the architecture's standard widths below it, then it).
    With another `num_classes` than the timm model's, the classifier is re-initialised, as timm's `pretrained=True`
    does. Other keywords go to the supernet's config (e.g. `dropout`, `img_size`); the layout must stay timm's, but
    for `small_input=True` on a MobileNetV2: the same weights with the stem and the second stage at stride 1, whose
    logits are no longer timm's.
    """
    state = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    arch, width = timm_arch(state)
    _check_layout(arch, width, config)
    defaults = DEFAULT_WIDTHS if arch == "mobilenetv2" else DEFAULT_RESNET_WIDTHS
    widths = list(widths) if widths is not None else [w for w in defaults if w < width - 1e-9] + [width]
    name = TIMM_MODELS[width] if arch == "mobilenetv2" else arch
    if abs(widths[-1] - width) > 1e-6:
        raise UserError(f"the timm weights are {name} (width {width}); the supernet's widths must end at {width}, "
                        f"not {widths[-1]}")
    classifier = CLASSIFIERS[arch]
    timm_classes = state[f"{classifier}.weight"].shape[0]
    model = create_model({**config, "arch": arch, "widths": widths, "num_classes": num_classes or timm_classes})
    own = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if key.startswith(f"{classifier}.") and own[key].shape != value.shape:
                continue  # another number of classes: the supernet's own initialisation stays
            own[key].copy_(value.expand_as(own[key]) if key.endswith(STATISTICS) else value)
    return model


def load_timm_weights(name_or_file: str, flag: str = "--init-timm") -> dict[str, torch.Tensor]:
    """A timm state dict from a file (a plain state dict, or one under 'state_dict' or 'model'), or timm's
    pretrained weights of a model name where a model hub can be reached."""
    if os.path.isfile(name_or_file):
        try:
            state = torch.load(name_or_file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a pickle that is more than weights, or a damaged file
            raise UserError(f"cannot read timm weights from {name_or_file!r} "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict):
            raise UserError(f"{name_or_file!r} holds no state dict")
        return state
    names = (*TIMM_MODELS.values(), *TIMM_RESNETS)
    if name_or_file not in names:
        raise UserError(f"{flag} {name_or_file!r} is neither a file nor one of timm's {', '.join(names)}")
    import timm

    try:
        return timm.create_model(name_or_file, pretrained=True).state_dict()
    except Exception as exc:  # noqa: BLE001 - no network, no hub, or a hub error
        raise UserError(f"cannot download timm's pretrained {name_or_file} here "
                        f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}); pass its weights "
                        f"as a state-dict file to {flag}") from None


def supernet_from_timm(name_or_file: str, config: dict[str, Any], flag: str = "--init-timm") -> SlimNetwork:
    """`--init-timm` (or another `flag`): the supernet of run config `config` (a `model_config`) from timm weights,
    saying so when the classifier is re-initialised."""
    state = load_timm_weights(name_or_file, flag)
    model = from_timm(state, **config)
    timm_classes = state[f"{CLASSIFIERS[model.arch]}.weight"].shape[0]
    if timm_classes != config["num_classes"]:
        print(f"{flag}: classifier re-initialised ({timm_classes} classes in the timm weights, "
              f"{config['num_classes']} here)")
    return model
