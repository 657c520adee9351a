"""The gate-aware layout: a trunk of one width before `slim_from`, so that the width choices are the gate's routes."""
import contextlib
import copy
from pathlib import Path

import pytest
import torch

import dsnet
from dsnet.config import parse_config
from dsnet.errors import UserError
from dsnet.gate import GateConfig, insert_gate
from dsnet.stages import SupernetStage
from conftest import fvcore_conv_linear_madds, randomize_bn

REPO = Path(__file__).resolve().parent.parent
SIZE = 32
WIDTHS = [0.35, 0.5, 0.75, 1.0]


@pytest.fixture(scope="module")
def supernet():
    torch.manual_seed(3)
    model = dsnet.create_supernet(widths=WIDTHS, num_classes=10, small_input=True, img_size=SIZE,
                                  depth_multiplier=0.5, slim_from="blocks.3.0", trunk_width=0.5)
    randomize_bn(model)
    return model.eval()


def in_trunk(group: str) -> bool:
    """Whether a channel group comes before `blocks.3.0`'s projection: the stem, the streams of stages 0 to 2, and
    the hidden widths of their blocks and of `blocks.3.0` itself."""
    parts = group.split(".")
    if group == "stem":
        return True
    if parts[0] != "blocks":
        return False  # the head
    stage = int(parts[1])
    return stage < 3 or (len(parts) == 4 and stage == 3 and parts[2] == "0")


def test_the_trunk_keeps_its_width_and_the_rest_slims(supernet):
    ordinary = dsnet.create_supernet(widths=WIDTHS, num_classes=10, small_input=True, img_size=SIZE,
                                     depth_multiplier=0.5)
    trunk = [name for name in supernet.group_names if in_trunk(name)]
    assert "blocks.2" in trunk and "blocks.3.0.hidden" in trunk and "blocks.3.1.hidden" in supernet.group_names
    at_trunk_width = ordinary.resolve_width(0.5)
    for w, plan in zip(WIDTHS, supernet.choice_plans):
        assert plan.choice == WIDTHS.index(w)
        uniform = ordinary.resolve_width(w)
        for name in supernet.group_names:
            expected = at_trunk_width[name] if name in trunk else uniform[name]
            assert plan[name] == expected, f"width {w}, group {name}"
    # the trunk's layers are built at the trunk width: no weight wider than any width choice uses
    assert supernet.max_channels[supernet.group_names.index("blocks.2")] == at_trunk_width["blocks.2"]


def test_every_route_equals_its_dense_export_and_fvcore_counts_its_madds(supernet):
    x = torch.randn(3, 3, SIZE, SIZE)
    for w in WIDTHS:
        dense = dsnet.export_subnet(supernet, w).eval()
        with torch.no_grad():
            torch.testing.assert_close(dense(x), supernet(x, w), rtol=0, atol=1e-5)
        assert dsnet.count_madds(supernet, w, SIZE) == fvcore_conv_linear_madds(dense, SIZE), f"width {w}"


def test_a_gate_in_slim_from_routes_to_the_width_choices_exactly(supernet):
    """Each route is the width choice stage I trained, statistics included: with every width's statistics collected
    on the same batches, as stage I's last epoch does, the trunk's are the same in each."""
    supernet = copy.deepcopy(supernet)
    batches = [torch.randn(8, 3, SIZE, SIZE) for _ in range(2)]
    for w in WIDTHS:
        dsnet.recalibrate_bn(supernet, w, batches)
    gated = insert_gate(supernet, GateConfig(routes=WIDTHS, input_width=0.5, block="blocks.3.0")).eval()
    assert [plan.choice for plan in gated.route_plans] == [0, 1, 2, 3]
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        for r, w in enumerate(WIDTHS):
            torch.testing.assert_close(gated(x, route=r), supernet(x, w), rtol=0, atol=1e-5)
    madds = [dsnet.count_madds(supernet, w, SIZE) + gated.gate.madds() for w in WIDTHS]
    assert gated.route_madds(SIZE).tolist() == madds


