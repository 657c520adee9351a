"""Pretrained timm weights in: a supernet whose largest width is a timm MobileNetV2, the inverse of the timm export.

The supernet's modules carry timm's names, so a timm `mobilenetv2_*` state dict is the supernet's own at its largest
width. Every BN statistics slot starts from timm's statistics (a narrower width keeps their first channels, as it
keeps the first channels of every weight); stage I re-estimates them per width.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
import torch.nn as nn

from .errors import UserError
from .mobilenetv2 import DEFAULT_WIDTHS, MOBILENETV2_STAGES, TIMM_MODELS, DSMobileNetV2, create_supernet

STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def timm_width(state: Mapping[str, torch.Tensor]) -> float:
    """The width of the timm MobileNetV2 whose state dict `state` is; UserError if it is none of them."""
    if "classifier.weight" not in state:
        raise UserError("not a timm MobileNetV2 state dict: it has no 'classifier.weight'")
    num_classes = state["classifier.weight"].shape[0]
    shapes = {k: tuple(v.shape) for k, v in state.items() if not k.endswith(STATISTICS)}
    for width in TIMM_MODELS:
        model = create_supernet(widths=[width], num_classes=num_classes)
        if shapes == {k: tuple(p.shape) for k, p in model.named_parameters()}:
            return width
    raise UserError(f"not the state dict of a timm MobileNetV2 of widths {sorted(TIMM_MODELS)} "
                    f"({', '.join(TIMM_MODELS.values())})")


def from_timm(source: nn.Module | Mapping[str, torch.Tensor], widths: list[float] | None = None,
              num_classes: int | None = None, **config: Any) -> DSMobileNetV2:
    """A supernet whose largest width computes the timm MobileNetV2 `source` (a model or its state dict) exactly.

    `widths` must end at the timm model's width (default: the standard widths below it, then it). With another
    `num_classes` than the timm model's, the classifier is re-initialised, as timm's `pretrained=True` does. Other
    keywords go to the supernet's config (e.g. `dropout`, `img_size`); the layout must stay timm's.
    """
    state = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    width = timm_width(state)
    stages = config.get("stages")
    if stages is not None and [list(s) for s in stages] != [list(s) for s in MOBILENETV2_STAGES]:
        raise UserError("timm's MobileNetV2 has the full depth; this supernet's stages differ from it "
                        "(depth_multiplier 1.0 builds them)")
    layout = {k: v for k, v in config.items() if k in ("small_input", "se_ratio") and v}
    if layout:
        raise UserError(f"timm's MobileNetV2 has no {', '.join(layout)}; a supernet built with "
                        f"{', '.join(f'{k}={v}' for k, v in layout.items())} cannot hold its weights")
    trunk = config.get("trunk_width")
    if config.get("slim_from") is not None and trunk is not None and abs(trunk - width) > 1e-6:
        raise UserError(f"the timm weights are {TIMM_MODELS[width]}, of width {width} in every layer; a gate-aware "
                        f"supernet with trunk_width {trunk} cannot hold them (leave trunk_width at the largest width)")
    widths = list(widths) if widths is not None else [w for w in DEFAULT_WIDTHS if w < width - 1e-9] + [width]
    if abs(widths[-1] - width) > 1e-6:
        raise UserError(f"the timm weights are {TIMM_MODELS[width]} (width {width}); the supernet's widths must "
                        f"end at {width}, not {widths[-1]}")
    timm_classes = state["classifier.weight"].shape[0]
    model = create_supernet(widths=widths, num_classes=num_classes or timm_classes, **config)
    own = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if key.startswith("classifier.") and own[key].shape != value.shape:
                continue  # another number of classes: the supernet's own initialisation stays
            own[key].copy_(value.expand_as(own[key]) if key.endswith(STATISTICS) else value)
    return model


def load_timm_weights(name_or_file: str) -> dict[str, torch.Tensor]:
    """A timm MobileNetV2 state dict from a file (a plain state dict, or one under 'state_dict' or 'model'), or
    timm's pretrained weights of a model name where a model hub can be reached."""
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
    if name_or_file not in TIMM_MODELS.values():
        raise UserError(f"--init-timm {name_or_file!r} is neither a file nor one of timm's "
                        f"{', '.join(TIMM_MODELS.values())}")
    import timm

    try:
        return timm.create_model(name_or_file, pretrained=True).state_dict()
    except Exception as exc:  # noqa: BLE001 - no network, no hub, or a hub error
        raise UserError(f"cannot download timm's pretrained {name_or_file} here "
                        f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}); pass its weights "
                        "as a state-dict file to --init-timm") from None


def supernet_from_timm(name_or_file: str, config: dict[str, Any]) -> DSMobileNetV2:
    """`--init-timm`: the supernet of run config `config` (a `model_config`) from timm weights, saying so when the
    classifier is re-initialised."""
    state = load_timm_weights(name_or_file)
    model = from_timm(state, **config)
    timm_classes = state["classifier.weight"].shape[0]
    if timm_classes != config["num_classes"]:
        print(f"--init-timm: classifier re-initialised ({timm_classes} classes in the timm weights, "
              f"{config['num_classes']} here)")
    return model
