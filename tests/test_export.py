"""The supernet at any width is exactly a smaller dense network."""
import random

import pytest
import timm
import torch

import dsnet
from conftest import random_plan


def max_abs(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("fixture,size", [("imagenet_supernet", 224), ("small_supernet", 32)])
def test_every_width_choice_equals_its_dense_subnet(request, fixture, size):
    model = request.getfixturevalue(fixture)
    x = torch.randn(2, 3, size, size)
    for i, w in enumerate(model.widths):
        dense = dsnet.export_subnet(model, w)
        with torch.no_grad():
            assert max_abs(model(x, w), dense(x)) <= 1e-5, f"width {w}"
            assert max_abs(model(x, i), dense(x)) <= 1e-5, f"choice index {i}"


@pytest.mark.parametrize("fixture,size", [("imagenet_supernet", 224), ("small_supernet", 32)])
def test_random_per_layer_plans_equal_their_dense_subnets(request, fixture, size):
    model = request.getfixturevalue(fixture)
    rng = random.Random(7)
    x = torch.randn(2, 3, size, size)
    for _ in range(2):
        plan = random_plan(model, rng)
        dsnet.recalibrate_bn(model, plan, [torch.randn(4, 3, size, size) for _ in range(2)])
        dense = dsnet.export_subnet(model, plan)
        for name, conv in dense.named_modules():
            if isinstance(conv, torch.nn.Conv2d) and name.endswith("conv_pw") and name.startswith("blocks.1."):
                assert conv.out_channels == plan[name.replace("conv_pw", "hidden")]
        with torch.no_grad():
            assert max_abs(model(x, plan), dense(x)) <= 1e-5


TIMM_NAMES = {0.35: "mobilenetv2_035", 0.5: "mobilenetv2_050", 0.75: "mobilenetv2_075", 1.0: "mobilenetv2_100",
              1.4: "mobilenetv2_140"}


@pytest.fixture(scope="module")
def supernet_to_140():
    from conftest import randomize_bn
    torch.manual_seed(3)
    model = dsnet.create_supernet(num_classes=10, widths=[0.35, 0.5, 0.75, 1.0, 1.4])
    randomize_bn(model)
    return model.eval()


@pytest.mark.parametrize("width", sorted(TIMM_NAMES))
def test_dense_subnet_is_timm_mobilenetv2(supernet_to_140, width):
    dense = dsnet.export_subnet(supernet_to_140, width)
    reference = timm.create_model(TIMM_NAMES[width], num_classes=10).eval()
    ours = {k: v.shape for k, v in dense.state_dict().items()}
    theirs = {k: v.shape for k, v in reference.state_dict().items()}
    assert ours == theirs  # every layer, same name and same channel counts
    assert sum(p.numel() for p in dense.parameters()) == sum(p.numel() for p in reference.parameters())
    reference.load_state_dict(dense.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert max_abs(reference(x), dense(x)) <= 1e-5
        assert max_abs(reference(x), supernet_to_140(x, width)) <= 1e-5


@pytest.mark.parametrize("depth_multiplier", [0.5, 1.4])
def test_depth_multiplier_is_timms(depth_multiplier):
    """`depth_multiplier` builds the blocks timm's MobileNetV2 generator builds with the same multiplier."""
    from timm.models.efficientnet import _gen_mobilenet_v2

    torch.manual_seed(4)
    model = dsnet.create_supernet(num_classes=10, widths=[0.5, 1.0], depth_multiplier=depth_multiplier).eval()
    dense = dsnet.export_subnet(model, 1.0)
    reference = _gen_mobilenet_v2("mobilenetv2_100", depth_multiplier=depth_multiplier, num_classes=10).eval()
    assert {k: v.shape for k, v in dense.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    reference.load_state_dict(dense.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_abs(reference(x), model(x, 1.0)) <= 1e-5


def test_squeeze_excitation_blocks_export_exactly():
    model = dsnet.create_supernet(num_classes=10, small_input=True, se_ratio=0.25, widths=[0.5, 0.75, 1.0]).eval()
    x = torch.randn(2, 3, 32, 32)
    for w in model.widths:
        dense = dsnet.export_subnet(model, w)
        with torch.no_grad():
            assert max_abs(model(x, w), dense(x)) <= 1e-5
    assert dsnet.count_params(model, 0.5) == sum(p.numel() for p in dsnet.export_subnet(model, 0.5).parameters())


def test_exported_subnet_traces_and_exports_to_onnx(small_supernet, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    dense = dsnet.export_subnet(small_supernet, 0.5)
    x = torch.randn(2, 3, 32, 32)
    traced = torch.jit.trace(dense, x)
    with torch.no_grad():
        expected = dense(x)
        assert max_abs(traced(x), expected) <= 1e-5
    path = tmp_path / "subnet.onnx"
    torch.onnx.export(dense, (x,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": x.numpy()})
    assert max_abs(torch.from_numpy(out), expected) <= 1e-4
