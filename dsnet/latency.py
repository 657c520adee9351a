"""Latency tables: the deployed dense network timed part by part on this machine, and any plan's latency predicted
from them.

`python -m dsnet.latency (--checkpoint CKPT | -c RECIPE) --out lut.json` times every part of the supernet's dense,
BN-folded export (`blocks.Part`: the stem, each block's features and projection, the head's convolution, the
classifier) at every pair of channel counts its two groups take over the width choices, and at a floor of
`--min-channels`, in PyTorch eager or ONNX Runtime. The entries of one part are timed interleaved with the shared
loop of `timing.py`; identical entries (the repeated blocks of a stage) are timed once.

A plan's prediction is `scale · Σ parts + overhead`: the sum of its parts, each interpolated bilinearly between the
timed channel counts, then the line fitted (least squares) from those sums to the whole network's latency at every
width choice, measured side by side. Parts timed alone miss what the whole pays and the other way round: the
call of each part, the handing of one part's output to the next through the caches and the allocator. Those
depend on the machine and the runtime more than on the widths, and one line per table models them.

The table is written after every part, atomically; a run stopped part-way resumes where it stopped when it is given
the same `--out` and settings. The same command on a finished table recalibrates it: the parts are kept and only the
whole networks are timed again, for the line. The parts' relative costs hold while the machine's speed drifts; the
line carries the absolute figure, so a recalibration shortly before a table is used keeps it true at little cost.
"""
from __future__ import annotations

import hashlib
import io
import json
import statistics
import sys
import warnings
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from timm.layers import make_divisible

from .archs import DEFAULT_ARCH
from .blocks import Part
from .cpu_memory import keep_freed_memory
from .cli import NON_NEGATIVE_INT, POSITIVE_INT, ArgumentParser, parse_quantity, run_main
from .errors import UserError
from .export import DEFAULT_OPSET, fold_batch_norms
from .files import write_text_atomic
from .supernet import SlimNetwork
from .timing import median_seconds, reserve_kernel_cache, torch_threads
from .widths import WidthPlan

FORMAT = "dsnet-latency-table"
VERSION = 1
RUNTIMES = ("torch", "onnxruntime")
# What a table shares with every network it predicts for: its supernet config, less the keys that do not shape the
# deployed layers (dropout, BN momentum and statistics slots) or that the table checks apart (the input size). A
# table written before `arch` was recorded is MobileNetV2's.
NOT_NETWORK_KEYS = ("img_size", "dropout", "bn_momentum", "bn_eps", "custom_bn_slots", "slim_from", "trunk_width")
_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}


def parse_latency(text: str) -> float:
    """Seconds from `4ms`, `800us`, `0.01s` (a unit is required)."""
    quantity = parse_quantity(text, "s|ms|us|µs")
    if quantity is None:
        raise UserError(f"latency {text!r} is not a positive time with a unit (4ms, 800us, 0.01s)")
    return quantity[0] * _UNITS[quantity[1]]


def format_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


# ---- building a table ----------------------------------------------------------------------------------------------


@dataclass
class Timed:
    """One entry to time: a part's dense module at one pair of channel counts, and its inputs."""

    module: nn.Module
    inputs: tuple[torch.Tensor, ...]


class _Runnable(nn.Module):
    """A part as a module of its inputs (the input, and the block's input for a part with a skip), for export."""

    def __init__(self, part: Part):
        super().__init__()
        self.body = fold_batch_norms(part.module)
        self.skip = part.skip
        self.activation = part.activation if part.activation is not None else nn.Identity()

    def forward(self, x: torch.Tensor, *skip: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return self.activation(y + skip[0] if self.skip else y)


def torch_timer(repeats: int, warmup: int, device: torch.device) -> Callable[[Sequence[Timed]], list[float]]:
    def measure(entries: Sequence[Timed]) -> list[float]:
        return median_seconds([_call(e.module, e.inputs) for e in entries], repeats, warmup, device)
    return measure


def _call(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], object]:
    return lambda: module(*inputs)


