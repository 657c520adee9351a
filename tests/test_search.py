"""Width search: MAdds targets, and AutoSlim on the trained digits supernet."""
import json
import os
import subprocess
import sys

import pytest
import torch

import dsnet
from dsnet.checkpoint import load_checkpoint, load_supernet
from dsnet.cli import UserError
from dsnet.data import DataOptions
from dsnet.search import evaluate_top1, main, parse_madds_target, search_batches, search_plan


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Small models: one thread is about as fast, and two oversubscribe a shared two-core machine badly.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("text,expected", [("150M", 150_000_000), ("150m", 150_000_000), ("1.2e8", 120_000_000),
                                           ("2G", 2_000_000_000), ("300k", 300_000), ("0.5", 1_500_000_000),
                                           ("1", 3_000_000_000), ("0.25", 750_000_000)])
def test_madds_targets_absolute_or_fraction_of_the_largest(text, expected):
    assert parse_madds_target(text, largest_madds=3_000_000_000) == expected


@pytest.mark.parametrize("text,message", [("4G", "above the largest"), ("fast", "not a positive"),
                                          ("-1", "not a positive"), ("0", "not a positive"), ("nan", "not a positive"),
                                          ("inf", "not a positive"), ("1M", "below the 2.00M"), ("0.0001", "below")])
def test_bad_madds_targets_fail_with_a_clear_message(text, message):
    with pytest.raises(UserError, match=message):
        parse_madds_target(text, largest_madds=3_000_000_000, smallest_madds=2_000_000)


# A target between the 0.75 (14.8M MAdds) and 1.0 (22.0M) widths that a few steps of 64 channels reach.
TARGET = 0.97
STEP, BATCH_SIZE, CALIBRATION_BATCHES, EVAL_BATCHES = 64, 32, 1, 2


def test_search_meets_the_target_and_keeps_the_best_candidate(digits_checkpoint, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["--checkpoint", str(digits_checkpoint), "--target-madds", str(TARGET), "--step", str(STEP),
                 "--batch-size", str(BATCH_SIZE), "--recalibrate-batches", str(CALIBRATION_BATCHES),
                 "--eval-batches", str(EVAL_BATCHES), "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    model = load_supernet(digits_checkpoint)
    plan = model.resolve_width(result["plan"])
    largest = dsnet.count_madds(model, None, 16)
    assert result["target_madds"] == round(TARGET * largest)
    assert result["madds"] == dsnet.count_madds(model, plan, 16) <= result["target_madds"]
    assert result["params"] == dsnet.count_params(model, plan)

    trajectory = result["trajectory"]
    madds = [step["madds"] for step in trajectory]
    assert madds[0] == largest and madds[-1] == result["madds"]
    assert all(a > b for a, b in zip(madds, madds[1:])), madds
    assert len(trajectory) >= 2
    printed = capsys.readouterr().out
    for step in trajectory[1:]:
        assert step["narrowed"] in model.group_names and plan[step["narrowed"]] <= step["channels"]
        assert f"{step['narrowed']} → {step['channels']}: MAdds {step['madds'] / 1e6:.2f}M" in printed

    # Measured again the same way: BN recalibrated on the same batches, top-1 on the same held-out batches.
    options = DataOptions.from_config(load_checkpoint(digits_checkpoint)["config"])
    calibration, held_out = search_batches(options, CALIBRATION_BATCHES, EVAL_BATCHES, BATCH_SIZE)
    dsnet.recalibrate_bn(model, plan, calibration)
    assert evaluate_top1(model, plan, held_out) == result["top1"] == trajectory[-1]["top1"]
    for i, uniform in enumerate(result["uniform"]):
        assert uniform["width"] == model.widths[i] and uniform["madds"] == dsnet.count_madds(model, i, 16)
        assert uniform["top1"] == evaluate_top1(model, i, held_out)

    # The first step kept the most accurate of all one-step narrowings of the largest width (ties: more saving).
    candidates = []
    for name in model.group_names:
        narrower = max(model.largest[name] - STEP, 8)
        if narrower < model.largest[name]:
            candidate = model.resolve_width({**model.largest.as_dict(), name: narrower})
            dsnet.recalibrate_bn(model, candidate, calibration)
            candidates.append((evaluate_top1(model, candidate, held_out), -dsnet.count_madds(model, candidate, 16),
                               name))
    top1, saving, name = max(candidates, key=lambda c: c[:2])
    assert (trajectory[1]["narrowed"], trajectory[1]["top1"], trajectory[1]["madds"]) == (name, top1, -saving)
    assert len(candidates) == len(model.group_names)


def test_a_target_the_largest_width_meets_takes_no_step(digits_checkpoint):
    model = load_supernet(digits_checkpoint)
    options = DataOptions.from_config(load_checkpoint(digits_checkpoint)["config"])
    calibration, held_out = search_batches(options, 1, 1, 32)
    result = search_plan(model, dsnet.count_madds(model, None, 16), calibration, held_out, img_size=16)
    assert result.plan == model.largest and len(result.trajectory) == 1
    assert result.top1 == evaluate_top1(model, None, held_out)


def test_held_out_and_calibration_batches_are_disjoint(digits_checkpoint):
    options = DataOptions.from_config(load_checkpoint(digits_checkpoint)["config"])
    calibration, held_out = search_batches(options, 2, 3, 16, seed=1)
    images = torch.cat(calibration + [x for x, _ in held_out]).flatten(1)
    assert len(calibration) == 2 and len(held_out) == 3 and len(images) == 5 * 16
    assert len(torch.unique(images, dim=0)) == len(images)
    with pytest.raises(UserError, match="need"):
        search_batches(options, 10, 20, 64)


def test_command_line_rejects_an_unreachable_target(digits_checkpoint, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", "dsnet.search", "--checkpoint", str(digits_checkpoint),
                             "--target-madds", "30M", "--out", str(tmp_path / "plan.json")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: MAdds target 30.00M is above the largest width's 22.00M")
    assert result.stderr.count("\n") == 1
    assert os.listdir(tmp_path) == []
