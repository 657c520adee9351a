"""A block type is one class: a toy block dsnet does not ship gets forward, export, MAdds and the gate's routed forward
from its own class alone, checked against its dense export, fvcore and the sliced network."""
import random
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

import dsnet
from dsnet.blocks import SlimBlock
from dsnet.gate import GateConfig, insert_gate
from dsnet.slim import SlimBatchNorm2d, SlimConv2d

from conftest import fvcore_conv_linear_madds, randomize_bn


class ToyResidual(SlimBlock):
    """3×3 convolution → BN → ReLU, added to its input."""

    def __init__(self, spec, channels: int, num_slots: int):
        super().__init__(spec, se_ratio=0.0)
        self.se = None
        self.conv = SlimConv2d(channels, channels, 3, bias=True)
        self.bn = SlimBatchNorm2d(channels, num_slots)

    def forward(self, x, widths, norm):
        return x + F.relu(norm(self.bn, self.conv(x, widths[2]), self.spec.out_group))

    def dense_layers(self, widths, slot):
        cin, _, cout, _ = widths
        return OrderedDict(conv=self.conv.export(cin, cout), bn=self.bn.export(cout, slot), act=nn.ReLU())

    def costs(self, widths, costs):
        cin, _, cout, _ = widths
        costs.conv(f"{self.spec.name}.conv", self.conv, cin, cout)
        costs.bn(f"{self.spec.name}.bn", cout)


def supernet_with_toy_blocks(**config) -> dsnet.DSMobileNetV2:
    """A supernet in which every block that adds to its own stage's stream after the first (an inverted residual
    today) is a toy block."""
    torch.manual_seed(3)
    model = dsnet.create_supernet(num_classes=10, **config)
    replaced = 0
    for stage in model.blocks:
        for j, block in enumerate(stage):
            spec = block.spec
            if j > 0 and spec.in_group == spec.out_group:
                stage[j] = ToyResidual(spec, model.max_channels[spec.out_group], model.num_slots)
                replaced += 1
    assert replaced > 5
    randomize_bn(model)
    return model.eval()


def test_a_toy_block_class_gives_forward_export_and_madds_equal_to_its_dense_export_and_fvcore():
    model = supernet_with_toy_blocks(img_size=64)
    x = torch.randn(2, 3, 64, 64)
    rng = random.Random(0)
    plans = [0.35, 0.7, 1.0, [rng.choice(model.widths) for _ in model.stage_names]]
    with torch.no_grad():
        for width in plans:
            plan = model.resolve_width(width)
            if plan.choice is None:
                dsnet.recalibrate_bn(model, plan, [torch.randn(4, 3, 64, 64)])
            dense = dsnet.export_subnet(model, plan)
            assert any(name.endswith(".conv") for name, _ in dense.named_modules())
            assert torch.allclose(model(x, plan), dense(x), atol=1e-5)
            assert dsnet.count_madds(model, plan, 64) == fvcore_conv_linear_madds(dense, 64)
            assert dsnet.count_params(model, plan) == sum(p.numel() for p in dense.parameters())


def test_the_gates_routed_training_forward_runs_a_toy_block_at_each_inputs_route():
    model = supernet_with_toy_blocks(img_size=32, small_input=True, widths=[0.35, 0.5, 0.75, 1.0])
    gated = insert_gate(model, GateConfig(routes=[0.35, 0.5, 1.0], input_width=1.0, block="blocks.3.0"),
                        batches=[torch.randn(8, 3, 32, 32)]).eval()
    assert any(isinstance(gated.supernet.block(i), ToyResidual)
               for i in range(gated.gate_index + 1, len(gated.supernet.block_specs)))
    x = torch.randn(12, 3, 32, 32)
    torch.manual_seed(0)
    logits, info = gated(x, gumbel_tau=1.0, return_info=True)
    assert len(set(info.routes.tolist())) > 1
    with torch.no_grad():
        for route in set(info.routes.tolist()):
            chosen = info.routes == route
            sliced = gated(x[chosen], route=route)
            assert torch.allclose(logits[chosen], sliced, atol=1e-5)
