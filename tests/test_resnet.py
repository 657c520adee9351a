"""DS-ResNet supernets against their references: the dense export (every width and random plans), fvcore's counts on
that export, and timm's resnet18/resnet50 at width 1.0."""
import random

import pytest
import timm
import torch

import dsnet
from conftest import fvcore_conv_linear_madds, random_plan, randomize_bn


def _supernet(arch, **kw):
    torch.manual_seed(3)
    model = dsnet.create_model({"arch": arch, "num_classes": 10, **kw})
    randomize_bn(model)  # also undoes the zero-initialised last BNs, which would hide every residual branch
    return model.eval()


@pytest.mark.parametrize("arch,size,kw", [("resnet18", 64, {}), ("resnet50", 64, {}), ("resnet20", 32, {}),
                                          ("resnet18", 16, {"small_input": True})])
def test_every_width_and_random_plans_equal_their_dense_export_and_fvcore(one_thread, arch, size, kw):
    model = _supernet(arch, **kw)
    x = torch.randn(2, 3, size, size)
    rng = random.Random(5)
    plans = list(model.widths) + [random_plan(model, rng) for _ in range(2)]
    with torch.no_grad():
        for width in plans:
            if isinstance(width, dict):
                dsnet.recalibrate_bn(model, width, [torch.randn(4, 3, size, size)])
            dense = dsnet.export_subnet(model, width)
            torch.testing.assert_close(dense(x), model(x, width=width), rtol=0, atol=1e-5)
            assert dsnet.count_madds(model, width, size) == fvcore_conv_linear_madds(dense, size), width
            assert dsnet.count_params(model, width) == sum(p.numel() for p in dense.parameters()), width


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_width_one_export_loads_strictly_into_timm_with_the_same_logits(one_thread, arch):
    model = _supernet(arch)
    reference = timm.create_model(arch, num_classes=10).eval()
    reference.load_state_dict(dsnet.export_subnet(model, 1.0).state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), model(x), rtol=0, atol=1e-5)


def test_timm_madds_at_224_and_the_cifar_layouts_published_size():
    # ResNet-50 at 224 px: 4.09G multiply-accumulates (fvcore, timm); ResNet-20 on CIFAR: 0.27M parameters (He et al.)
    resnet50 = dsnet.create_model({"arch": "resnet50"})
    assert round(dsnet.count_madds(resnet50, 1.0, 224) / 1e9, 2) == 4.09
    resnet20 = dsnet.create_model({"arch": "resnet20", "num_classes": 10})
    assert round(dsnet.count_params(resnet20, 1.0) / 1e6, 2) == 0.27
    madds = [dsnet.count_madds(resnet20, w, 32) for w in resnet20.widths]
    assert madds == sorted(madds) and len(set(madds)) == len(madds)


def test_the_first_stage_of_a_basic_resnet_shares_the_stem_group_and_a_bottleneck_has_its_own():
    resnet18 = dsnet.create_model({"arch": "resnet18"})
    assert "layer1" not in resnet18.group_names and resnet18.block_specs[0].in_group == 0
    assert resnet18.block_specs[0].out_group == 0 and resnet18.block_specs[0].has_skip
    resnet50 = dsnet.create_model({"arch": "resnet50"})
    spec = resnet50.block_specs[0]
    assert resnet50.group_names[spec.out_group] == "layer1" and not spec.has_skip
    # every block of a stage adds to one stream
    assert {s.out_group for s in resnet50.block_specs if s.name.startswith("layer3.")} == \
        {resnet50.group_names.index("layer3")}


def test_gate_aware_resnet_keeps_the_trunk_width_before_slim_from():
    model = dsnet.create_model({"arch": "resnet20", "num_classes": 10, "slim_from": "layer2.0"})
    stem = {plan.channels[0] for plan in model.choice_plans}
    assert stem == {16}
    layer3 = model.group_names.index("layer3")
    assert [plan.channels[layer3] for plan in model.choice_plans] == [16, 32, 48, 64]
    with pytest.raises(ValueError, match="first block of a stage"):
        dsnet.create_model({"arch": "resnet20", "slim_from": "layer2.1"})


