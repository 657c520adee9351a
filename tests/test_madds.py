"""Analytic MAdds and parameter counts against an external counter (fvcore) on the exported dense subnets."""
import random

import pytest
import torch

import dsnet
from conftest import fvcore_conv_linear_madds, random_plan

pytest.importorskip("fvcore.nn")


@pytest.mark.parametrize("fixture,size", [("imagenet_supernet", 224), ("small_supernet", 32)])
def test_madds_and_params_match_external_counter_for_every_choice(request, fixture, size):
    model = request.getfixturevalue(fixture)
    for w in model.widths:
        dense = dsnet.export_subnet(model, w)
        assert dsnet.count_madds(model, w, size) == fvcore_conv_linear_madds(dense, size), f"width {w}"
        assert dsnet.count_params(model, w) == sum(p.numel() for p in dense.parameters()), f"width {w}"


@pytest.mark.parametrize("fixture,size", [("imagenet_supernet", 224), ("small_supernet", 32)])
def test_madds_match_external_counter_for_random_plans(request, fixture, size):
    model = request.getfixturevalue(fixture)
    rng = random.Random(11)
    for _ in range(2):
        plan = random_plan(model, rng)
        dsnet.recalibrate_bn(model, plan, [torch.randn(2, 3, size, size)])
        dense = dsnet.export_subnet(model, plan)
        assert dsnet.count_madds(model, plan, size) == fvcore_conv_linear_madds(dense, size)
        assert dsnet.count_params(model, plan) == sum(p.numel() for p in dense.parameters())


def test_published_mobilenetv2_madds():
    model = dsnet.create_supernet()  # 1000 classes, 224 px, as the papers count
    assert round(dsnet.count_madds(model, 1.0) / 1e6, 1) == 300.8
    assert round(dsnet.count_madds(model, 0.35) / 1e6, 1) == 59.3
    madds = [dsnet.count_madds(model, w) for w in model.widths]
    assert madds == sorted(madds) and len(set(madds)) == len(madds)
