"""Every command the README and the docs show parses with its program's own argument parser.

The commands are the lines of ```bash (or unlabelled) fenced blocks in README.md, docs/*.md and bench/results/README.md
that start with `python train.py`, `python eval.py`, `python -m dsnet.<module>`, `python bench/<script>.py` or
`torchrun … train.py`. For each one the test checks, without training or loading anything:

- it parses with the real parser: the program's `main` runs until its parser has parsed the arguments, and stops
  there; train.py's arguments then also go through `dsnet.config.parse_config`, which reads the `-c` recipe and checks
  the values;
- every `--flag` is one of that parser's options, spelled out (argparse would accept an abbreviation);
- every path under `configs/` or `bench/` exists;
- every placeholder (a word in capitals such as `CKPT`) is one of PLACEHOLDERS below, which the docs explain.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "results" / "README.md"]

# The placeholders the docs use, and what each stands for. Parsing needs only a string, not the file.
PLACEHOLDERS = {
    "CKPT": "runs/supernet-digits/best.pth",  # a stage-I checkpoint
    "GATE_CKPT": "runs/gate-digits/best.pth",  # a stage-II checkpoint (a supernet with a gate)
    "DIR": "/data/cifar10-mini",  # a dataset folder
}

SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z_]*[A-Z]\b")
FLAG = re.compile(r"^--[a-z0-9][a-z0-9-]*(=|$)")
CHECKED_ROOTS = ("configs/", "bench/")


# ---- finding the commands -------------------------------------------------------------------------------------------

def shell_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command) for every line of a shell fenced block, continuation lines joined."""
    commands, fence, pending, start = [], None, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip().lower() if fence is None else None
            continue
        if fence is None or fence not in SHELL_FENCES:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        commands.append((start, pending + stripped))
        pending = ""
    return commands


def program_of(tokens: list[str]) -> tuple[str, list[str]] | None:
    """('train.py' | 'eval.py' | 'dsnet.<module>' | 'bench/<script>.py', its arguments), or None: not checked."""
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):  # VAR=value before the command
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] == "torchrun":  # torchrun's own options come before the script
        scripts = [i for i, t in enumerate(tokens) if t.endswith(".py")]
        return (tokens[scripts[0]], tokens[scripts[0] + 1:]) if scripts else ("torchrun", tokens[1:])
    if tokens[0] not in ("python", "python3") or len(tokens) < 2:
        return None
    if tokens[1] == "-m" and len(tokens) > 2 and tokens[2].split(".")[0] == "dsnet":
        return tokens[2], tokens[3:]
    if tokens[1] in ("train.py", "eval.py") or re.match(r"^bench/[^/]+\.py$", tokens[1]):
        return tokens[1], tokens[2:]
    return None


def doc_commands() -> list[tuple[str, str]]:
    """(where, command) for every checked command of the docs."""
    found = []
    for path in DOC_FILES:
        if not path.is_file():
            continue
        for number, line in shell_lines(path.read_text()):
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                tokens = line.split()
            if program_of(tokens) is not None:
                found.append((f"{path.relative_to(REPO)}:{number}", line))
    return found


# ---- parsing without running ----------------------------------------------------------------------------------------

class _Parsed(Exception):
    """Raised by the patched parser once a program's arguments are parsed: the program stops before doing anything."""

    def __init__(self, parser: argparse.ArgumentParser, extras: list[str]):
        super().__init__("parsed")
        self.parser, self.extras = parser, extras


@contextlib.contextmanager
def stop_after_parsing(stop: bool = True):
    """Patch argparse so that a program's main parser records itself (and, with `stop`, stops the program) as soon
    as it has parsed. A parser without -h (a pre-parser that looks for `-c`) is left alone."""
    seen: list[argparse.ArgumentParser] = []
    original_args, original_known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    inside = []

    def parse_args(self, args=None, namespace=None):
        inside.append(self)
        try:
            result = original_args(self, args, namespace)
        finally:
            inside.pop()
        seen.append(self)
        if stop:
            raise _Parsed(self, [])
        return result

    def parse_known_args(self, args=None, namespace=None):
        result = original_known(self, args, namespace)
        if inside or not self.add_help:
            return result
        seen.append(self)
        if stop:
            raise _Parsed(self, result[1])
        return result

    argparse.ArgumentParser.parse_args = parse_args
    argparse.ArgumentParser.parse_known_args = parse_known_args
    try:
        yield seen
    finally:
        argparse.ArgumentParser.parse_args = original_args
        argparse.ArgumentParser.parse_known_args = original_known


def _main_of(program: str):
    """The function the command line runs: the script's `main`, the module's, or the package's `__main__`'s."""
    if program in ("train.py", "eval.py"):  # thin scripts: `from dsnet.<module> import main`
        return runpy.run_path(str(REPO / program), run_name="docs_check")["main"]
    if program.startswith("dsnet"):
        module = importlib.import_module(program)
        if not hasattr(module, "main") and hasattr(module, "__path__"):
            module = importlib.import_module(program + ".__main__")
        return module.main
    bench = str(REPO / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)  # bench scripts import their shared `device` helpers
    namespace = runpy.run_path(str(REPO / program), run_name="docs_check")

    def run_bench(argv):
        old, sys.argv = sys.argv, [program, *argv]
        try:
            return namespace["main"]()
        finally:
            sys.argv = old

    return run_bench


