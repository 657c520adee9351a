"""dsnet: dynamic slimmable networks — one supernet, many widths, sliced kernels."""
from .calibrate import recalibrate_bn
from .export import export_subnet
from .madds import count_madds, count_params, layer_costs
from .mobilenetv2 import DSMobileNetV2, SupernetConfig, create_supernet
from .slim import WidthPlan

__all__ = ["DSMobileNetV2", "SupernetConfig", "WidthPlan", "count_madds", "count_params", "create_supernet",
           "export_subnet", "layer_costs", "recalibrate_bn"]
__version__ = "0.1.0"
