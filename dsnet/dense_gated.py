"""The gated network as plain `torch.nn` layers, with the routing inside its forward.

`DenseGatedNetwork` is what the export writes for a stage-II checkpoint: a dense *trunk* (the stem, the blocks before
the gate and the gate block's hidden layers, at the gate's input width), the `DoubleHeadedGate`, and one dense *tail*
per route (the gate block's projection, the later blocks and the head, at the route's width). Its forward computes
what `GatedDSNet`'s dynamic inference does: each input's route is the argmax of the slimming head's logits, the
inputs are grouped by route, each group runs through its route's tail, and the logits come back in input order.
It returns ``(logits, routes)``.

Eager Python and TorchScript skip a route without inputs with an ``if``; `torch.export`, which cannot branch on
data in Python, does it with `torch.cond`.
"""
from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import torch
import torch.nn as nn

from .gate import DoubleHeadedGate, GatedDSNet


class DenseGatedNetwork(nn.Module):
    def __init__(self, trunk: nn.Module, gate: DoubleHeadedGate, tails: list[nn.Module], num_classes: int):
        super().__init__()
        self.trunk = trunk
        self.gate = gate
        self.tails = nn.ModuleList(tails)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, route_logits = self.gate(self.trunk(x))
        routes = route_logits.argmax(1)
        logits = h.new_zeros(x.shape[0], self.num_classes)
        for r, tail in enumerate(self.tails):
            index = (routes == r).nonzero().squeeze(1)
            group = h.index_select(0, index)
            if not torch.jit.is_scripting() and torch.compiler.is_compiling():
                logits = logits.index_copy(0, index, _cond_run(tail, group, self.num_classes))
            elif index.numel() > 0:
                logits = logits.index_copy(0, index, tail(group))
        return logits, routes


@torch.jit.unused
def _cond_run(tail: nn.Module, group: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`tail(group)`, skipped by `torch.cond` when the group is empty (a graph cannot branch in Python)."""
    def empty(g: torch.Tensor) -> torch.Tensor:
        return g.new_zeros(g.shape[0], num_classes)

    return torch.cond(group.shape[0] > 0, lambda g: tail(g), empty, (group,))


@torch.no_grad()
def export_gated(gated: GatedDSNet) -> DenseGatedNetwork:
    """Copy the gated network's sliced weights, BN statistics and gate into a `DenseGatedNetwork`, in eval mode.
    ValueError when a route's BN statistics were never collected."""
    net = gated.supernet
    for width, plan in zip(gated.route_widths, gated.route_plans):
        if not net.has_bn_statistics(plan):
            raise ValueError(f"the BN statistics of route {width:g} were never collected (dsnet.bn_slots."
                             "calibrate_routes collects them); nothing to export")
    slots = [gated.route_slot(r) for r in range(len(gated.route_plans))]  # all collected: none is claimed
    plan, slot, start = gated.input_plan, net.stats_slot(gated.input_plan), gated.gate_index
    block = net.block(start)
    trunk = nn.Sequential(net.export_stem(plan, slot))
    trunk.add_module("blocks", nn.Sequential(*net.export_blocks(plan, slot, 0, start)))
    trunk.add_module("gate_block", block.dense_gate_features(gated._input_widths, slot))
    tails = []
    for route_plan, route_slot, widths in zip(gated.route_plans, slots, gated._route_widths):
        tail = nn.Sequential()
        tail.add_module("gate_block", block.dense_after_gate(widths, route_slot))
        tail.add_module("blocks", nn.Sequential(*net.export_blocks(route_plan, route_slot, start + 1)))
        for name, layer in net.export_head(route_plan, route_slot).items():
            tail.add_module(name, layer)
        tails.append(tail)
    return DenseGatedNetwork(trunk, copy.deepcopy(gated.gate), tails, net.config.num_classes).eval()


class _TrunkAndGate(nn.Module):
    """The trunk and the gate: the first graph of the ONNX form, which returns the attended features and the route
    logits."""

    def __init__(self, dense: DenseGatedNetwork):
        super().__init__()
        self.trunk, self.gate = dense.trunk, dense.gate

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate(self.trunk(x))


def fold_gated(dense: DenseGatedNetwork, fold) -> DenseGatedNetwork:
    """A copy with `fold` (a function of a dense module, e.g. `export.fold_batch_norms`) applied to the trunk and to
    each tail: the parts without control flow."""
    return DenseGatedNetwork(fold(dense.trunk), copy.deepcopy(dense.gate), [fold(t) for t in dense.tails],
                             dense.num_classes).eval()


def save_torch_export(module: nn.Module, example: torch.Tensor, path) -> None:
    """`torch.export` with a dynamic batch axis (the example's batch must be at least 2, since export takes a batch
    of 1 as a constant)."""
    program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    buffer = io.BytesIO()  # through a buffer: torch warns of a file whose name does not end in .pt2
    torch.export.save(program, buffer)
    Path(path).write_bytes(buffer.getvalue())


def load_torch_export(path) -> nn.Module:
    """The module of a saved `torch.export` program, whatever its file is called."""
    return torch.export.load(io.BytesIO(Path(path).read_bytes())).module()


def write_onnx_routes(dense: DenseGatedNetwork, example: torch.Tensor, directory, opset: int,
                      routes: list[dict]) -> None:
    """The ONNX form: `trunk.onnx` (input → features, route_logits), one `route<r>.onnx` per route (features →
    logits) and `manifest.json` naming them, with `routes` (one dict per route) recorded in it."""
    directory = Path(directory)
    axes = {"input": {0: "batch"}, "features": {0: "batch"}, "route_logits": {0: "batch"}, "logits": {0: "batch"}}

    def write(module, inputs, file, input_names, output_names):
        torch.onnx.export(module, inputs, str(directory / file), dynamo=False, opset_version=opset,
                          input_names=input_names, output_names=output_names,
                          dynamic_axes={n: axes[n] for n in input_names + output_names})

    write(_TrunkAndGate(dense), (example,), "trunk.onnx", ["input"], ["features", "route_logits"])
    with torch.no_grad():
        features = _TrunkAndGate(dense)(example)[0]
    entries = []
    for r, tail in enumerate(dense.tails):
        write(tail, (features,), f"route{r}.onnx", ["features"], ["logits"])
        entries.append({"file": f"route{r}.onnx", **routes[r]})
    manifest = {"format": "dsnet gated network, ONNX", "version": 1, "trunk": "trunk.onnx", "routes": entries,
                "num_classes": dense.num_classes, "input_shape": list(example.shape[1:])}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def run_onnx_routes(directory, x):
    """Run the ONNX form on the NumPy batch `x` with ONNX Runtime, as a deployment would (NumPy and onnxruntime
    only); returns (logits, routes) as NumPy arrays. Its imports are its own, so that its source runs on its own
    (the test runs it in a process without dsnet)."""
    from pathlib import Path

    import numpy as np
    import onnxruntime

    directory = Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text())

    def session(file):
        return onnxruntime.InferenceSession(str(directory / file), providers=["CPUExecutionProvider"])

    trunk, tails = session(manifest["trunk"]), [session(route["file"]) for route in manifest["routes"]]
    features, route_logits = trunk.run(["features", "route_logits"], {"input": x})
    routes = route_logits.argmax(1)
    logits = np.zeros((len(x), manifest["num_classes"]), np.float32)
    for r, tail in enumerate(tails):
        index = np.flatnonzero(routes == r)
        if index.size:
            logits[index] = tail.run(["logits"], {"features": features[index]})[0]
    return logits, routes