def parse(program: str, argv: list[str]) -> tuple[list[argparse.ArgumentParser], str | None]:
    """The parsers that took `argv` (the program's, and train.py's for the flags a bench passes through), or the
    error the program reported."""
    main = _main_of(program)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            with stop_after_parsing():
                main(argv)
            return [], f"{program} ran past its argument parsing without parsing"
        except _Parsed as parsed:
            parsers, extras = [parsed.parser], parsed.extras
        except SystemExit as exc:
            return [], f"exit {exc.code}: {stderr.getvalue().strip()}"
        except Exception as exc:  # a UserError from a parser that raises instead of exiting
            return [], f"{type(exc).__name__}: {exc}"
        if program == "train.py" or extras:  # recipe keys and values, as train.py reads them
            from dsnet.config import parse_config

            try:
                with stop_after_parsing(stop=False) as seen:
                    parse_config(extras if program != "train.py" else argv)
            except SystemExit as exc:
                return [], f"exit {exc.code}: {stderr.getvalue().strip()}"
            except Exception as exc:
                return [], f"{type(exc).__name__}: {exc}"
            parsers += seen
    return parsers, None


def check_command(command: str) -> list[str]:
    """What is wrong with one command of the docs; empty when it parses and names only what exists."""
    problems = []
    tokens = shlex.split(command, comments=True)  # the comment after a command is prose
    for word in PLACEHOLDER.findall(" ".join(tokens)):
        if word not in PLACEHOLDERS:
            problems.append(f"unknown placeholder {word} (known: {', '.join(PLACEHOLDERS)})")
    for word, value in PLACEHOLDERS.items():
        tokens = [re.sub(rf"\b{word}\b", value, t) for t in tokens]
    found = program_of(tokens)
    if found is None:
        return problems + [f"not a command this test knows: {command}"]
    program, argv = found
    if not (REPO / program).is_file() and not program.startswith("dsnet"):
        return problems + [f"{program} does not exist"]
    for token in argv:
        value = token.split("=", 1)[1] if token.startswith("-") and "=" in token else token
        for path in [value, *value.split()]:
            if path.startswith(CHECKED_ROOTS) and not (REPO / path).exists():
                problems.append(f"{path} does not exist")
    parsers, error = parse(program, argv)
    if error:
        return problems + [f"does not parse: {error}"]
    options = {option for parser in parsers for option in parser._option_string_actions}
    passed_on = [t for i, t in enumerate(argv) if i and argv[i - 1] == "--static-flags"]
    flags = [t for t in argv if FLAG.match(t)] + [t for s in passed_on for t in shlex.split(s) if FLAG.match(t)]
    for flag in flags:
        name = flag.split("=", 1)[0]
        if name not in options:
            problems.append(f"{name} is not an option of {program} (an abbreviation, or gone)")
    if passed_on:  # the flags a bench passes to train.py for its static runs
        _, error = parse("train.py", [t for s in passed_on for t in shlex.split(s)])
        if error:
            problems.append(f"--static-flags do not parse with train.py: {error}")
    return problems


# ---- the tests ------------------------------------------------------------------------------------------------------

COMMANDS = doc_commands()


def test_the_docs_show_commands():
    readme = [where for where, _ in COMMANDS if where.startswith("README.md:")]
    programs = {program_of(shlex.split(c, comments=True))[0] for _, c in COMMANDS}
    assert len(readme) >= 3, "the README's quick start shows no train/eval/export commands"
    assert {"train.py", "eval.py", "dsnet.export"} <= programs, programs


@pytest.mark.parametrize("where,command", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_command_parses(where, command):
    problems = check_command(command)
    assert not problems, f"{where}: {command}\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("command,expected", [
    ("python train.py --no-such-flag 3", "does not parse"),
    ("python train.py --epoch 3", "does not parse"),  # ambiguous abbreviation
    ("python eval.py --checkpoint CKPT --no-lat", "not an option"),  # an abbreviation argparse would accept
    ("python train.py -c configs/no-such-recipe.yaml", "does not exist"),
    ("python -m dsnet.export --checkpoint MODEL --width 0.5 --format onnx --out x.onnx", "unknown placeholder"),
    ("python bench/no_such_bench.py", "does not exist"),
    ("python bench/supernet_vs_static.py --static-flags '--no-such-flag 1'", "not an option"),
])
def test_the_check_can_fail(command, expected):
    problems = check_command(command)
    assert any(expected in p for p in problems), problems


def test_shell_lines_joins_continuations_and_skips_python_blocks():
    text = "```python\npython train.py --bad\n```\n```bash\npython eval.py --widths 0.35 \\\n    --no-latency  # c\n```\n"
    assert shell_lines(text) == [(5, "python eval.py --widths 0.35 --no-latency  # c")]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(path: Path) -> list[str]:
    """The relative links of a Markdown file that name no file, or no heading of the file they name."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"^[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md":
            headings = {_anchor(h) for h in re.findall(r"^#+ (.+)$", linked.read_text(), re.M)}
            if anchor not in headings:
                broken.append(target)
    return broken


@pytest.mark.parametrize("path", [p for p in DOC_FILES if p.is_file()], ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(path):
    assert not broken_links(path), f"{path.relative_to(REPO)}: broken links {broken_links(path)}"


def test_the_link_check_can_fail(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n## The part\n\n[ok](#the-part) [x](#no-part) [y](b.md) [z](a.md#top)\n")
    assert broken_links(tmp_path / "a.md") == ["#no-part", "b.md"]
