"""The static pruning methods, by the name the command line takes; each is one module over `base.PruneMethod`.

- l1 (`l1_agp`): Distiller's L1 ranking; AGP masks between epochs; own rule: the same fraction of every group.
- bn-scale (`network_slimming`): Network Slimming; own rule: a global percentile of mean |γ|.
- polarization (`polarization`): the Polarization regularizer; own rule: the first valley of each group's histogram.
- taylor (`gate_decorator`): Gate Decorator's Taylor scores with tick-tock; own rule: global pruning tick by tick.
- dcp (`dcp`): Discrimination-aware Channel Pruning; own rule: DCP's keep counts, the same fraction of every group.
"""
from __future__ import annotations

from .base import PruneMethod
from .dcp import DiscriminationAware
from .gate_decorator import GateDecorator
from .l1_agp import L1AGP
from .network_slimming import NetworkSlimming
from .polarization import Polarization

REGISTRY: dict[str, type[PruneMethod]] = {
    method.name: method for method in (L1AGP, NetworkSlimming, Polarization, GateDecorator, DiscriminationAware)}
METHODS = tuple(REGISTRY)
