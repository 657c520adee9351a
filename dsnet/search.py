"""Width search (AutoSlim) on a trained supernet: the per-layer plan that keeps the most accuracy under a MAdds budget.

Starting from a width choice, every step tries narrowing each channel group by enough `--step`-channel steps to save
the step's share of the MAdds, recalibrates the BN statistics of that candidate on a few training batches, measures
its cross-entropy and top-1 on held-out training batches, and keeps the candidate that adds the least held-out loss
per MAdds saved, until the plan fits the budget. Equal savings and loss rather than one step per group and top-1: on a
few hundred held-out images top-1 ties often, noise decides the ties, and the search then spends its steps on groups
whose narrowing saves almost nothing.

AutoSlim starts from the largest width. A supernet trained at uniform widths knows its width choices best, so by
default the search starts from the narrowest choice that is still above the budget: the plans it visits stay close
to a trained one. The widest width choice within the budget is a plan the search could return as well: when it beats
the searched plan on the held-out batches, the search returns it (and says so).

`python -m dsnet.search --checkpoint CKPT --target-madds 150M --out PLAN.json` writes the plan for
`python -m dsnet.export --plan PLAN.json`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from torch.utils.data import Subset

from .bn_slots import recalibrate_bn
from .cli import NON_NEGATIVE_INT, POSITIVE_INT, ArgumentParser, parse_quantity, run_main
from .errors import UserError
from .cli_inputs import (add_checkpoint_args, add_data_args, add_device_arg, check_output_path, input_size,
                         open_checkpoint, resolve_device, training_data_options)
from .cpu_memory import keep_freed_memory
from .data import DataOptions, build_dataset, build_loader, build_transform
from .madds import count_madds, count_params
from .metrics import batch_sums, metric_sums, summarize
from .plans import write_plan_file
from .supernet import SlimNetwork
from .latency import check_latency_budget, format_ms, parse_latency, read_table_for
from .widths import WidthPlan

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_madds_target(text: str, largest_madds: int, smallest_madds: int | None = None) -> int:
    """A MAdds budget from `150M`, `1.2e8`, `2G` (absolute) or `0.5` (a value ≤ 1: that fraction of the largest).

    UserError when the text is not a count, or the budget is above `largest_madds` or below `smallest_madds`.
    """
    quantity = parse_quantity(text, "[kKmMgG]?")
    if quantity is None:
        raise UserError(f"MAdds target {text!r} is not a positive count (150M, 1.2e8, 2G) or fraction (0.5)")
    value, suffix = quantity[0], quantity[1].lower()
    target = round(value * largest_madds) if not suffix and value <= 1 else round(value * _SUFFIXES[suffix])
    if target > largest_madds:
        raise UserError(f"MAdds target {_millions(target)} is above the largest width's {_millions(largest_madds)}")
    if smallest_madds is not None and target < smallest_madds:
        raise UserError(f"MAdds target {_millions(target)} is below the {_millions(smallest_madds)} that the "
                        f"narrowest allowed plan needs")
    return target


def _millions(madds: int) -> str:
    return f"{madds / 1e6:.2f}M"


@dataclass
class SearchStep:
    madds: int
    params: int
    top1: float  # held-out top-1 of the plan after this step, in percent
    loss: float  # its held-out cross-entropy
    narrowed: str | None  # the group (or stage) narrowed in this step (None: the starting plan)
    channels: int | float | None  # its new channel count (its new width multiplier, for a stage)
    cost: float | None = None  # what the budget limits: MAdds, or the predicted latency in seconds


@dataclass
class SearchResult:
    plan: WidthPlan
    madds: int
    params: int
    top1: float
    trajectory: list[SearchStep] = field(default_factory=list)
    loss: float = math.nan
    # The width choice returned instead of the trajectory's end, when one within the budget did better on the
    # held-out batches (None: the searched plan).
    width_choice: float | None = None
    searched: WidthPlan | None = None  # the trajectory's end


@dataclass
class _Candidate:
    plan: WidthPlan
    top1: float
    loss: float
    madds: int
    narrowed: str
    channels: int | float
    stages: tuple[int, ...] | None  # per-stage choice indices, when the search moves whole stages

    def cost(self, loss: float, madds: int, needed: int) -> tuple[bool, float]:
        """Sort key from the current plan's (loss, madds): candidates that save the `needed` MAdds first, then the
        least held-out loss added per MAdds saved."""
        saved = madds - self.madds
        return saved < needed, (self.loss - loss) / saved


Cost = Callable[[WidthPlan], float]  # what a budget limits: MAdds (the default) or a predicted latency


def madds_cost(model: SlimNetwork, img_size: int | None) -> Cost:
    return lambda plan: count_madds(model, plan, img_size)


def start_plan(model: SlimNetwork, target: float, start: str, img_size: int | None = None,
               cost: Cost | None = None) -> WidthPlan:
    """Where a search begins: `largest` (AutoSlim), or `nearest`: the narrowest width choice whose cost (MAdds by
    default) is at least `target` (the largest when every choice is below it)."""
    cost = cost or madds_cost(model, img_size)
    if start == "largest":
        return model.largest
    if start != "nearest":
        raise ValueError(f"start must be 'nearest' or 'largest', got {start!r}")
    return next((plan for plan in model.choice_plans if cost(plan) >= target), model.largest)


def narrowest_plan(model: SlimNetwork, min_channels: int) -> WidthPlan:
    """Every group at `min_channels`, or at its maximum where that is smaller: where a search can end up."""
    return model.resolve_width({n: min(m, min_channels) for n, m in zip(model.group_names, model.max_channels)})


def evaluate_plan(model: SlimNetwork, width, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
                  ) -> tuple[float, float]:
    """(top-1 in percent, mean cross-entropy) of `width` on (images, targets) batches, with its BN statistics."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        sums = metric_sums(lambda images, targets: batch_sums(model(images, width), targets), batches, device)
    finally:
        model.train(was_training)
    figures = summarize(sums)
    return figures["top1"], figures["loss"]