def onnx_session(module: nn.Module, inputs: tuple[torch.Tensor, ...], threads: int):
    """An ONNX Runtime CPU session of `module` (exported in memory), run with `threads` intra-op threads and spinning
    off (the idle sessions of the entries timed beside it would otherwise spin on the cores it needs)."""
    import onnxruntime

    buffer = io.BytesIO()
    names = [f"input{i}" for i in range(len(inputs))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.cpu().eval(), tuple(t.cpu() for t in inputs), buffer, dynamo=False,
                          opset_version=DEFAULT_OPSET, input_names=names, output_names=["output"])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feeds = {name: t.cpu().numpy() for name, t in zip(names, inputs)}
    return lambda: session.run(None, feeds)


def onnxruntime_timer(repeats: int, warmup: int, threads: int) -> Callable[[Sequence[Timed]], list[float]]:
    def measure(entries: Sequence[Timed]) -> list[float]:
        return median_seconds([onnx_session(e.module, e.inputs, threads) for e in entries], repeats, warmup)
    return measure


def grid_channels(model: SlimNetwork, widths: Sequence[float], min_channels: int) -> list[list[int]]:
    """Per group, the channel counts the table times: those of the width choices `widths`, the same fractions of the
    group's widest count (rounded as timm rounds: a group the choices keep at one width, as the head, still gets a
    grid), and the floor."""
    plans = [model.choice_plans[_choice(model, w)] for w in widths]
    widest = model.widths[-1]
    return [sorted({min(min_channels, m), *(p.channels[g] for p in plans),
                    *(min(m, make_divisible(m * w / widest)) for w in widths)})
            for g, m in enumerate(model.max_channels)]


def _choice(model: SlimNetwork, width: float) -> int:
    index = model.choice_index(width)
    if index is None:
        raise UserError(f"width {width} is not one of the supernet's width choices {list(model.widths)}")
    return index


def _axes(part: Part) -> list[int]:
    """The groups a part's latency depends on: its input's and its output's (one, when they are the same)."""
    groups = [g for g in (part.in_group, part.out_group) if g is not None]
    return sorted(set(groups), key=groups.index)


def part_inputs(model: SlimNetwork, img_size: int) -> dict[str, tuple[int, int]]:
    """Each part's input height and width, for one image of `img_size` (they do not depend on the widths)."""
    sizes, x, block_input, shortcut = {}, torch.zeros(1, model.config.in_chans, img_size, img_size), None, None
    with torch.inference_mode():
        for part in model.export_parts(model.smallest, model.stats_slot(model.smallest)):
            if part.name.endswith(".downsample"):  # a ResNet shortcut: it reads the block's input
                sizes[part.name] = tuple(block_input.shape[-2:])
                shortcut = part(block_input)
                continue
            sizes[part.name] = tuple(x.shape[-2:])
            if part.name.endswith(".features"):
                block_input = shortcut = x
            x = part(x, shortcut if part.skip else None)
    return sizes


