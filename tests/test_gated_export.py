"""`python -m dsnet.export` of a gate checkpoint: the whole gated network as one torch.export program, one
TorchScript module or a directory of ONNX graphs, each run without dsnet and equal to the Python gated network."""
import inspect
import json
import os
import textwrap

import pytest
import torch

from conftest import DIGITS_DATA, run_command, run_without_dsnet, spread_routes
from dsnet.checkpoint import load_checkpoint, load_network, save_checkpoint, supernet_from_checkpoint
from dsnet.data import DataOptions, build_dataset, build_loader, calibration_batches
from dsnet.dense_gated import export_gated, run_onnx_routes
from dsnet.export import main
from dsnet.gate import GateConfig, insert_gate

TOLERANCE = {"export": 1e-5, "torchscript": 1e-5, "onnx": 1e-4}
ROUTES = [0.35, 0.75, 1.0]  # three, not the supernet's four: each route is one more branch to trace and export


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images():
    options = DataOptions(**DIGITS_DATA)
    return next(iter(build_loader(build_dataset(options, train=False), 128, train=False)))[0]


@pytest.fixture(scope="module")
def gate_checkpoint(digits_checkpoint, images, tmp_path_factory):
    """A gate checkpoint of the digits supernet: three routes, the layers before the gate at width 1.0 (so two
    routes have BN statistics of their own), the slimming head set to spread the validation images over them."""
    state = load_checkpoint(digits_checkpoint)
    supernet = supernet_from_checkpoint(state, "model")
    calibration = calibration_batches(DataOptions(**DIGITS_DATA), 2, 64)
    gated = insert_gate(supernet, GateConfig(routes=ROUTES, input_width=1.0), calibration)
    gated = spread_routes(gated.eval(), images)
    path = tmp_path_factory.mktemp("gate") / "gate.pth"
    save_checkpoint(path, {**state, "config": {**state["config"], "stage": "gate"},
                           "model_config": gated.supernet.config.to_dict(),
                           "gate": gated.config.to_dict(), "model": gated.state_dict(), "ema": None})
    return path


def batches(gated, images):
    """Batch 1, a batch holding every route, and a batch of two routes only (the others empty)."""
    with torch.no_grad():
        routes = gated(images, return_info=True)[1].routes
    assert set(routes.tolist()) == set(range(len(ROUTES))), "the fixture's gate should use every route"
    first_of = [int((routes == r).nonzero()[0]) for r in range(len(ROUTES))]
    two_routes = torch.cat([images[routes == 0][:3], images[routes == 2][:2]])  # route 1 empty
    return {"batch 1": images[first_of[2]:first_of[2] + 1], "mixed": images[:40], "two routes": two_routes}


def test_every_format_equals_the_gated_network_without_dsnet(gate_checkpoint, images, tmp_path, capsys):
    files = {"export": "gated.pt2", "torchscript": "gated.torchscript", "onnx": "gated-onnx"}
    for fmt, name in files.items():
        code, out, err = run_command(main, ["--checkpoint", gate_checkpoint, "--format", fmt,
                                            "--out", tmp_path / name], capsys)
        assert code == 0, err
        assert "same routes" in out
    gated = load_network(gate_checkpoint)
    inputs = batches(gated, images)
    expected = {}
    with torch.no_grad():
        for case, x in inputs.items():
            logits, info = gated(x, return_info=True)
            expected[case] = (logits, info.routes)
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "io.pt")
    # The ONNX runner is dsnet's own function, run from its source text.
    script = "import json\nimport torch\n" + textwrap.dedent(inspect.getsource(run_onnx_routes)) + textwrap.dedent("""
        io = torch.load("io.pt")
        program = torch.export.load("gated.pt2").module()
        scripted = torch.jit.load("gated.torchscript")
        report = {}
        for case, x in io["inputs"].items():
            onnx_logits, onnx_routes = run_onnx_routes("gated-onnx", x.numpy())
            outputs = {"export": program(x), "torchscript": scripted(x),
                       "onnx": (torch.from_numpy(onnx_logits), torch.from_numpy(onnx_routes))}
            logits, routes = io["expected"][case]
            report[case] = {fmt: [(out - logits).abs().max().item(), torch.equal(got.long(), routes)]
                            for fmt, (out, got) in outputs.items()}
        print(json.dumps(report))
    """)
    result = run_without_dsnet(script, tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    for case, by_format in report.items():
        scale = max(1.0, expected[case][0].abs().max().item())
        for fmt, (diff, same_routes) in by_format.items():
            assert same_routes, (case, fmt)
            assert diff <= TOLERANCE[fmt] * scale, (case, fmt, diff)


def test_dense_gated_network_computes_the_gated_network(gate_checkpoint, images):
    """The eager dense form, unfolded: the same routes and logits as the sliced gated network (float64)."""
    gated = load_network(gate_checkpoint)
    inputs = batches(gated, images)
    gated = gated.double()
    dense = export_gated(gated)
    for x in inputs.values():
        with torch.no_grad():
            logits, info = gated(x.double(), return_info=True)
            dense_logits, routes = dense(x.double())
        assert torch.equal(routes, info.routes)
        assert (dense_logits - logits).abs().max().item() <= 1e-10


@pytest.mark.parametrize("case", ["timm format", "stage-I checkpoint", "route never calibrated", "onnx over a file"])
def test_bad_input_fails_in_one_line_and_writes_nothing(gate_checkpoint, digits_checkpoint, tmp_path, capsys, case):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    checkpoint, fmt, out = gate_checkpoint, "export", out_dir / "gated.pt2"
    if case == "timm format":
        fmt = "timm"
    elif case == "stage-I checkpoint":
        checkpoint = digits_checkpoint
    elif case == "route never calibrated":
        state = load_checkpoint(gate_checkpoint)
        state["model"]["supernet.calibrated_plans"].zero_()  # the slots of the routes 0.35, 0.5 and 0.75 forgotten
        checkpoint = tmp_path / "uncalibrated.pth"
        save_checkpoint(checkpoint, state)
    elif case == "onnx over a file":
        fmt, out = "onnx", out_dir / "existing"
        out.write_text("keep me")
    code, _, err = run_command(main, ["--checkpoint", checkpoint, "--format", fmt, "--out", out], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    expected = {"timm format": "no timm form", "stage-I checkpoint": "without a gate",
                "route never calibrated": "route 0.35 were never collected",
                "onnx over a file": "not an empty directory"}[case]
    assert expected in err
    if case == "onnx over a file":
        assert os.listdir(out_dir) == ["existing"] and out.read_text() == "keep me"
    else:
        assert os.listdir(out_dir) == []
