"""`python -m dsnet.export`: every format reloads to the supernet's output, and bad input fails in one line."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch

import dsnet
from conftest import DIGITS_SIZE, randomize_bn, run_without_dsnet
from dsnet.checkpoint import load_checkpoint, load_supernet, save_checkpoint
from dsnet.cli import run_main
from dsnet.data import DataOptions, calibration_batches
from dsnet.export import main

TOLERANCE = {"export": 1e-5, "torchscript": 1e-5, "pt": 1e-5, "onnx": 1e-4}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Small models: one thread is about as fast, and two oversubscribe a shared two-core machine badly.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def imagenet_checkpoint(tmp_path_factory):
    """An ImageNet-layout supernet (the timm format's only kind) with random BN statistics."""
    torch.manual_seed(4)
    model = dsnet.create_supernet(num_classes=10)
    randomize_bn(model)
    path = tmp_path_factory.mktemp("imagenet") / "checkpoint.pth"
    save_checkpoint(path, {"model_config": model.config.to_dict(), "model": model.state_dict(), "ema": None,
                           "config": {"data": "digits", "img_size": 224}})
    return path


def max_abs(a, b):
    return (torch.as_tensor(a) - b).abs().max().item()


def digits_input(n=4):
    return torch.randn(n, 3, DIGITS_SIZE, DIGITS_SIZE, generator=torch.Generator().manual_seed(5))


def load_and_run(fmt, path, x):
    if fmt == "export":
        return torch.export.load(str(path)).module()(x)
    if fmt == "torchscript":
        return torch.jit.load(str(path))(x)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])
    return torch.load(path, weights_only=False)(x)