class TableBuilder:
    """The entries of a table for `model` and the timing of them, part by part (see the module docstring)."""

    def __init__(self, model: SlimNetwork, img_size: int, batch_size: int, widths: Sequence[float],
                 min_channels: int, device: torch.device = torch.device("cpu")):
        self.model, self.img_size, self.batch_size, self.device = model, img_size, batch_size, device
        self.widths = list(widths)
        self.grid = grid_channels(model, self.widths, min_channels)
        self.slot = model.stats_slot(model.largest)
        self.sizes = part_inputs(model, img_size)
        self.parts = model.export_parts(model.smallest, self.slot)  # names and groups; the modules are rebuilt

    def entries(self, index: int) -> list[tuple[str, Callable[[], Timed]]]:
        """(key, a maker of the entry) of part `index` at every point of its grid, in grid order. The key names
        what the entry's cost depends on (`entry_key`); the entry itself is made only when it is timed."""
        part = self.parts[index]
        axes = _axes(part)
        points = [()]
        for g in axes:
            points = [p + (c,) for p in points for c in self.grid[g]]
        found = []
        for point in points:
            channels = dict(zip(axes, point))
            plan = self.model.resolve_width({name: channels.get(g, c) for g, (name, c) in
                                             enumerate(zip(self.model.group_names, self.model.largest.channels))})
            (at,) = self.model.export_parts(plan, self.slot, names={part.name})
            shapes = self._input_shapes(at, plan)
            found.append((entry_key(at.module, shapes), lambda at=at, shapes=shapes: self._timed(at, shapes)))
        return found

    def _input_shapes(self, part: Part, plan: WidthPlan) -> list[tuple[int, ...]]:
        height, width = self.sizes[part.name]
        in_channels = self.model.config.in_chans if part.in_group is None else plan.channels[part.in_group]
        shapes = [(self.batch_size, in_channels, height, width)]
        if part.skip:
            shapes.append((self.batch_size, plan.channels[part.out_group], height, width))
        return shapes

    def _timed(self, part: Part, shapes: list[tuple[int, ...]]) -> Timed:
        return Timed(_Runnable(part).to(self.device),
                     tuple(torch.randn(shape, device=self.device) for shape in shapes))

    def whole(self, plan: WidthPlan) -> Timed:
        """The whole dense network of `plan`, BN folded, as deployed."""
        size = self.img_size
        return Timed(deployed_network(self.model, plan).to(self.device),
                     (torch.randn(self.batch_size, self.model.config.in_chans, size, size, device=self.device),))


def deployed_network(model: SlimNetwork, plan: WidthPlan) -> nn.Module:
    """The dense network of any plan as deployed, BN folded. Its BN statistics are the largest width's, whichever
    the plan: a latency does not depend on them."""
    dense = nn.Sequential(model.export_layers(plan, model.stats_slot(model.largest))).eval()
    return fold_batch_norms(dense)


def entry_key(module: nn.Module, shapes: list[tuple[int, ...]]) -> str:
    """What identifies an entry's cost: its layers and input shapes (two blocks alike share one timing)."""
    text = f"{module!r}|{shapes}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def network_description(model: SlimNetwork) -> dict[str, Any]:
    return {key: value for key, value in model.config.to_dict().items() if key not in NOT_NETWORK_KEYS}


def build_table(builder: TableBuilder, measure: Callable[[Sequence[Timed]], list[float]], settings: dict[str, Any],
                out: str | Path | None = None, previous: dict[str, Any] | None = None,
                progress: bool = False) -> dict[str, Any]:
    """Time every part (reusing the timings of `previous`, a partial table of the same settings), then the whole
    network at every width choice; write the table to `out` after each part. Returns the table."""
    from tqdm import tqdm

    model = builder.model
    names = model.group_names
    seconds: dict[str, float] = dict(previous["seconds"]) if previous else {}
    table = {"format": FORMAT, "version": VERSION, **settings,
             "grid": {name: channels for name, channels in zip(names, builder.grid)},
             "parts": [], "seconds": seconds, "scale": None, "overhead": None, "calibration": []}
    bar = tqdm(total=len(builder.parts) + 1, unit="part", disable=not progress, file=sys.stderr,
               desc="latency table")
    for index, part in enumerate(builder.parts):
        bar.set_postfix_str(part.name)
        entries = builder.entries(index)
        keys = [key for key, _ in entries]
        todo = {key: make for key, make in entries if key not in seconds}
        if todo:
            seconds.update(zip(todo, measure([make() for make in todo.values()])))
        axes = _axes(part)
        table["parts"].append({"name": part.name, "axes": [names[g] for g in axes],
                               "in": None if part.in_group is None else names[part.in_group],
                               "out": None if part.out_group is None else names[part.out_group],
                               "keys": _nest(keys, [len(builder.grid[g]) for g in axes])})
        if out is not None:
            write_table(out, table)
        bar.update()
    bar.set_postfix_str("whole networks")
    wholes = measure([builder.whole(plan) for plan in model.choice_plans])
    predicted = LatencyTable(table, "the table being built")  # its parts: enough for parts_seconds
    for width, plan, measured in zip(model.widths, model.choice_plans, wholes):
        table["calibration"].append({"width": width, "measured": measured, "parts": predicted.parts_seconds(plan)})
    table["scale"], table["overhead"] = fit_line([c["parts"] for c in table["calibration"]],
                                                 [c["measured"] for c in table["calibration"]])
    if out is not None:
        write_table(out, table)
    bar.update()
    bar.close()
    return table


