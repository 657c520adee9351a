"""Every numeric option of every command has its range checked where it is parsed, from the command line and from a
`-c` file alike: an out-of-range value is one `error:` line and exit status 2, before any work starts."""
import argparse

import pytest

from dsnet import evaluate, export, search, summary
from dsnet.cli import Number, run_main
from dsnet.config import build_parser as train_parser
from dsnet.prune import __main__ as prune
from dsnet.train import main as train_main

PARSERS = {"train.py": lambda: train_parser("train.py", ""), "eval.py": evaluate.build_parser,
           "export": export.build_parser, "search": search.build_parser, "prune": prune.build_parser,
           "summary": summary.build_parser}
# Width multipliers are checked against the checkpoint's width choices, which only the checkpoint knows.
CHECKED_BY_THE_CHECKPOINT = {"width", "widths", "val_widths", "gate_routes", "gate_input_width"}


@pytest.mark.parametrize("command", PARSERS)
def test_every_numeric_option_has_a_range(command):
    unranged = [a.dest for a in PARSERS[command]()._actions
                if a.type in (int, float) and a.dest not in CHECKED_BY_THE_CHECKPOINT]
    assert unranged == []


def test_a_number_type_checks_its_range_and_names_it():
    fraction = Number(float, 0, 1, open_high=True)
    assert fraction("0") == 0.0 and fraction("0.5") == 0.5
    for text, message in [("1", "must be in [0, 1), got 1"), ("-0.1", "must be in [0, 1), got -0.1"),
                          ("nan", "must be in [0, 1), got nan"), ("half", "must be a number, got half")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message.replace("[", r"\[").replace("(", r"\(")
                           .replace(")", r"\)")):
            fraction(text)
    with pytest.raises(argparse.ArgumentTypeError, match="must be ≥ 1, got 0"):
        Number(int, low=1)("0")


BAD = [
    (train_main, ["--label-smoothing", "1.5"], "argument --label-smoothing: must be in [0, 1), got 1.5"),
    (train_main, ["--ema-decay", "1"], "argument --ema-decay: must be in [0, 1), got 1"),
    (train_main, ["--img-size", "0"], "argument --img-size: must be ≥ 1, got 0"),
    (train_main, ["--lr", "-0.1"], "argument --lr: must be > 0, got -0.1"),
    (export.main, ["--checkpoint", "x.pth", "--width", "0.5", "--format", "onnx", "--out", "x.onnx", "--opset", "3"],
     "argument --opset: must be in [7, 20], got 3"),
    (summary.main, ["--img-size", "0"], "argument --img-size: must be ≥ 1, got 0"),
    (evaluate.main, ["--checkpoint", "x.pth", "--latency-repeats", "0"], "argument --latency-repeats: must be ≥ 1"),
    (search.main, ["--checkpoint", "x.pth", "--target-madds", "0.5", "--out", "p.json", "--steps", "0"],
     "argument --steps: must be ≥ 1, got 0"),
    (prune.main, ["--checkpoint", "x.pth", "--method", "l1", "--out", "o", "--sparsity", "1"],
     "argument --sparsity: must be in [0, 1), got 1"),
]


@pytest.mark.parametrize("main,argv,message", BAD, ids=[" ".join(a[-2:]) for _, a, _ in BAD])
def test_an_out_of_range_flag_is_one_line(main, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("main,text,message", [
    (train_main, "label_smoothing: 1.5\n", "config key 'label_smoothing' in"),
    (train_main, "img_size: null\n", "img_size needs a value"),
    (prune.main, "method: l1\nsparsity: 2\n", "must be in [0, 1), got 2"),
])
def test_an_out_of_range_config_value_is_one_line(main, text, message, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    argv = ["-c", str(recipe), "--output", str(tmp_path / "out")] if main is train_main else \
        ["-c", str(recipe), "--checkpoint", "x.pth", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
