"""`-c CONFIG` for the commands that take their options from argparse: the file sets defaults, flags override it,
and a bad file is a one-line error that names it."""
import argparse

import pytest

from dsnet.cli import parse_args_with_config
from dsnet.errors import UserError


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("-c", "--config")
    parser.add_argument("--method", required=True, choices=["l1", "dcp"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--widths", type=float, nargs="+")
    parser.add_argument("--target-madds")
    parser.add_argument("--fast", action="store_true")
    return parser


def write(tmp_path, text: str) -> str:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    return str(path)


def test_the_file_sets_defaults_and_flags_override_it(tmp_path):
    path = write(tmp_path, "method: dcp\nepochs: 30\nlr: 1.0e-3\nwidths: [0.5, 1]\ntarget-madds: 150M\nfast: true\n")
    args = parse_args_with_config(make_parser(), ["-c", path, "--epochs", "2"])
    assert (args.method, args.epochs, args.lr, args.widths, args.target_madds, args.fast) == \
        ("dcp", 2, 0.001, [0.5, 1.0], "150M", True)
    assert args.config == path


def test_without_a_file_the_parser_is_unchanged(tmp_path):
    args = parse_args_with_config(make_parser(), ["--method", "l1"])
    assert (args.method, args.epochs, args.lr, args.config) == ("l1", 1, 0.01, None)
    with pytest.raises(SystemExit):
        parse_args_with_config(make_parser(), [])  # --method is still required


@pytest.mark.parametrize("text,message", [
    ("method: l1\nepoch: 3\n", "unknown config key(s) ['epoch']"),
    ("method: magnitude\n", "must be one of ['l1', 'dcp']"),
    ("method: l1\nepochs: three\n", "config key 'epochs' in"),
    ("method: l1\nepochs: three\n", "must be an integer, got 'three'"),
    ("method: l1\nwidths: [0.5, [1]]\n", "must be a list of numbers"),
    ("method: l1\nepochs: 2.5\n", "config key 'epochs' in"),
    ("method: l1\nfast: 1\n", "must be true or false"),
    ("- method\n- l1\n", "must hold a mapping"),
    ("method: [l1\n", "is not valid YAML"),
])
def test_a_bad_file_is_a_user_error_naming_it(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(UserError, match=None) as error:
        parse_args_with_config(make_parser(), ["-c", path])
    assert message in str(error.value)
    assert "settings.yaml" in str(error.value)


def test_a_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        parse_args_with_config(make_parser(), ["-c", str(tmp_path / "nope.yaml")])