@pytest.mark.parametrize("config,message", [
    (GateConfig(routes=WIDTHS, input_width=0.5, block="blocks.2.0"), "gate-aware from block blocks.3.0"),
    (GateConfig(routes=WIDTHS, input_width=1.0, block="blocks.3.0"), "have width 0.5"),
])
def test_a_gate_elsewhere_is_refused(supernet, config, message):
    with pytest.raises(ValueError, match=message):
        insert_gate(supernet, config)


def test_stage_one_draws_only_the_routes(monkeypatch):
    """Over many steps the sandwich runs only width choices of the gate-aware supernet, each of them a route."""
    argv = ["--slim-from", "blocks.3.0", "--trunk-width", "0.5", "--widths", *map(str, WIDTHS),
            "--num-random-plans", "0", "--num-random-widths", "2", "--img-size", "8"]
    config, explicit = parse_config(argv)
    stage = SupernetStage(config, explicit, resuming=False)
    model = stage.build_model(10, torch.device("cpu"), None).train()
    drawn = []
    forward = type(model).forward_features

    def recording(self, x, width=None, running_stats=True):
        drawn.append(self.resolve_width(width))
        return forward(self, x, width, running_stats)

    monkeypatch.setattr(type(model), "forward_features", recording)
    images, targets = torch.randn(4, 3, 8, 8), torch.randint(10, (4,))
    for step in range(40):
        stage.train_step(model, None, images, targets, step, lambda loss: None, contextlib.nullcontext)
    assert set(drawn) <= set(model.choice_plans)
    assert set(drawn) == set(model.choice_plans)  # and every route gets trained
    assert all(plan.choice is not None for plan in drawn)


@pytest.mark.parametrize("argv,message", [
    (["--slim-from", "blocks.3.0"], "--num-random-plans 0"),
    (["--slim-from", "blocks.3.1", "--num-random-plans", "0"], "first block of a stage"),
    (["--trunk-width", "0.5"], "needs slim_from"),
    (["--slim-from", "blocks.3.0", "--trunk-width", "1.5", "--num-random-plans", "0"], "largest width"),
])
def test_bad_gate_aware_flags_are_one_clear_error(argv, message):
    with pytest.raises(UserError, match=message):
        parse_config(argv)


def test_the_imagenet_gate_recipe_gates_the_gate_aware_supernet_and_its_header_gives_ds_nets_madds_loss():
    """configs/gate-imagenet.yaml on a configs/imagenet-gate-aware.yaml supernet: every route a width choice, and
    the square penalty its header gives is the function DS-Net's 0.5 · (MAdds / 1e9)² is at the widest route."""
    from dsnet.stages import gate_config_from_run
    from dsnet.summary import model_config_from_recipe

    recipe = REPO / "configs" / "gate-imagenet.yaml"
    supernet = dsnet.DSMobileNetV2(dsnet.SupernetConfig.from_dict(
        model_config_from_recipe(str(REPO / "configs" / "imagenet-gate-aware.yaml"))))
    config, _ = parse_config(["-c", str(recipe), "--init", "unused.pth"])
    gated = insert_gate(supernet, gate_config_from_run(config, supernet))
    assert all(plan.choice is not None for plan in gated.route_plans)
    assert gated.config.block == "blocks.3.0" and gated.config.input_width == 0.5
    assert config["sgs"] == "budget" and config["calibrate_target"]
    ds_net = next(line for line in recipe.read_text().splitlines() if "--madds-loss square" in line)
    weight = float(ds_net.split("--madds-loss-weight")[1].split()[0])
    widest = float(gated.route_madds(224)[-1])
    assert "--target-madds 1.0" in ds_net
    assert weight == pytest.approx(0.5 * (widest / 1e9) ** 2, rel=0.01)
