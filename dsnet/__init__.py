"""dsnet: dynamic slimmable networks — one supernet, many widths, sliced kernels."""
from .archs import ARCHS, create_model
from .bn_slots import recalibrate_bn
from .checkpoint import load_network, load_supernet
from .madds import count_madds, count_params, layer_costs
from .mobilenetv2 import DSMobileNetV2, SupernetConfig, create_supernet
from .resnet import DSResNet, ResNetConfig
from .supernet import SlimNetwork
from .timm_import import from_timm
from .widths import WidthPlan

__all__ = ["ARCHS", "DSMobileNetV2", "DSResNet", "ResNetConfig", "SlimNetwork", "SupernetConfig", "WidthPlan",
           "count_madds", "count_params", "create_model", "create_supernet", "export_subnet", "from_timm", "layer_costs", "load_network", "load_supernet", "recalibrate_bn"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # dsnet.export is imported on first use, not here: `python -m dsnet.export` must find it not yet imported.
    if name == "export_subnet":
        from .export import export_subnet
        return export_subnet
    raise AttributeError(f"module 'dsnet' has no attribute {name!r}")