def fit_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line through (x, y); slope 1 when the x do not vary."""
    mx, my = statistics.fmean(x), statistics.fmean(y)
    spread = sum((a - mx) ** 2 for a in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / spread if spread > 0 else 1.0
    return slope, my - slope * mx


def _nest(flat: list, shape: list[int]) -> list:
    if len(shape) <= 1:
        return flat
    step = len(flat) // shape[0]
    return [_nest(flat[i:i + step], shape[1:]) for i in range(0, len(flat), step)]


def write_table(path: str | Path, table: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(table, indent=1) + "\n")


# ---- predicting from a table -----------------------------------------------------------------------------------------


class LatencyTable:
    """A table read from JSON; `predict(plan)` is a plan's latency in seconds (see the module docstring)."""

    def __init__(self, data: dict[str, Any], source: str):
        self.data, self.source = data, source
        self.grid: dict[str, list[int]] = data["grid"]
        self._parts = [(p["axes"], _values(p["keys"], data["seconds"])) for p in data["parts"]]

    @classmethod
    def read(cls, path: str | Path) -> "LatencyTable":
        file = Path(path)
        if not file.is_file():
            raise UserError(f"latency table {str(path)!r} does not exist")
        try:
            data = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"latency table {str(path)!r} is not readable JSON: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"{str(path)!r} is not a dsnet latency table (python -m dsnet.latency writes them)")
        if data.get("version") != VERSION:
            raise UserError(f"latency table {str(path)!r} has version {data.get('version')}; this dsnet reads "
                            f"version {VERSION}")
        if data.get("overhead") is None:
            raise UserError(f"latency table {str(path)!r} is incomplete: run python -m dsnet.latency with the same "
                            f"--out again to finish it")
        try:
            return cls(data, str(path))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"latency table {str(path)!r} is damaged: remake it with python -m dsnet.latency") \
                from None

    @property
    def overhead(self) -> float:
        return float(self.data["overhead"])

    @property
    def scale(self) -> float:
        return float(self.data["scale"])

    def describe(self) -> str:
        d = self.data
        return (f"{d['runtime']} on {d['device']}, batch {d['batch_size']}, {d['threads']} thread(s), "
                f"{d['img_size']}×{d['img_size']}")

    def check(self, model: SlimNetwork, img_size: int) -> None:
        """UserError when the table was made for another network, width set or input size than `model`'s."""
        ours, theirs = network_description(model), {"arch": DEFAULT_ARCH, **self.data["network"]}
        for key in ours:
            if theirs.get(key) != ours[key]:
                what = "width set" if key == "widths" else key
                raise UserError(f"latency table {self.source!r} was made for another network: its {what} is "
                                f"{theirs.get(key)}, this checkpoint's is {ours[key]}")
        if self.data["img_size"] != img_size:
            raise UserError(f"latency table {self.source!r} was made for {self.data['img_size']}×"
                            f"{self.data['img_size']} inputs; this network runs at {img_size}×{img_size}")

    def parts_seconds(self, plan: WidthPlan) -> float:
        """The sum of the plan's parts, before the fitted line."""
        channels = plan.as_dict()
        return sum(_interpolate(values, [self._position(g, channels[g]) for g in axes])
                   for axes, values in self._parts)

    def predict(self, plan: WidthPlan) -> float:
        """Predicted seconds of one call of the dense network of `plan` at the table's batch size."""
        return self.scale * self.parts_seconds(plan) + self.overhead

    def _position(self, group: str, channels: int) -> tuple[int, float]:
        """(index of the grid point at or below `channels`, fraction of the way to the next) in `group`'s grid."""
        grid = self.grid[group]
        if not grid[0] <= channels <= grid[-1]:
            raise UserError(f"latency table {self.source!r} has no timings of layer group '{group}' at {channels} "
                            f"channels: it covers {grid[0]} to {grid[-1]} (make it with a lower --min-channels)")
        if len(grid) == 1:
            return 0, 0.0
        i = min(bisect_right(grid, channels) - 1, len(grid) - 2)
        return i, (channels - grid[i]) / (grid[i + 1] - grid[i])


