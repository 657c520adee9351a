"""The supernet architectures by name, and a supernet from a recorded config (``arch`` selects; a config that
predates the key is MobileNetV2's)."""
from __future__ import annotations

from typing import Any, Mapping

from .mobilenetv2 import DSMobileNetV2, SupernetConfig
from .resnet import RESNET_LAYOUTS, DSResNet, ResNetConfig
from .supernet import NetworkConfig, SlimNetwork

ARCHS: dict[str, tuple[type[NetworkConfig], type[SlimNetwork]]] = {
    "mobilenetv2": (SupernetConfig, DSMobileNetV2),
    **{name: (ResNetConfig, DSResNet) for name in RESNET_LAYOUTS},
}
DEFAULT_ARCH = "mobilenetv2"


def config_class(arch: str) -> type[NetworkConfig]:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    return ARCHS[arch][0]


def network_config(values: Mapping[str, Any]) -> NetworkConfig:
    """The validated config of a supernet from its dict (a checkpoint's ``model_config``)."""
    arch = values.get("arch", DEFAULT_ARCH)
    return config_class(arch).from_dict({**values, "arch": arch})


def create_model(config: NetworkConfig | Mapping[str, Any] | None = None, **overrides: Any) -> SlimNetwork:
    """A supernet of any architecture from its config (object or mapping) with keyword overrides."""
    values = dict(config.to_dict() if isinstance(config, NetworkConfig) else config or {})
    values.update(overrides)
    config = network_config(values)
    return ARCHS[config.arch][1](config)
