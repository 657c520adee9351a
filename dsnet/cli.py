"""What every dsnet command line shares: one-line errors for a user's mistakes, and YAML settings files (`-c`)."""
from __future__ import annotations

import argparse
import math
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (`error: …`) instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class Number:
    """An argparse type: an integer or a number within a range, checked where the option is parsed, from the command
    line or from a `-c` file alike. `low`/`high` are inclusive unless `open_low`/`open_high`."""

    def __init__(self, kind: type, low: float | None = None, high: float | None = None, open_low: bool = False,
                 open_high: bool = False):
        self.kind, self.low, self.high, self.open_low, self.open_high = kind, low, high, open_low, open_high
        self.__name__ = "an integer" if kind is int else "a number"  # what argparse names in its own messages

    def range_text(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        if self.low is not None:
            return f"{'>' if self.open_low else '≥'} {self.low:g}"
        return f"{'<' if self.open_high else '≤'} {self.high:g}"

    def contains(self, value) -> bool:
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below  # NaN is neither

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.__name__}, got {text}") from None
        if not self.contains(value):
            raise argparse.ArgumentTypeError(f"must be {self.range_text()}, got {text}")
        return value


POSITIVE_INT = Number(int, low=1)
NON_NEGATIVE_INT = Number(int, low=0)
NON_NEGATIVE = Number(float, low=0)
POSITIVE = Number(float, low=0, open_low=True)
PROBABILITY = Number(float, 0, 1)
FRACTION = Number(float, 0, 1, open_high=True)  # [0, 1): a share that cannot be all


def parse_quantity(text: Any, units: str) -> tuple[float, str] | None:
    """(positive finite number, unit) of `text` such as `150M` or `4 ms`, `units` being a regex alternation of the
    allowed units; None when it is not one."""
    match = re.fullmatch(rf"\s*([0-9.eE+-]+)\s*({units})\s*", str(text))
    if not match:
        return None
    try:
        value = float(match.group(1))
    except ValueError:
        return None
    return (value, match.group(2)) if math.isfinite(value) and value > 0 else None


def read_yaml_mapping(path: str) -> dict[str, Any]:
    """A YAML file of `key: value` settings, keys with dashes or underscores (returned with underscores)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {path!r} does not exist")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path!r} must hold a mapping of keys to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def config_file_values(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The values a YAML file gives `parser`'s options, keyed by their long names, each checked and converted as
    argparse would the flag's text. An unknown key or a value the option would refuse is a one-line error."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    values = read_yaml_mapping(path)
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise UserError(f"unknown config key(s) {unknown} in {path}; valid keys: {', '.join(actions)}")
    return {key: _option_value(actions[key], value, path) for key, value in values.items()}


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv`, taking defaults from the YAML file that its `-c/--config` names; flags override the file."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config")
    path = pre.parse_known_args(argv)[0].config
    if path:
        values = config_file_values(parser, path)
        parser.set_defaults(**values)
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    return parser.parse_args(argv)


_EXPECTED = {float: ("a number", "a list of numbers"), int: ("an integer", "a list of integers")}


def _option_value(action: argparse.Action, value: Any, path: str) -> Any:
    """A config file's value for an option, checked and converted as argparse would the flag's text."""
    if value is None:
        return None
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise UserError(f"config key {action.dest!r} in {path} must be true or false, got {value!r}")
        return value
    convert = action.type or str
    is_list = action.nargs in ("+", "*")
    try:
        if is_list:
            items = value if isinstance(value, list) else [value]
            if any(isinstance(v, (list, dict, bool)) for v in items):
                raise TypeError
            converted = [convert(str(v)) for v in items]
        elif isinstance(value, (list, dict, bool)):
            raise TypeError
        else:
            converted = convert(str(value))
    except argparse.ArgumentTypeError as exc:  # a Number's own message: what it must be
        raise UserError(f"config key {action.dest!r} in {path} {exc}") from None
    except (TypeError, ValueError):
        expected = _EXPECTED.get(getattr(convert, "kind", convert))
        what = f"must be {expected[is_list]}" if expected else "has an invalid value"
        raise UserError(f"config key {action.dest!r} in {path} {what}, got {value!r}") from None
    for item in converted if is_list else [converted]:
        if action.choices is not None and item not in action.choices:
            raise UserError(f"config key {action.dest!r} in {path} must be one of {list(action.choices)}, "
                            f"got {item!r}")
    return converted


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a command's main; user mistakes become `error: …` on stderr and exit status 2."""
    try:
        code = main(argv)
    except (UserError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        # A data loader that re-raised a worker's error stays referenced from these frames, and freed only later
        # by the garbage collector, which then waits seconds for each of its workers: free it now.
        traceback.clear_frames(exc.__traceback__)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
