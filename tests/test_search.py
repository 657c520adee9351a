"""Width search: MAdds targets, and AutoSlim on the trained digits supernet."""
import json
import os
import subprocess
import sys

import pytest
import torch

import dsnet
from dsnet.checkpoint import load_checkpoint, load_supernet
from dsnet.errors import UserError
from dsnet.data import DataOptions
from dsnet.search import evaluate_plan, evaluate_top1, main, parse_madds_target, search_batches, search_plan

from conftest import DIGITS_SIZE


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
STEPS, STEP, BATCH_SIZE, CALIBRATION_BATCHES, EVAL_BATCHES = 3, 64, 32, 1, 2


def test_search_meets_the_target_and_keeps_the_best_candidate(digits_checkpoint, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["--checkpoint", str(digits_checkpoint), "--target-madds", str(TARGET), "--steps", str(STEPS),
                 "--step", str(STEP), "--batch-size", str(BATCH_SIZE), "--recalibrate-batches",
                 str(CALIBRATION_BATCHES), "--eval-batches", str(EVAL_BATCHES), "--device", "cpu", "--out",
                 str(out)]) == 0
    result = json.loads(out.read_text())
    model = load_supernet(digits_checkpoint)
    plan = model.resolve_width(result["plan"])
    largest = dsnet.count_madds(model, None, DIGITS_SIZE)
    assert result["target_madds"] == round(TARGET * largest)
    assert result["madds"] == dsnet.count_madds(model, plan, DIGITS_SIZE) <= result["target_madds"]
    assert result["params"] == dsnet.count_params(model, plan)

    trajectory = result["trajectory"]
    madds = [step["madds"] for step in trajectory]
    assert madds[0] == largest and madds[-1] <= result["target_madds"]  # 1.0 is the nearest choice above
    assert all(a > b for a, b in zip(madds, madds[1:])), madds
    assert 2 <= len(trajectory) <= STEPS + 1
    printed = capsys.readouterr().out
    for step in trajectory[1:]:
        assert step["narrowed"] in model.group_names
        assert f"{step['narrowed']} → {step['channels']}: MAdds {step['madds'] / 1e6:.2f}M" in printed

    # Measured again the same way: BN recalibrated on the same batches, top-1 and loss on the same held-out batches.
    options = DataOptions.from_config(load_checkpoint(digits_checkpoint)["config"])
    calibration, held_out = search_batches(options, CALIBRATION_BATCHES, EVAL_BATCHES, BATCH_SIZE)
    for i, uniform in enumerate(result["uniform"]):
        assert uniform["width"] == model.widths[i] and uniform["madds"] == dsnet.count_madds(model, i, DIGITS_SIZE)
        assert (uniform["top1"], uniform["loss"]) == pytest.approx(evaluate_plan(model, i, held_out), abs=1e-9)
    end = model.resolve_width({**model.largest.as_dict(), **{s["narrowed"]: s["channels"] for s in trajectory[1:]}})
    dsnet.recalibrate_bn(model, end, calibration)
    end_top1, end_loss = evaluate_plan(model, end, held_out)
    assert (end_top1, end_loss) == pytest.approx((trajectory[-1]["top1"], trajectory[-1]["loss"]), abs=1e-9)
    # The result is the trajectory's end unless the widest width choice within the budget does better on the
    # held-out set.
    best = [u for u in result["uniform"] if u["madds"] <= result["target_madds"]][-1]
    if (best["top1"], -best["loss"]) > (end_top1, -end_loss):
        assert result["width_choice"] == best["width"] and plan == model.resolve_width(best["width"])
        assert f"is below width choice {best['width']}, the widest within the budget" in printed
    else:
        assert result["width_choice"] is None and plan == end and result["top1"] == end_top1

    # The first step: every group narrowed by the fewest 64-channel steps that save a third of the way (or down to
    # 8 channels); the kept candidate adds the least held-out loss per MAdds saved among those that save enough.
    needed = -(-(largest - result["target_madds"]) // STEPS)
    model = load_supernet(digits_checkpoint)
    candidates = []
    for name in model.group_names:
        channels = model.largest[name]
        candidate, saved = None, 0
        while saved < needed and channels > 8:
            channels = max(channels - STEP, 8)
            candidate = model.resolve_width({**model.largest.as_dict(), name: channels})
            saved = largest - dsnet.count_madds(model, candidate, DIGITS_SIZE)
        if candidate is None:
            continue
        dsnet.recalibrate_bn(model, candidate, calibration)
        _, loss = evaluate_plan(model, candidate, held_out)
        candidates.append(((saved < needed, (loss - trajectory[0]["loss"]) / saved), name, channels))
    _, name, channels = min(candidates, key=lambda c: c[0])
    assert (trajectory[1]["narrowed"], trajectory[1]["channels"]) == (name, channels)


def test_stage_granularity_moves_whole_stages_between_width_choices(digits_checkpoint):
    model = load_supernet(digits_checkpoint)
    options = DataOptions.from_config(load_checkpoint(digits_checkpoint)["config"])
    calibration, held_out = search_batches(options, CALIBRATION_BATCHES, EVAL_BATCHES, BATCH_SIZE)
    largest = dsnet.count_madds(model, None, DIGITS_SIZE)
    target = round(0.6 * largest)  # between the 0.5 (7.0M) and 0.75 (14.8M) widths: the search starts at 0.75
    result = search_plan(model, target, calibration, held_out, img_size=DIGITS_SIZE, steps=2, granularity="stage")
    madds = [step.madds for step in result.trajectory]
    assert madds[0] == dsnet.count_madds(model, 2, DIGITS_SIZE) and madds[-1] <= target
    assert all(a > b for a, b in zip(madds, madds[1:])), madds
    # Every step moves one stage to a narrower width choice: the end is a per-stage plan of choices.
    stages = [2] * len(model.stage_names)
    for step in result.trajectory[1:]:
        assert step.narrowed in model.stage_names and step.channels in model.widths
        stages[model.stage_names.index(step.narrowed)] = model.widths.index(step.channels)
    assert result.searched == model.resolve_width(tuple(stages))
    assert result.plan in (result.searched, model.resolve_width(0.5))

    # The first step: each stage moved down the fewest choices that save half the way (the head, 1280 channels at
    # every width, saves nothing); the kept one adds the least held-out loss per MAdds saved among those that save
    # enough.
    needed = -(-(madds[0] - target) // 2)
    model = load_supernet(digits_checkpoint)
    candidates = []
    for s, name in enumerate(model.stage_names):
        index, saved = 2, 0
        while saved < needed and index > 0:
            index -= 1
            candidate = model.resolve_width(tuple([2] * s + [index] + [2] * (len(model.stage_names) - s - 1)))
            saved = madds[0] - dsnet.count_madds(model, candidate, DIGITS_SIZE)
        if saved <= 0:
            continue
        dsnet.recalibrate_bn(model, candidate, calibration)
        _, loss = evaluate_plan(model, candidate, held_out)
        candidates.append(((saved < needed, (loss - result.trajectory[0].loss) / saved), name, model.widths[index]))
    assert "head" not in [name for _, name, _ in candidates]
    _, name, width = min(candidates, key=lambda c: c[0])
    assert (result.trajectory[1].narrowed, result.trajectory[1].channels) == (name, width)


def test_a_target_the_largest_width_meets_takes_no_step(digits_checkpoint):
    model = load_supernet(digits_checkpoint)
    options = DataOptions.from_config(load_checkpoint(digits_checkpoint)["config"])
    calibration, held_out = search_batches(options, 1, 1, 32)
    result = search_plan(model, dsnet.count_madds(model, None, DIGITS_SIZE), calibration, held_out, img_size=DIGITS_SIZE)
    assert result.plan == result.searched == model.largest and len(result.trajectory) == 1
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
    largest = dsnet.count_madds(load_supernet(digits_checkpoint), None, DIGITS_SIZE)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: MAdds target 30.00M is above the largest width's {largest / 1e6:.2f}M")
    assert result.stderr.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_search_keeps_at_least_the_accuracy_of_the_uniform_width_below(digits_checkpoint):
    """Between two width choices, the searched plan is at least as accurate on the validation split (which the
    search never sees) as the uniform width with the nearest MAdds below the budget."""
    from dsnet.data import build_dataset, build_loader

    model = load_supernet(digits_checkpoint)
    options = DataOptions.from_config(load_checkpoint(digits_checkpoint)["config"])
    calibration, held_out = search_batches(options, 2, 4, 32)
    madds = [dsnet.count_madds(model, i, DIGITS_SIZE) for i in range(len(model.widths))]
    below = model.widths.index(0.5)
    target = madds[below] + (madds[below + 1] - madds[below]) // 2  # halfway from 0.5 to 0.75
    result = search_plan(model, target, calibration, held_out, steps=2, img_size=DIGITS_SIZE)
    assert result.madds <= target and result.trajectory[0].madds == madds[below + 1]
    assert len(result.trajectory) <= 3 and result.trajectory[-1].madds <= target

    validation = list(build_loader(build_dataset(options, train=False), 128, train=False))
    searched, uniform = evaluate_top1(model, result.plan, validation), evaluate_top1(model, below, validation)
    print(f"searched plan {result.madds / 1e6:.2f}M MAdds: {searched:.2f}%; width 0.5 "
          f"{madds[below] / 1e6:.2f}M: {uniform:.2f}%")
    assert searched >= uniform
