"""python -m dsnet.prune end to end on the digits checkpoint: every method meets a MAdds target, and bad input is
one line and exit status 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsnet
from dsnet.checkpoint import load_checkpoint, supernet_from_checkpoint
from dsnet.data import DataOptions, build_dataset, build_loader
from dsnet.cli import parse_args_with_config
from dsnet.prune.__main__ import build_parser, main as prune_main
from dsnet.prune import gate_decorator
from dsnet.prune.methods import METHODS

from conftest import DIGITS_DATA, DIGITS_SIZE, fvcore_conv_linear_madds, run_command

pytest.importorskip("fvcore.nn")

QUICK = ["--epochs", "1", "--finetune-epochs", "0", "--recalibrate-batches", "2", "--score-batches", "2"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_meets_half_the_madds(method, digits_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / method
    # Taylor scores the network at every tick of its tick-tock schedule and DCP solves a problem per layer on the
    # score batches: smaller batches, and for Taylor fewer, larger ticks, keep the test short.
    monkeypatch.setattr(gate_decorator, "TICK_FRACTION", 0.06)
    extra = {"taylor": ["--batch-size", "32", "--score-batches", "1"], "dcp": ["--batch-size", "32"]}.get(method, [])
    assert prune_main(["--checkpoint", str(digits_checkpoint), "--method", method, "--target-madds", "0.5",
                       "--out", str(out), *QUICK, *extra]) == 0
    report = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "plan.json").read_text())["plan"]
    scores = json.loads((out / "scores.json").read_text())
    model = supernet_from_checkpoint(load_checkpoint(digits_checkpoint), "model")
    largest = dsnet.count_madds(model, model.largest, DIGITS_SIZE)
    assert report["largest"]["madds"] == largest
    assert report["target_madds"] == round(0.5 * largest)
    assert report["pruned"]["madds"] <= report["target_madds"]
    assert report["pruned"]["madds"] > 0.4 * largest  # the cut meets the target without overshooting it far
    assert all(plan[name] >= min(8, m) for name, m in zip(model.group_names, model.max_channels))
    assert set(scores) == set(model.group_names)
    assert all(sorted(s["order"]) == list(range(m)) for s, m in zip(scores.values(), model.max_channels))

    network = torch.load(out / "model.pt", weights_only=False).eval()
    assert fvcore_conv_linear_madds(network, DIGITS_SIZE) == report["pruned"]["madds"]  # counted externally
    assert sum(p.numel() for p in network.parameters()) == report["pruned"]["params"]
    loader = build_loader(build_dataset(DataOptions(**DIGITS_DATA), train=False), 256, train=False)
    correct = total = 0
    with torch.no_grad():
        for images, targets in loader:
            correct += (network(images).argmax(1) == targets).sum().item()
            total += len(targets)
    assert 100.0 * correct / total == pytest.approx(report["pruned"]["top1_recalibrated"], abs=1e-9)
    if method == "l1":
        # Weight magnitudes rank channels well even in this briefly trained supernet. The BN scales that most other
        # methods read have hardly moved from 1 in it, and DCP's per-layer problems see one pixel per image in the
        # last stages at 8 px, so their cuts are near random here.
        assert report["pruned"]["top1_recalibrated"] > 40.0  # chance is 10%


def test_without_target_l1_prunes_the_sparsity_of_every_group(digits_checkpoint, tmp_path):
    # The settings come from a -c file; the --sparsity flag overrides the file's.
    config = tmp_path / "l1.yaml"
    config.write_text("method: l1\nsparsity: 0.5\nepochs: 1\nfinetune-epochs: 0\nrecalibrate_batches: 2\n"
                      "score_batches: 2\n")
    out = tmp_path / "l1"
    assert prune_main(["-c", str(config), "--checkpoint", str(digits_checkpoint), "--sparsity", "0.25",
                       "--out", str(out)]) == 0
    settings = json.loads((out / "report.json").read_text())["settings"]
    assert (settings["config"], settings["sparsity"], settings["finetune_epochs"]) == (str(config), 0.25, 0)
    plan = json.loads((out / "plan.json").read_text())["plan"]
    model = supernet_from_checkpoint(load_checkpoint(digits_checkpoint), "model")
    for name, m in zip(model.group_names, model.max_channels):
        assert plan[name] == max(m - int(0.25 * m), min(8, m)), name


@pytest.mark.parametrize("args,message", [
    (["--method", "magnitude", "--target-madds", "0.5"], "invalid choice: 'magnitude'"),
    (["--method", "l1", "--target-madds", "1G"], "is above the largest width's"),
    (["--method", "taylor", "--target-madds", "1000"], "is below the"),
    (["--method", "dcp", "--target-madds", "0.5", "--min-channels", "0"],
     "argument --min-channels: must be ≥ 1, got 0"),
    (["--method", "l1", "--target-madds", "0.5", "--polarization-t", "1"],
     "--polarization-t applies to --method polarization, not l1"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, digits_checkpoint, tmp_path, capsys):
    code, _, err = run_command(prune_main, ["--checkpoint", digits_checkpoint, *args, "--out", tmp_path / "out"],
                               capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_command_line_reports_bad_input_in_one_line(digits_checkpoint, tmp_path):
    result = subprocess.run([sys.executable, "-m", "dsnet.prune", "--checkpoint", str(digits_checkpoint), "--method",
                             "l1", "--target-madds", "1G", "--out", str(tmp_path / "out")], capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: MAdds target 1000.00M is above the largest width's")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_every_method_has_a_shipped_imagenet_config_that_parses():
    configs = sorted((Path(__file__).resolve().parent.parent / "configs" / "prune").glob("imagenet-*.yaml"))
    methods = []
    for path in configs:
        args = parse_args_with_config(build_parser(), ["-c", str(path), "--checkpoint", "best.pth", "--out", "out"])
        assert path.stem == f"imagenet-{args.method}"
        assert args.batch_size >= 64 and args.finetune_epochs >= 1  # ImageNet scale, not the digits defaults
        methods.append(args.method)
    assert sorted(methods) == sorted(METHODS)
