"""Pretrained timm weights in (`dsnet.from_timm`, `train.py --init-timm`): the supernet's largest width is the timm
MobileNetV2 it was given, logit for logit. timm's models are built with random weights; nothing is downloaded."""
import pytest
import timm
import torch

import dsnet
from dsnet.config import parse_config
from dsnet.errors import UserError
from dsnet.mobilenetv2 import TIMM_MODELS
from dsnet.train import main as train_main
from dsnet.trainer import Trainer

from conftest import TINY, randomize_bn, run_command


def timm_model(name, num_classes=10):
    """timm's model with random weights and distinct BN statistics, in eval mode."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=num_classes)
    randomize_bn(model)
    return model.eval()


@pytest.mark.parametrize("width", sorted(TIMM_MODELS))
def test_the_largest_width_is_the_timm_network(width):
    reference = timm_model(TIMM_MODELS[width])
    model = dsnet.from_timm(reference).eval()
    assert model.widths[-1] == width and all(w < width for w in model.widths[:-1])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model(x, width) - reference(x)).abs().max().item() <= 1e-5
        round_trip = dsnet.export_subnet(model, width).state_dict()
    assert all(torch.equal(round_trip[k], v) for k, v in reference.state_dict().items())


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_the_largest_width_is_the_timm_resnet(one_thread, name):
    reference = timm_model(name)
    model = dsnet.from_timm(reference).eval()
    assert model.arch == name and model.widths == (0.25, 0.5, 0.75, 1.0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() <= 1e-5
        round_trip = dsnet.export_subnet(model, 1.0).state_dict()
    assert all(torch.equal(round_trip[k], v) for k, v in reference.state_dict().items())


def test_a_small_input_mobilenetv2_holds_timms_weights_at_stride_one(one_thread):
    """With the small-input stem the largest width is timm's network with its stem and its second stage at stride 1:
    the same tensors, and timm's logits once timm's two strides are set to 1 as well."""
    reference = timm_model("mobilenetv2_100")
    model = dsnet.from_timm(reference, small_input=True).eval()
    own = dsnet.export_subnet(model, 1.0).state_dict()
    assert own.keys() == reference.state_dict().keys()
    assert all(torch.equal(own[k], v) for k, v in reference.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() > 1e-2  # another function of the same weights
        reference.conv_stem.stride = (1, 1)
        reference.blocks[1][0].conv_dw.stride = (1, 1)
        assert (model(x) - reference(x)).abs().max().item() <= 1e-5


def test_another_number_of_classes_reinitialises_only_the_classifier():
    state = timm_model("mobilenetv2_050", num_classes=1000).state_dict()
    model = dsnet.from_timm(state, widths=[0.35, 0.5], num_classes=10)
    own = dsnet.export_subnet(model, 0.5).state_dict()
    assert own["classifier.weight"].shape == (10, 1280)
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("classifier."))


@pytest.mark.parametrize("source,kwargs,message", [
    ("vit_tiny_patch16_224", {}, "not a timm MobileNetV2 or ResNet state dict: it has neither 'classifier.weight'"),
    ("resnet26", {}, "not the state dict of a timm resnet18, resnet34, resnet50"),
    ("resnet18", {"arch": "resnet50"}, "the timm weights are resnet18; they do not fit a resnet50 supernet"),
    ("resnet18", {"small_input": True}, "timm's resnet18 has no small_input"),
    ("resnet50", {"widths": [0.5, 0.75]}, "the supernet's widths must end at 1.0, not 0.75"),
    ("mobilenetv2_110d", {}, "not the state dict of a timm MobileNetV2 of widths [0.35, 0.5, 0.75, 1.0, 1.4]"),
    ("mobilenetv2_050", {"widths": [0.35, 1.0]}, "the supernet's widths must end at 0.5, not 1.0"),
    ("mobilenetv2_050", {"se_ratio": 0.25}, "timm's MobileNetV2 has no se_ratio"),
    ("mobilenetv2_050", {"stages": [[1, 16, 1, 1]] * 7}, "timm's MobileNetV2 has the full depth"),
])
def test_weights_that_do_not_fit_are_one_line_errors(source, kwargs, message):
    state = timm.create_model(source, num_classes=10).state_dict()
    with pytest.raises(UserError) as info:
        dsnet.from_timm(state, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


TIMM_RUN = ["--no-small-input", "--depth-multiplier", "1", "--widths", "0.35", "0.5"]


def test_train_py_starts_stage_one_from_a_timm_state_dict(tmp_path, capsys):
    state = timm_model("mobilenetv2_050", num_classes=1000).state_dict()
    torch.save({"state_dict": state}, tmp_path / "timm.pth")  # as timm's own training script saves
    config, explicit = parse_config([*TINY, *TIMM_RUN, "--init-timm", str(tmp_path / "timm.pth"),
                                     "--output", str(tmp_path / "run")])
    trainer = Trainer(config, explicit)
    assert "classifier re-initialised (1000 classes in the timm weights, 10 here)" in capsys.readouterr().out
    own = dsnet.export_subnet(trainer.model, 0.5).state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("classifier."))


@pytest.mark.parametrize("flags,message", [
    (["--init-timm", "WEIGHTS"], "timm's MobileNetV2 has the full depth"),
    ([*TIMM_RUN, "--init-timm", "mobilenetv3_large_100"], "is neither a file nor one of timm's mobilenetv2_035"),
    ([*TIMM_RUN, "--init-timm", "mobilenetv2_050"], "pass its weights as a state-dict file to --init-timm"),
])
def test_train_py_refuses_timm_weights_it_cannot_use_in_one_line(tmp_path, capsys, monkeypatch, flags, message):
    torch.save(timm.create_model("mobilenetv2_050", num_classes=10).state_dict(), tmp_path / "timm.pth")

    def offline(*args, **kwargs):
        raise RuntimeError("Hugging Face Hub is not reachable")

    monkeypatch.setattr(timm, "create_model", offline)  # the hub is never tried for real
    argv = [*TINY, *[str(tmp_path / "timm.pth") if f == "WEIGHTS" else f for f in flags],
            "--output", tmp_path / "run"]
    code, _, err = run_command(train_main, argv, capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_init_permute_puts_the_largest_bn_scales_first_and_keeps_the_function(tmp_path, capsys):
    """--init-permute: the largest width still computes the timm network; in every coupled group the channels now
    come in decreasing summed |γ|, so a narrower width keeps the group's largest-scale channels. Without it, the
    import keeps timm's order (which random γ leave unsorted)."""
    from dsnet.prune.groups import derive_groups

    reference = timm_model("mobilenetv2_050")
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    models = {}
    for flags in ([], ["--init-permute"]):
        config, explicit = parse_config([*TINY, *TIMM_RUN, "--init-timm", str(tmp_path / "timm.pth"), *flags,
                                         "--output", str(tmp_path / f"run{len(flags)}")])
        models[bool(flags)] = Trainer(config, explicit).model.eval()
    assert "reordered by BN scale" in capsys.readouterr().out
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
        # Reordered channels are summed in another order: 1e-5 of the logits' scale, as the export checks.
        assert (models[True](x, 0.5) - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())
    for permuted in (False, True):
        model = models[permuted]
        modules = dict(model.named_modules())
        sorted_groups = []
        for group in derive_groups(model):
            scale = sum(modules[bn].weight.abs() for bn in group.bns)
            sorted_groups.append(bool((scale[:-1] >= scale[1:]).all()))
        assert all(sorted_groups) == permuted and (permuted or not any(sorted_groups))


def test_init_permute_without_init_timm_is_one_line(tmp_path, capsys):
    code, _, err = run_command(train_main, [*TINY, "--init-permute", "--output", tmp_path / "run"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--init-permute reorders imported weights: it needs --init-timm" \
        in err, err