def test_unknown_arch_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown arch 'resnet101'.*mobilenetv2.*resnet50"):
        dsnet.create_model({"arch": "resnet101"})


# ---- the commands on a DS-ResNet: stage I, eval, export, search, prune ---------------------------------------------


@pytest.fixture(scope="module")
def resnet20_checkpoint(tmp_path_factory):
    """Stage I of a CIFAR-layout ResNet-20 on digits, three epochs through train.py."""
    from conftest import TINY
    from dsnet.train import main as train_main

    out = tmp_path_factory.mktemp("resnet20") / "run"
    assert train_main([*TINY, "--arch", "resnet20", "--widths", "0.25", "0.5", "0.75", "1.0", "--epochs", "3",
                       "--batch-size", "64", "--no-ema", "--output", str(out)]) == 0
    return out / "best.pth"


def test_stage_one_trains_a_resnet_that_eval_measures_at_every_width(one_thread, resnet20_checkpoint, tmp_path):
    import json

    from dsnet.checkpoint import load_checkpoint
    from dsnet.evaluate import main as eval_main

    state = load_checkpoint(resnet20_checkpoint)
    assert state["model_config"]["arch"] == "resnet20"
    report = tmp_path / "eval.json"
    assert eval_main(["--checkpoint", str(resnet20_checkpoint), "--no-latency", "--no-progress",
                      "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["rows"]
    assert [r["width"] for r in rows] == [0.25, 0.5, 0.75, 1.0]
    assert rows[-1]["top1"] > 30  # ten classes: chance is 10%
    model = dsnet.load_supernet(resnet20_checkpoint)
    assert [r["madds"] for r in rows] == [dsnet.count_madds(model, w, 8) for w in model.widths]


@pytest.mark.parametrize("fmt", ["export", "torchscript", "onnx"])
def test_a_resnet_width_exports_and_reloads_to_the_supernet_output(one_thread, resnet20_checkpoint, tmp_path, fmt):
    from dsnet.export import main as export_main

    out = tmp_path / f"subnet.{fmt}"
    assert export_main(["--checkpoint", str(resnet20_checkpoint), "--width", "0.5", "--format", fmt,
                        "--out", str(out)]) == 0  # the command reloads the file and checks it against the supernet
    assert out.exists()


def test_timm_format_of_a_cifar_resnet_is_a_one_line_error(resnet20_checkpoint, tmp_path, capsys):
    from conftest import run_command
    from dsnet.export import main as export_main

    code, _, err = run_command(export_main, ["--checkpoint", resnet20_checkpoint, "--width", "1.0", "--format",
                                             "timm", "--out", tmp_path / "x.pth"], capsys)
    assert code == 2 and err.count("\n") == 1 and "timm registers no CIFAR ResNet (resnet20)" in err
    assert not list(tmp_path.iterdir())


def test_search_and_prune_run_on_a_resnet(one_thread, resnet20_checkpoint, tmp_path):
    import json

    from dsnet.prune.__main__ import main as prune_main
    from dsnet.search import main as search_main

    model = dsnet.load_supernet(resnet20_checkpoint)
    largest = dsnet.count_madds(model, 1.0, 8)
    assert search_main(["--checkpoint", str(resnet20_checkpoint), "--target-madds", str(int(0.6 * largest)),
                        "--steps", "2", "--eval-batches", "1", "--out", str(tmp_path / "plan.json")]) == 0
    for method in ("l1", "dcp"):  # DCP selects the input channels of 3×3 consumers from their unfolded patches
        assert prune_main(["--checkpoint", str(resnet20_checkpoint), "--method", method, "--target-madds", "0.5",
                           "--epochs", "0", "--finetune-epochs", "0", "--batch-size", "32", "--score-batches", "1",
                           "--out", str(tmp_path / method)]) == 0
        report = json.loads((tmp_path / method / "report.json").read_text())
        assert 0.4 * largest < report["pruned"]["madds"] <= report["target_madds"] == round(0.5 * largest)


def test_prune_groups_of_a_bottleneck_resnet_are_its_channel_groups():
    from dsnet.prune.groups import derive_groups

    model = dsnet.create_model({"arch": "resnet50", "num_classes": 10})
    groups = {g.name: g for g in derive_groups(model)}
    assert list(groups) == list(model.group_names)
    # layer2's stream is written by its downsampling and by the last convolution of each of its 4 blocks
    assert sorted(groups["layer2"].producers) == sorted(
        ["layer2.0.downsample.0"] + [f"layer2.{j}.conv3" for j in range(4)])
    assert groups["layer2.1.reduce"].producers == ["layer2.1.conv1"]


def test_train_py_starts_a_resnet_from_timm_weights_reordered_by_bn_scale(one_thread, tmp_path, capsys):
    from conftest import TINY
    from dsnet.config import parse_config
    from dsnet.trainer import Trainer

    torch.manual_seed(0)
    reference = timm.create_model("resnet18", num_classes=10)
    randomize_bn(reference)
    reference.eval()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    config, explicit = parse_config([*TINY, "--arch", "resnet18", "--no-small-input", "--widths", "0.5", "1.0",
                                     "--init-timm", str(tmp_path / "resnet18.pth"), "--init-permute",
                                     "--output", str(tmp_path / "run")])
    model = Trainer(config, explicit).model.eval()
    assert "reordered by BN scale" in capsys.readouterr().out
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x)
        assert (model(x) - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("flags,message", [
    (["--arch", "resnet20", "--se-ratio", "0.25"], "--se-ratio is MobileNetV2's; resnet20 has no squeeze-excitation"),
    (["--arch", "resnet20", "--slim-from", "blocks.3.0", "--num-random-plans", "0"],
     "slim_from must be the first block of a stage (layer1.0, layer2.0, layer3.0)"),
    (["--arch", "resnet101"], "invalid choice: 'resnet101'"),
])
def test_resnet_flags_that_do_not_fit_are_one_line_errors(tmp_path, capsys, flags, message):
    from conftest import TINY, run_command
    from dsnet.train import main as train_main

    code, _, err = run_command(train_main, [*TINY, *flags, "--output", tmp_path / "run"], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("arch,block", [("resnet20", "layer2.0"), ("resnet50", "layer3.0"), ("resnet18", "layer1.0")])
def test_a_gated_resnet_runs_each_route_as_the_supernet_and_exports_to_it(one_thread, arch, block):
    """The gate reads the gate block's input and the whole block runs at the route's width (projection shortcut:
    resnet20, resnet50; identity: resnet18's layer1.0). Each route equals the supernet at the route's plan, and the
    dense gated network (routing inside) equals the gated network on a batch split over all routes."""
    from conftest import spread_routes
    from dsnet.dense_gated import export_gated
    from dsnet.gate import GateConfig, insert_gate

    model = _supernet(arch)
    x = torch.randn(12, 3, 32, 32)
    gated = insert_gate(model, GateConfig(routes=[0.25, 0.5, 1.0], block=block, input_width=1.0), [x], 1)
    gated = spread_routes(gated.eval(), x)
    with torch.no_grad():
        for r, plan in enumerate(gated.route_plans):
            torch.testing.assert_close(gated(x, route=r), model(x, width=plan), rtol=0, atol=1e-5)
        logits, info = gated(x, return_info=True)
        assert len(set(info.routes.tolist())) == 3
        dense_logits, dense_routes = export_gated(gated)(x)
    assert torch.equal(dense_routes, info.routes)
    torch.testing.assert_close(dense_logits, logits, rtol=0, atol=1e-5)


def test_stage_two_trains_a_gate_on_a_resnet_that_eval_and_export_run(one_thread, resnet20_checkpoint, tmp_path):
    import json

    from dsnet.evaluate import main as eval_main
    from dsnet.export import main as export_main
    from dsnet.train import main as train_main

    assert train_main(["--stage", "gate", "--init", str(resnet20_checkpoint), "--epochs", "1", "--batch-size", "256",
                       "--gate-calibration-batches", "2", "--output", str(tmp_path / "gate")]) == 0
    gate = tmp_path / "gate" / "best.pth"
    gated = dsnet.load_network(gate)
    assert gated.config.block == "layer2.0"  # the middle stage's first block
    report = tmp_path / "eval.json"
    assert eval_main(["--mode", "dynamic", "--checkpoint", str(gate), "--no-latency", "--no-progress",
                      "--json", str(report)]) == 0
    row = json.loads(report.read_text())["rows"][0]
    madds = gated.route_madds(8)
    assert madds.min().item() <= row["madds"] <= madds.max().item()
    # the command reloads the file and checks its logits and routes against the gated network
    assert export_main(["--checkpoint", str(gate), "--format", "torchscript", "--out", str(tmp_path / "g.ts")]) == 0


def test_prune_an_ordinary_timm_resnet(one_thread, tmp_path):
    """python -m dsnet.prune --from-timm: no supernet checkpoint, the timm network itself is scored, cut to half its
    MAdds (counted by fvcore on timm's model and on the written network) and exported."""
    import json

    from dsnet.prune.__main__ import main as prune_main

    torch.manual_seed(0)
    reference = timm.create_model("resnet18", num_classes=10).eval()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    out = tmp_path / "pruned"
    assert prune_main(["--from-timm", str(tmp_path / "resnet18.pth"), "--arch", "resnet18", "--data", "digits",
                       "--img-size", "16", "--method", "bn-scale", "--target-madds", "0.5", "--epochs", "0",
                       "--finetune-epochs", "0", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    full = fvcore_conv_linear_madds(reference, 16)
    assert report["largest"]["madds"] == full and report["arch"] == "resnet18" and report["weights"] == "timm"
    assert 0.4 * full < report["pruned"]["madds"] <= round(0.5 * full)
    network = torch.load(out / "model.pt", weights_only=False)
    assert fvcore_conv_linear_madds(network, 16) == report["pruned"]["madds"]


@pytest.mark.parametrize("flags,message", [
    (["--from-timm", "W", "--arch", "resnet50", "--data", "digits"],
     "the timm weights are resnet18; they do not fit a resnet50 supernet"),
    (["--from-timm", "W"], "--from-timm needs --data"),
    (["--from-timm", "W", "--data", "digits", "--weights", "ema"], "--from-timm has one set"),
])
def test_prune_from_timm_bad_input_is_one_line(tmp_path, capsys, flags, message):
    from conftest import run_command
    from dsnet.prune.__main__ import main as prune_main

    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), tmp_path / "w.pth")
    argv = [str(tmp_path / "w.pth") if f == "W" else f for f in flags]
    code, _, err = run_command(prune_main, [*argv, "--method", "l1", "--out", tmp_path / "out"], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_timm_export_of_a_resnet50_checkpoint_loads_strictly_into_timm(one_thread, tmp_path, capsys):
    from conftest import run_command
    from dsnet.checkpoint import save_checkpoint
    from dsnet.export import main as export_main

    model = _supernet("resnet50")
    checkpoint = tmp_path / "resnet50.pth"
    save_checkpoint(checkpoint, {"model_config": model.config.to_dict(), "model": model.state_dict(), "ema": None,
                                 "config": {"data": "digits", "img_size": 64}})
    out = tmp_path / "resnet50-timm.pth"
    assert export_main(["--checkpoint", str(checkpoint), "--width", "1.0", "--format", "timm", "--out", str(out)]) == 0
    assert "timm model: resnet50" in capsys.readouterr().out
    reference = timm.create_model("resnet50", num_classes=10).eval()
    reference.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), model(x), rtol=0, atol=1e-5)
    wrong = tmp_path / "half.pth"
    code, _, err = run_command(export_main, ["--checkpoint", checkpoint, "--width", "0.5", "--format", "timm",
                                             "--out", wrong], capsys)
    assert code == 2 and "timm registers resnet50 at width 1.0 only, not 0.5" in err and not wrong.exists()