def _values(keys: Any, seconds: dict[str, float]) -> Any:
    return [_values(k, seconds) for k in keys] if isinstance(keys, list) else float(seconds[keys])


def _interpolate(values: Any, positions: list[tuple[int, float]]) -> float:
    """Multilinear interpolation of nested lists `values` at `positions` (one (index, fraction) per axis)."""
    if not positions:
        return values
    (i, t), rest = positions[0], positions[1:]
    low = _interpolate(values[i], rest)
    return low if t == 0 else (1 - t) * low + t * _interpolate(values[i + 1], rest)


def check_latency_budget(target: float, table: LatencyTable, fastest: WidthPlan, slowest: WidthPlan) -> float:
    """`target` seconds, or UserError when no plan between `fastest` and `slowest` can meet it."""
    low, high = table.predict(fastest), table.predict(slowest)
    if target < low:
        raise UserError(f"latency budget {format_ms(target)} is below the {format_ms(low)} that the fastest allowed "
                        f"plan needs ({table.describe()})")
    return min(target, high)


def read_table_for(path: str, model: SlimNetwork, img_size: int) -> LatencyTable:
    """The table at `path`, checked against `model` at `img_size`."""
    table = LatencyTable.read(path)
    table.check(model, img_size)
    return table


# ---- command line: python -m dsnet.latency --------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m dsnet.latency",
        description="Time every part of a supernet's deployed dense network (BN folded) at every width on this "
                    "machine, and write a latency table that predicts the latency of any plan: a width, a searched "
                    "or pruned plan, a gate's routes. Stopped part-way, it resumes with the same --out; run again "
                    "on a finished table, it recalibrates it: only the whole networks are timed again.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="CKPT", help="a dsnet checkpoint (stage I or II): its supernet")
    source.add_argument("-c", "--config", metavar="RECIPE", help="a train.py recipe: the supernet it would train")
    parser.add_argument("--num-classes", type=POSITIVE_INT, metavar="N",
                        help="with -c: classes of the classifier (default: the recipe's, else its dataset's)")
    parser.add_argument("--out", required=True, metavar="LUT.json", help="the table (JSON); its directory must exist")
    parser.add_argument("--runtime", choices=RUNTIMES, default="torch",
                        help="what runs the network: torch (eager) or onnxruntime (CPU) (default: torch)")
    parser.add_argument("--device", default="cpu", help="torch runtime: cpu, cuda, cuda:N (default: cpu)")
    parser.add_argument("--threads", type=POSITIVE_INT, default=2, metavar="N",
                        help="intra-op threads of the runtime (default: 2)")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=1, metavar="B",
                        help="batch size the table predicts for (default: 1)")
    parser.add_argument("--img-size", type=POSITIVE_INT, metavar="S",
                        help="input size (default: the checkpoint's or recipe's)")
    parser.add_argument("--widths", type=float, nargs="+", metavar="W",
                        help="the width choices whose channel counts are timed, the narrowest and widest included "
                             "(default: all; other counts are interpolated)")
    parser.add_argument("--min-channels", type=POSITIVE_INT, default=8, metavar="N",
                        help="the floor timed in every group, as search and prune narrow to it (default 8)")
    parser.add_argument("--repeats", type=POSITIVE_INT, default=10, metavar="R",
                        help="timed runs per entry; the median is kept (default 10)")
    parser.add_argument("--warmup", type=NON_NEGATIVE_INT, default=3, metavar="R",
                        help="untimed runs per entry first (default 3)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def supernet_of_recipe(path: str, num_classes: int | None) -> tuple[SlimNetwork, int]:
    from .config import defaults, load_recipe, model_config, validate
    from .data import DigitsDataset
    from .archs import create_model

    config = {**defaults(), **load_recipe(path)}
    validate(config)
    known = {"digits": DigitsDataset.num_classes, "cifar10": 10, "cifar100": 100, "mnist": 10, "fashion-mnist": 10}
    classes = num_classes or config["num_classes"] or known.get(config["data"])
    if classes is None:
        raise UserError(f"recipe {path!r} does not fix the number of classes; pass --num-classes")
    return create_model(model_config(config, classes)).eval(), int(config["img_size"])


def main(argv: list[str] | None = None) -> int:
    from .cli_inputs import check_output_path, input_size, open_checkpoint, resolve_device

    args = build_parser().parse_args(argv)
    check_output_path(args.out)
    device = resolve_device(args.device)
    if args.runtime == "onnxruntime" and device.type != "cpu":
        raise UserError("--runtime onnxruntime runs on the CPU; leave --device at cpu")
    if args.checkpoint is not None:
        state, model, _ = open_checkpoint(args.checkpoint, None, gated=None)
        model = getattr(model, "supernet", model)
        img_size = input_size(state, model)
    else:
        model, img_size = supernet_of_recipe(args.config, args.num_classes)
    img_size = args.img_size or img_size
    widths = sorted(args.widths) if args.widths else list(model.widths)
    for w in widths:
        _choice(model, w)
    if widths[0] != model.widths[0] or widths[-1] != model.widths[-1]:
        raise UserError(f"--widths must include the narrowest and widest width choices, {model.widths[0]} and "
                        f"{model.widths[-1]}, so that every width lies between timed ones")
    keep_freed_memory()  # as eval.py's latency figures do: a call reuses freed memory instead of page-faulting fresh
    reserve_kernel_cache()
    with torch_threads(args.threads):
        _time_table(args, model, img_size, widths, device)
    return 0


def _time_table(args, model, img_size: int, widths: list[float], device: torch.device) -> None:
    """Build, resume or recalibrate the table `args.out` of `model` and print what was written."""
    settings = {"network": network_description(model), "img_size": img_size, "batch_size": args.batch_size,
                "threads": args.threads, "device": str(device), "runtime": args.runtime,
                "timed_widths": widths, "min_channels": args.min_channels,
                "repeats": args.repeats, "warmup": args.warmup}
    previous = _previous_table(args.out, settings)
    model.to(device)
    builder = TableBuilder(model, img_size, args.batch_size, widths, args.min_channels, device)
    measure = (torch_timer(args.repeats, args.warmup, device) if args.runtime == "torch" else
               onnxruntime_timer(args.repeats, args.warmup, args.threads))
    if previous and previous.get("overhead") is not None:
        print(f"recalibrating {args.out}: its {len(previous['seconds'])} entries are kept, the whole networks are "
              f"timed again")
    elif previous:
        print(f"resuming {args.out}: {len(previous['seconds'])} entries already timed")
    table = build_table(builder, measure, settings, args.out, previous, progress=not args.no_progress)
    calibration = ", ".join(f"{c['width']}: {format_ms(c['measured'])}" for c in table["calibration"])
    print(f"wrote {args.out}: {len(table['seconds'])} entries over {len(table['parts'])} parts "
          f"({LatencyTable(table, args.out).describe()}); whole network {calibration}; fitted line "
          f"{table['scale']:.3f} · parts + {format_ms(table['overhead'])}")


def _previous_table(path: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The partial or finished table at `path` when it was made with `settings`; None when there is none."""
    file = Path(path)
    if not file.exists():
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"--out {path!r} exists and is not a latency table; remove it or choose another path")
    differing = [k for k in settings if data.get(k) != settings[k]]
    if differing:
        raise UserError(f"--out {path!r} holds a table made with another {differing[0].replace('_', ' ')}; remove "
                        f"it or choose another path")
    return data


if __name__ == "__main__":
    run_main(main)