def evaluate_top1(model: SlimNetwork, width, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy in percent of `width` on (images, targets) batches, with the BN statistics it has."""
    return evaluate_plan(model, width, batches)[0]


def search_batches(options: DataOptions, calibration: int, evaluation: int, batch_size: int,
                   seed: int = 0) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Disjoint batches of the training split (evaluation transforms): images for BN recalibration, then
    (images, targets) held out for measuring accuracy. One seeded shuffle picks both."""
    dataset = build_dataset(options, train=True, transform=build_transform(options, train=False))
    needed = (calibration + evaluation) * batch_size
    if needed > len(dataset):
        raise UserError(f"{calibration} recalibration and {evaluation} evaluation batches of {batch_size} need "
                        f"{needed} training images; {options.data} has {len(dataset)}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = calibration * batch_size

    def load(indices: list[int]) -> list:
        return list(build_loader(Subset(dataset, indices), batch_size, train=False))

    calibration_batches = [images for images, _ in load(order[:cut])]
    return calibration_batches, load(order[cut:needed])


def _group_moves(model: SlimNetwork, plan: WidthPlan, madds: float, needed: float, step: int, min_channels: int,
                 cost: Cost):
    """(group, channels, width, cost) of each group narrowed by as many `step`-channel steps as saving `needed`
    takes (fewer where `min_channels` stops it)."""
    channels = plan.as_dict()
    for name in model.group_names:
        narrower, candidate_madds, candidate = channels[name], madds, None
        while madds - candidate_madds < needed and narrower > min_channels:
            narrower = max(narrower - step, min_channels)
            candidate = {**channels, name: narrower}
            candidate_madds = cost(model.resolve_width(candidate))
        if candidate is not None:
            yield name, narrower, candidate, candidate_madds


def _stage_moves(model: SlimNetwork, stages: tuple[int, ...], madds: float, needed: float, cost: Cost):
    """(stage, multiplier, per-stage choice indices, cost) of each stage moved down as many width choices as saving
    `needed` takes (fewer at the smallest choice)."""
    for s, name in enumerate(model.stage_names):
        index, candidate_madds, candidate = stages[s], madds, None
        while madds - candidate_madds < needed and index > 0:
            index -= 1
            candidate = (*stages[:s], index, *stages[s + 1:])
            candidate_madds = cost(model.resolve_width(candidate))
        if candidate is not None and candidate_madds < madds:  # the head, for one, never narrows below 1280
            yield name, model.widths[index], candidate, candidate_madds


def search_plan(model: SlimNetwork, target_madds: int, calibration_batches: Sequence[torch.Tensor],
                eval_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], step: int = 8, min_channels: int = 8,
                img_size: int | None = None,
                progress: Callable[[SearchStep, int, float], None] | None = None,
                start: str = "nearest", steps: int = 10, granularity: str = "channels",
                cost: Cost | None = None) -> SearchResult:
    """Greedily narrow a width choice until its MAdds are at most `target_madds` (see the module docstring);
    `start` is `nearest` or `largest` (see `start_plan`). With `cost` (a plan's predicted latency, say) the budget
    `target_madds` and the saving of each move are in its unit instead of MAdds.

    The way from the start to the target is cut into about `steps` equal MAdds savings. Each candidate narrows one
    group by as many `step`-channel steps as that saving needs (fewer where `min_channels` stops it), so the
    candidates of a step cost about the same and their held-out losses compare fairly. With
    ``granularity="stage"`` a candidate moves one whole stage down as many width choices as the saving needs
    instead: the plans are the per-stage plans that stage I trains with `--num-random-plans`.
    `progress(step, candidates, seconds)` is called after every step. The model's custom BN slot is left
    calibrated for the plan returned (when it is not a width choice).
    """
    if granularity not in ("channels", "stage"):
        raise ValueError(f"granularity must be 'channels' or 'stage', got {granularity!r}")
    if granularity == "stage" and model.config.slim_from is not None:
        raise ValueError(f"stage granularity moves every stage across the width choices, but this gate-aware "
                         f"supernet trained its layers before {model.config.slim_from} at one width only: use "
                         "granularity channels")
    if step < 1 or min_channels < 1 or steps < 1:
        raise ValueError(f"step, min_channels and steps must be at least 1, got {step}, {min_channels} and {steps}")
    measure = cost or madds_cost(model, img_size)
    floor = measure(narrowest_plan(model, min_channels))
    if target_madds < floor:
        raise ValueError(f"the target {target_madds:g} is below the {floor:g} that the narrowest allowed plan needs")
    plan = start_plan(model, target_madds, start, img_size, measure)
    stages = (plan.choice,) * len(model.stage_names) if granularity == "stage" else None
    madds = measure(plan)
    saving = (madds - target_madds) / steps if cost is not None else max(1, math.ceil((madds - target_madds) / steps))
    top1, loss = evaluate_plan(model, plan, eval_batches)
    trajectory = [SearchStep(count_madds(model, plan, img_size), count_params(model, plan), top1, loss, None, None,
                             madds)]
    while madds > target_madds:
        began = time.perf_counter()
        needed = min(saving, madds - target_madds)
        moves = (_stage_moves(model, stages, madds, needed, measure) if stages is not None else
                 _group_moves(model, plan, madds, needed, step, min_channels, measure))
        candidates = []
        for name, value, width, candidate_madds in moves:
            candidate = model.resolve_width(width)
            if candidate.choice is None:  # a width choice keeps its own statistics
                recalibrate_bn(model, candidate, calibration_batches)
            candidates.append(_Candidate(candidate, *evaluate_plan(model, candidate, eval_batches), candidate_madds,
                                         name, value, width if stages is not None else None))
        if not candidates:
            raise ValueError(f"no layer group can be narrowed further, and MAdds {_millions(madds)} are still "
                             f"above the target {_millions(target_madds)}")
        # min keeps the first of equal candidates: the earlier group.
        best = min(candidates, key=lambda c: c.cost(loss, madds, needed))
        plan, madds, top1, loss, stages = best.plan, best.madds, best.top1, best.loss, best.stages
        trajectory.append(SearchStep(count_madds(model, plan, img_size), count_params(model, plan), top1, loss,
                                     best.narrowed, best.channels, madds))
        if progress is not None:
            progress(trajectory[-1], len(candidates), time.perf_counter() - began)
    if not model.has_bn_statistics(plan):
        recalibrate_bn(model, plan, calibration_batches)
    result = SearchResult(plan, count_madds(model, plan, img_size), count_params(model, plan), top1, trajectory, loss,
                          searched=plan)
    # The widest width choice within the budget is a plan the search could return too, and the supernet trained it:
    # the result is never worse on the held-out batches (top-1, then loss) than that width.
    within = [i for i, choice in enumerate(model.choice_plans) if measure(choice) <= target_madds]
    if within and within[-1] != plan.choice:
        i = within[-1]
        choice_top1, choice_loss = evaluate_plan(model, i, eval_batches)
        if (choice_top1, -choice_loss) > (top1, -loss):
            choice = model.choice_plans[i]
            result = SearchResult(choice, count_madds(model, choice, img_size), count_params(model, choice),
                                  choice_top1, trajectory, choice_loss, model.widths[i], plan)
    return result


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m dsnet.search",
        description="AutoSlim width search on a trained supernet: from a width choice, repeatedly narrow the "
                    "layer group that costs the least held-out accuracy, until the plan's MAdds meet the target; "
                    "write the plan as JSON for python -m dsnet.export --plan.")
    add_checkpoint_args(parser)
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-madds", metavar="M",
                        help="MAdds budget per image: an absolute count (150M, 1.2e8, 2G) or, for a value ≤ 1, a "
                             "fraction of the largest width's MAdds (0.5)")
    budget.add_argument("--target-latency", metavar="T",
                        help="latency budget of the dense network, as --lut predicts it (4ms, 800us): the budget "
                             "and the cost of every move are predicted latency instead of MAdds")
    parser.add_argument("--lut", metavar="LUT.json",
                        help="latency table of this supernet (python -m dsnet.latency); needed by --target-latency")
    parser.add_argument("--out", required=True, metavar="PLAN.json",
                        help="output plan file; its directory must exist")
    add_data_args(parser)
    parser.add_argument("--start", choices=("nearest", "largest"), default="nearest",
                        help="the width choice the search narrows: nearest, the narrowest choice above the target "
                             "(default), or largest, AutoSlim's start")
    parser.add_argument("--steps", type=POSITIVE_INT, default=10, metavar="N",
                        help="steps from the start to the target, each saving about the same MAdds (default 10)")
    parser.add_argument("--granularity", choices=("stage", "channels"), default="channels",
                        help="what one move narrows: stage, a whole stage down to a narrower width choice (the "
                             "plans stage I trains with --num-random-plans), or channels, one layer group by "
                             "--step channels (default: channels)")
    parser.add_argument("--step", type=POSITIVE_INT, default=8, metavar="N",
                        help="channel granularity: a group narrows by multiples of this many channels (default 8)")
    parser.add_argument("--min-channels", type=POSITIVE_INT, default=8, metavar="N",
                        help="no group is narrowed below this many channels (default 8)")
    parser.add_argument("--eval-batches", type=POSITIVE_INT, default=8, metavar="N",
                        help="held-out training batches on which each candidate's top-1 is measured (default 8)")
    parser.add_argument("--recalibrate-batches", type=POSITIVE_INT, default=4, metavar="N",
                        help="training batches, disjoint from the held-out ones, on which each candidate's BN "
                             "statistics are recalibrated (default 4)")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=64, metavar="N", help="batch size (default 64)")
    parser.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, metavar="N",
                        help="seed of the shuffle that picks both sets of batches (default 0)")
    add_device_arg(parser, "search")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.target_latency is None) != (args.lut is None):
        parser.error("--target-latency and --lut go together")
    check_output_path(args.out)

    state, model, weights = open_checkpoint(args.checkpoint, args.weights)
    img_size = input_size(state, model)
    largest = count_madds(model, model.largest, img_size)
    narrowest = narrowest_plan(model, args.min_channels)
    cost, table = None, None
    if args.lut is not None:
        table = read_table_for(args.lut, model, img_size)
        cost = table.predict
        target = check_latency_budget(parse_latency(args.target_latency), table, narrowest, model.largest)
    else:
        target = parse_madds_target(args.target_madds, largest, count_madds(model, narrowest, img_size))
    model.to(resolve_device(args.device))
    keep_freed_memory()  # as train.py does by default: batches reuse freed memory instead of page-faulting fresh
    options = training_data_options(state, model, args.data, args.data_dir)
    calibration, held_out = search_batches(options, args.recalibrate_batches, args.eval_batches, args.batch_size,
                                           args.seed)
    budget = (f"predicted latency ≤ {format_ms(target)} ({table.describe()}; largest width "
              f"{format_ms(table.predict(model.largest))})" if table else
              f"MAdds ≤ {_millions(target)} at {img_size}×{img_size} (largest width {_millions(largest)})")
    print(f"searching for {budget}, {weights} weights, {len(held_out)} held-out batches of {args.batch_size} "
          f"{options.data} training images")

    def report(step: SearchStep, candidates: int, seconds: float) -> None:
        latency = f", predicted {format_ms(step.cost)}" if table else ""
        print(f"{step.narrowed} → {step.channels}: MAdds {_millions(step.madds)}{latency}, held-out top-1 "
              f"{step.top1:.2f}%, loss {step.loss:.4f} ({candidates} candidates, {seconds:.1f} s)", flush=True)

    result = search_plan(model, target, calibration, held_out, args.step, args.min_channels, img_size, report,
                         args.start, args.steps, args.granularity, cost)
    # The width choices on the same held-out batches (with their own BN statistics), to compare with.
    uniform = [dict(width=w, madds=count_madds(model, i, img_size),
                    **({"predicted_latency_s": table.predict(model.choice_plans[i])} if table else {}),
                    **dict(zip(("top1", "loss"), evaluate_plan(model, i, held_out))))
               for i, w in enumerate(model.widths)]
    end = result.trajectory[-1]
    if result.width_choice is not None:
        print(f"the searched plan (MAdds {_millions(end.madds)}, held-out top-1 {end.top1:.2f}%) is below width "
              f"choice {result.width_choice}, the widest within the budget; writing that width")
    settings = dict(start=args.start, steps=args.steps, granularity=args.granularity, step=args.step,
                    min_channels=args.min_channels, eval_batches=args.eval_batches,
                    recalibrate_batches=args.recalibrate_batches, batch_size=args.batch_size, seed=args.seed)
    write_plan_file(args.out, result.plan, madds=result.madds, params=result.params, top1=result.top1,
                    loss=result.loss, width_choice=result.width_choice, searched_plan=result.searched.as_dict(),
                    **({"target_latency_s": target, "predicted_latency_s": table.predict(result.plan),
                        "lut": args.lut} if table else {"target_madds": target}), img_size=img_size,
                    weights=weights, data=options.data, search=settings, uniform=uniform,
                    trajectory=[asdict(s) for s in result.trajectory])
    latency = f", predicted latency {format_ms(table.predict(result.plan))}" if table else ""
    print(f"wrote {args.out}: MAdds {_millions(result.madds)}{latency}, params {result.params / 1e6:.3f}M, held-out top-1 "
          f"{result.top1:.2f}%" + (f" (width {result.width_choice})" if result.width_choice is not None else
                                   f" after {len(result.trajectory) - 1} steps"))
    return 0


if __name__ == "__main__":
    run_main(main)
