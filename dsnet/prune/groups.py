"""Coupled channel groups, derived by tracing the network rather than listed by hand.

The supernet's largest width is exported as a dense network and traced with ``torch.fx``. Every tensor gets a
*channel space*; a channel-mixing layer (a convolution with ``groups == 1``, a linear layer) starts a new space for its
output, while a depthwise convolution, BN, activations and pooling keep their input's space, and an addition or a
multiplication of two tensors merges their spaces. A space that one permutation must reorder consistently is a coupled
group: its *members* are every tensor dimension indexed by it (producers' output channels, BN vectors, depthwise
kernels, squeeze-excitation vectors, consumers' input channels).

Each group is then named after the supernet's channel group with the same producers, so a plan can set its width;
a space that matches none (a squeeze-excitation's reduced channels, which follow their block's hidden width) is not a
group.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn as nn

from ..export import export_subnet
from ..supernet import SlimNetwork

# torchvision's SqueezeExcitation names its convolutions fc1/fc2; the supernet names them as timm does.
_SUPERNET_NAMES = {".se.fc1.": ".se.conv_reduce.", ".se.fc2.": ".se.conv_expand."}
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class Member:
    """One tensor dimension that a group's permutation reorders: supernet tensor name, and the dimension in the
    dense layer's tensor (BN statistics in the supernet have a leading slot dimension; `permute_groups` adds it)."""

    tensor: str
    dim: int


@dataclass
class ChannelGroup:
    name: str  # the supernet's channel group (a key of a width plan)
    channels: int  # at the largest width
    members: list[Member] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)  # layers writing the group's channels, in forward order
    bns: list[str] = field(default_factory=list)  # BN layers normalising them
    consumers: list[str] = field(default_factory=list)  # channel-mixing layers reading them

    @property
    def leader(self) -> str:
        """The first layer that writes the group (Distiller's group leader)."""
        return self.producers[0]


class _Spaces:
    """Union-find over channel spaces."""

    def __init__(self):
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        self.parent[max(a, b)] = min(a, b)
        return min(a, b)


def supernet_tensor_name(dense_name: str) -> str:
    """The supernet's name of a dense network's module or tensor."""
    name = dense_name + "."
    for dense, supernet in _SUPERNET_NAMES.items():
        name = name.replace(dense, supernet)
    return name[:-1]


def trace_channel_spaces(network: nn.Module) -> list[dict]:
    """The coupled channel spaces of a dense network: for each, its members, producers, BNs and consumers.

    Spaces that reach the input or the output (image channels, logits) are left out: they cannot be pruned.
    """
    graph = torch.fx.symbolic_trace(network).graph
    modules = dict(network.named_modules())
    spaces = _Spaces()
    space_of: dict[torch.fx.Node, int] = {}
    records: list[tuple[int, str, str, int]] = []  # (space, kind, module or tensor, dim)
    fixed: set[int] = set()

    def tensor_args(node: torch.fx.Node) -> list[int]:
        return [space_of[a] for a in node.args if isinstance(a, torch.fx.Node) and a in space_of]

    for node in graph.nodes:
        if node.op == "placeholder":
            space_of[node] = spaces.new()
            fixed.add(space_of[node])
        elif node.op == "call_module":
            module = modules[node.target]
            (inp,) = tensor_args(node)[:1] or [None]
            if isinstance(module, nn.Conv2d) and module.groups == 1 or isinstance(module, nn.Linear):
                records.append((inp, "consumer", node.target, 1))
                out = spaces.new()
                records.append((out, "producer", node.target, 0))
                space_of[node] = out
            elif isinstance(module, nn.Conv2d):
                if not module.groups == module.in_channels == module.out_channels:
                    raise ValueError(f"{node.target}: grouped convolutions other than depthwise are not supported")
                records.append((inp, "depthwise", node.target, 0))
                space_of[node] = inp
            elif isinstance(module, nn.BatchNorm2d):
                records.append((inp, "bn", node.target, 0))
                space_of[node] = inp
            else:  # activations, pooling, dropout, flatten: channels pass through
                space_of[node] = inp
        elif node.op in ("call_function", "call_method"):
            args = tensor_args(node)
            if node.target in (operator.add, operator.mul, torch.add, torch.mul, "add", "mul") and len(args) == 2:
                space_of[node] = spaces.union(*args)
            elif args:
                space_of[node] = args[0]
        elif node.op == "output":
            fixed.update(tensor_args(node) or [space_of[a] for a in node.args[0:1] if a in space_of])

    fixed = {spaces.find(s) for s in fixed}
    found: dict[int, dict] = {}
    for space, kind, name, dim in records:
        root = spaces.find(space)
        if root in fixed:
            continue
        entry = found.setdefault(root, dict(producers=[], bns=[], consumers=[], members=[]))
        module = modules[name]
        if kind == "bn":
            entry["bns"].append(name)
            entry["members"] += [(f"{name}.{t}", 0) for t in _BN_TENSORS]
            continue
        if kind == "consumer":
            entry["consumers"].append(name)
            entry["members"].append((f"{name}.weight", 1))
            continue
        if kind == "producer":
            entry["producers"].append(name)
        entry["members"].append((f"{name}.weight", 0))
        if getattr(module, "bias", None) is not None:
            entry["members"].append((f"{name}.bias", 0))
    return list(found.values())


def derive_groups(model: SlimNetwork) -> list[ChannelGroup]:
    """The coupled channel groups of `model`, traced from its largest width, in the supernet's group order."""
    dense = export_subnet(model, model.largest)
    by_producers = {frozenset(p): name for name, p in model.producers().items()}
    groups: dict[str, ChannelGroup] = {}
    for space in trace_channel_spaces(dense):
        # Squeeze-excitation's expand conv writes into the hidden group through the product; it does not name it.
        key = frozenset(p for p in space["producers"] if ".se." not in p)
        name = by_producers.get(key)
        if name is None:
            if all(".se." in p for p in space["producers"]):
                continue  # a squeeze-excitation's reduced channels
            raise ValueError(f"traced channel group written by {sorted(key)} matches no channel group of the "
                             f"supernet")
        members = [Member(supernet_tensor_name(t), d) for t, d in space["members"]]
        groups[name] = ChannelGroup(name, model.max_channels[model.group_names.index(name)], members,
                                    [supernet_tensor_name(p) for p in space["producers"]],
                                    [supernet_tensor_name(b) for b in space["bns"]],
                                    [supernet_tensor_name(c) for c in space["consumers"]])
    missing = [n for n in model.group_names if n not in groups]
    if missing:
        raise ValueError(f"tracing found no coupled channels for group(s) {missing}")
    return [groups[n] for n in model.group_names]