def fails_in_one_line(argv, capsys):
    """Run the command as `python -m` would; return its stderr after checking it is one `error:` line, status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("fmt", ["export", "torchscript", "onnx", "pt"])
def test_each_format_reloads_to_the_supernet_output(digits_checkpoint, tmp_path, capsys, fmt):
    out = tmp_path / f"subnet.{fmt}"
    assert main(["--checkpoint", str(digits_checkpoint), "--width", "0.5", "--format", fmt, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert ("warning: a pt file is a pickle" in captured.err) == (fmt == "pt")
    model = load_supernet(digits_checkpoint)
    x = digits_input()
    with torch.no_grad():
        assert max_abs(load_and_run(fmt, out, x), model(x, 0.5)) <= TOLERANCE[fmt]
    assert f"params {dsnet.count_params(model, 0.5) / 1e6:.3f}M" in printed
    assert f"MAdds {dsnet.count_madds(model, 0.5, DIGITS_SIZE) / 1e6:.2f}M at {DIGITS_SIZE}×{DIGITS_SIZE}" in printed
    assert "max abs diff" in printed
    assert os.listdir(tmp_path) == [out.name]  # no temporary file left beside it


@pytest.mark.parametrize("fmt", ["export", "torchscript", "onnx"])
def test_deployed_formats_fold_batch_norm_unless_asked_to_keep_it(digits_checkpoint, tmp_path, capsys, fmt):
    """The folded file has no BatchNorm left and still computes the supernet's width (the command's own check
    passed, and here again on other inputs); --keep-bn keeps one per convolution that had it."""
    model = load_supernet(digits_checkpoint)
    x = digits_input()
    counts = {}
    for flags in ([], ["--keep-bn"]):
        out = tmp_path / f"subnet{len(flags)}.{fmt}"
        assert main(["--checkpoint", str(digits_checkpoint), "--width", "0.5", "--format", fmt, "--out", str(out),
                     *flags]) == 0
        assert ("BatchNorm folded" in capsys.readouterr().out) == (not flags)
        with torch.no_grad():
            expected = model(x, 0.5)
            assert max_abs(load_and_run(fmt, out, x), expected) <= TOLERANCE[fmt] * max(1, expected.abs().max())
        if fmt == "onnx":
            import onnx

            counts[bool(flags)] = [node.op_type for node in onnx.load(str(out)).graph.node].count("BatchNormalization")
        elif fmt == "export":
            nodes = torch.export.load(str(out)).graph.nodes
            counts[bool(flags)] = sum("batch_norm" in str(node.target) for node in nodes)
        else:
            counts[bool(flags)] = str(torch.jit.load(str(out)).inlined_graph).count("aten::batch_norm")
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in dsnet.export_subnet(model, 0.5).modules())
    assert counts == {False: 0, True: bns} and bns > 30


def test_timm_export_loads_strictly_into_timm_mobilenetv2(imagenet_checkpoint, tmp_path, capsys):
    out = tmp_path / "mobilenetv2_050.pth"
    assert main(["--checkpoint", str(imagenet_checkpoint), "--width", "0.5", "--format", "timm",
                 "--out", str(out)]) == 0
    assert "timm model: mobilenetv2_050" in capsys.readouterr().out
    reference = timm.create_model("mobilenetv2_050", num_classes=10)
    reference.load_state_dict(torch.load(out, weights_only=True), strict=True)
    model = load_supernet(imagenet_checkpoint)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert max_abs(reference.eval()(x), model(x, 0.5)) <= 1e-5


def test_export_torchscript_and_onnx_run_without_dsnet(digits_checkpoint, tmp_path):
    for fmt in ("export", "torchscript", "onnx"):
        main(["--checkpoint", str(digits_checkpoint), "--width", "0.75", "--format", fmt,
              "--out", str(tmp_path / f"subnet.{fmt}")])
    x = digits_input()
    with torch.no_grad():
        expected = load_supernet(digits_checkpoint)(x, 0.75)
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent("""
        import onnxruntime, torch
        io = torch.load("io.pt")
        program = torch.export.load("subnet.export").module()(io["x"])
        scripted = torch.jit.load("subnet.torchscript")(io["x"])
        session = onnxruntime.InferenceSession("subnet.onnx", providers=["CPUExecutionProvider"])
        onnx_out = torch.from_numpy(session.run(["logits"], {"input": io["x"].numpy()})[0])
        print(*((out - io["expected"]).abs().max().item() for out in (program, scripted, onnx_out)))
    """)
    result = run_without_dsnet(script, tmp_path)
    assert result.returncode == 0, result.stderr
    export_diff, torchscript_diff, onnx_diff = map(float, result.stdout.split())
    assert export_diff <= 1e-5 and torchscript_diff <= 1e-5 and onnx_diff <= 1e-4


@pytest.fixture(scope="module")
def custom_plan(digits_checkpoint, tmp_path_factory):
    """A plan that is no width choice: the stem and first stages of 1.0, the rest of 0.35."""
    model = load_supernet(digits_checkpoint)
    plan = model.resolve_width([1.0] * 4 + [0.35] * 5)
    assert plan.choice is None
    path = tmp_path_factory.mktemp("plans") / "plan.json"
    path.write_text(json.dumps({"plan": plan.as_dict()}))
    return plan, path


def test_custom_plan_exports_after_bn_recalibration(digits_checkpoint, custom_plan, tmp_path):
    plan, plan_file = custom_plan
    out = tmp_path / "subnet.torchscript"
    assert main(["--checkpoint", str(digits_checkpoint), "--plan", str(plan_file), "--recalibrate-bn", "2",
                 "--batch-size", "32", "--format", "torchscript", "--keep-bn", "--out", str(out)]) == 0
    # The same recalibration by hand: the checkpoint's training data, the same seeded batches.
    model = load_supernet(digits_checkpoint)
    config = load_checkpoint(digits_checkpoint)["config"]
    dsnet.recalibrate_bn(model, plan, calibration_batches(DataOptions.from_config(config), 2, batch_size=32))
    x = digits_input()
    with torch.no_grad():
        assert max_abs(torch.jit.load(str(out))(x), model(x, plan)) <= 1e-5


def test_custom_plan_without_recalibration_is_refused(digits_checkpoint, custom_plan, tmp_path, capsys):
    err = fails_in_one_line(["--checkpoint", str(digits_checkpoint), "--plan", str(custom_plan[1]),
                             "--format", "torchscript", "--out", str(tmp_path / "subnet.pt")], capsys)
    assert "--recalibrate-bn" in err
    assert os.listdir(tmp_path) == []


def test_custom_plan_calibrated_in_the_checkpoint_exports_as_it_is(digits_checkpoint, custom_plan, tmp_path):
    plan, plan_file = custom_plan
    model = load_supernet(digits_checkpoint)
    dsnet.recalibrate_bn(model, plan, [digits_input(16) for _ in range(2)])
    calibrated = tmp_path / "calibrated.pth"
    save_checkpoint(calibrated, {"model_config": model.config.to_dict(), "model": model.state_dict(), "ema": None})
    out = tmp_path / "subnet.pt"
    assert main(["--checkpoint", str(calibrated), "--plan", str(plan_file), "--format", "pt",
                 "--out", str(out)]) == 0
    x = digits_input()
    with torch.no_grad():
        assert max_abs(torch.load(out, weights_only=False)(x), model(x, plan)) <= 1e-5


def write_plan(directory, plan):
    path = directory / "bad_plan.json"
    path.write_text(json.dumps(plan))
    return str(path)


@pytest.mark.parametrize("case", ["missing checkpoint", "channels above the max", "zero channels", "unknown layer",
                                  "missing output directory", "timm of a custom plan", "timm of a small-input net",
                                  "width not a choice", "check fails"])
def test_bad_input_fails_in_one_line_and_writes_nothing(digits_checkpoint, imagenet_checkpoint, tmp_path, capsys,
                                                        monkeypatch, case):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    model = load_supernet(digits_checkpoint)
    plan = model.largest.as_dict()
    args = {"--checkpoint": str(digits_checkpoint), "--width": "0.5", "--format": "torchscript",
            "--out": str(out_dir / "subnet")}
    if case == "missing checkpoint":
        args["--checkpoint"] = str(tmp_path / "nope.pth")
    elif case == "channels above the max":
        args.pop("--width")
        args["--plan"] = write_plan(tmp_path, {**plan, "blocks.3": plan["blocks.3"] + 8})
    elif case == "zero channels":
        args.pop("--width")
        args["--plan"] = write_plan(tmp_path, {**plan, "head": 0})
    elif case == "unknown layer":
        args.pop("--width")
        args["--plan"] = write_plan(tmp_path, {**plan, "blocks.9": 8})
    elif case == "missing output directory":
        args["--out"] = str(out_dir / "missing" / "subnet")
    elif case == "timm of a custom plan":
        imagenet = load_supernet(imagenet_checkpoint)
        args.pop("--width")
        args.update({"--checkpoint": str(imagenet_checkpoint), "--format": "timm",
                     "--plan": write_plan(tmp_path, imagenet.resolve_width([1.0] * 4 + [0.5] * 5).as_dict())})
    elif case == "timm of a small-input net":
        args["--format"] = "timm"
    elif case == "width not a choice":
        args["--width"] = "0.6"
    elif case == "check fails":
        monkeypatch.setitem(dsnet.export.TOLERANCES, "torchscript", -1.0)
    err = fails_in_one_line([item for pair in args.items() for item in pair], capsys)
    expected = {"missing checkpoint": "does not exist", "channels above the max": "allowed: 1..64",
                "zero channels": "'head' 0 channels", "unknown layer": "blocks.9",
                "missing output directory": "does not exist", "timm of a custom plan": "uniform width",
                "timm of a small-input net": "small-input", "width not a choice": "[0.35, 0.5, 0.75, 1.0]",
                "check fails": "differs from the supernet"}[case]
    assert expected in err
    assert os.listdir(out_dir) == []


def test_command_line_pickles_the_package_classes(digits_checkpoint, tmp_path):
    out = tmp_path / "subnet.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", "dsnet.export", "--checkpoint", str(digits_checkpoint),
                             "--width", "0.35", "--format", "pt", "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stderr.startswith("warning: a pt file is a pickle"), result.stderr
    assert result.stderr.count("\n") == 1
    dense = torch.load(out, weights_only=False)
    assert type(dense.blocks[2][1]).__module__ == "dsnet.export"  # a residual block, not a class of __main__
    x = digits_input()
    with torch.no_grad():
        assert max_abs(dense(x), load_supernet(digits_checkpoint)(x, 0.35)) <= 1e-5


def test_unknown_format_is_rejected_by_the_parser(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", "x.pth", "--width", "0.5", "--format", "tflite", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
