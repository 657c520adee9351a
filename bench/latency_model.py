"""How well a latency table predicts: for random per-group plans and every width choice, the table's prediction
against the latency of the whole exported network (BN folded), measured side by side.

For each batch size, the bench builds a table of the ImageNet-layout supernet (random weights: latency does not depend
on them) with `dsnet.latency`'s own builder, timing the channel counts of `--table-widths` only, so every other
width and every random plan is interpolated. It then times the whole dense network of each plan, interleaved repeat
by repeat (`dsnet/timing.py`), and prints predicted against measured. The last line is the median absolute error,
with the table as built and recalibrated.

A shared machine's speed drifts between the table's timing and the bench's, by more than the table's own error: the
width choices are timed in both, so the bench prints their ratio (the drift). It then recalibrates the table as
`python -m dsnet.latency` run again on a finished table does, fitting its line again to the width choices, here timed
in the same interleaved loop as the plans, and prints the random plans' error under that line: they are held out of
the fit, so this is the error of the table's parts, the part of the prediction a recalibration does not refresh.

A random plan gives each group its own multiplier, uniform between the narrowest and widest width choice, of its
widest channel count, rounded to a multiple of 8 as timm rounds (at least the table's floor): the plans the
channel-level search returns. (Counts off the multiples of 8 run slower than their neighbours on the CPU kernels,
so a table timed at multiples of 8 does not predict them.)

    python bench/latency_model.py [--batch-sizes 1 32] [--threads 2] [--runtime torch] [--plans 20]
                                  [--table-widths 0.35 0.5 0.75 1.0] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics

import torch
from timm.layers import make_divisible

import dsnet
from dsnet.cpu_memory import keep_freed_memory
from dsnet.files import write_text_atomic
from dsnet.latency import (LatencyTable, TableBuilder, build_table, fit_line, network_description, onnxruntime_timer,
                           torch_timer)
from dsnet.timing import reserve_kernel_cache


def random_plans(model: dsnet.DSMobileNetV2, count: int, floor: int, rng: random.Random) -> list:
    low, high = model.widths[0], model.widths[-1]
    return [model.resolve_width({name: max(min(floor, m), min(m, make_divisible(m * rng.uniform(low, high) / high)))
                                 for name, m in zip(model.group_names, model.max_channels)}) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch")
    parser.add_argument("--plans", type=int, default=20, help="random per-group plans (default 20)")
    parser.add_argument("--table-widths", type=float, nargs="+", default=[0.35, 0.5, 0.75, 1.0])
    parser.add_argument("--min-channels", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()
    reserve_kernel_cache()  # before the first convolution: the interleaved loop times many networks
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as python -m dsnet.latency and eval.py do
    model = dsnet.create_supernet(num_classes=1000, img_size=args.img_size).eval()
    plans = [(f"width {w:g}", model.choice_plans[i]) for i, w in enumerate(model.widths)]
    plans += [(f"random {k}", p) for k, p in enumerate(random_plans(model, args.plans, args.min_channels,
                                                                    random.Random(args.seed)))]
    measure = (torch_timer(args.repeats, args.warmup, torch.device("cpu")) if args.runtime == "torch" else
               onnxruntime_timer(args.repeats, args.warmup, args.threads))
    print(f"torch {torch.__version__}; {args.runtime}, {args.threads} thread(s), {args.img_size} px; table timed at "
          f"widths {args.table_widths} and {args.min_channels} channels; medians of {args.repeats} after "
          f"{args.warmup} warm-up")
    report = {"command": "python bench/latency_model.py", "args": vars(args), "results": []}
    errors_all, errors_recalibrated = [], []
    for batch in args.batch_sizes:
        builder = TableBuilder(model, args.img_size, batch, args.table_widths, args.min_channels)
        settings = {"network": network_description(model), "img_size": args.img_size, "batch_size": batch,
                    "threads": args.threads, "device": "cpu", "runtime": args.runtime}
        table = LatencyTable(build_table(builder, measure, settings), "bench")
        measured = measure([builder.whole(plan) for _, plan in plans])
        print(f"\nbatch {batch}: fitted line {table.scale:.3f} · parts + {table.overhead * 1e3:.3f} ms")
        print(f"{'plan':>12} {'MAdds':>9} {'predicted ms':>13} {'measured ms':>12} {'error':>8}")
        rows = []
        for (label, plan), real in zip(plans, measured):
            predicted = table.predict(plan)
            error = predicted / real - 1
            rows.append({"plan": label, "madds": dsnet.count_madds(model, plan, args.img_size),
                         "predicted_ms": predicted * 1e3, "measured_ms": real * 1e3, "error": error})
            print(f"{label:>12} {rows[-1]['madds'] / 1e6:8.1f}M {predicted * 1e3:13.3f} {real * 1e3:12.3f} "
                  f"{100 * error:+7.1f}%")
        errors = [abs(r["error"]) for r in rows]
        errors_all += errors
        median = statistics.median(errors)
        print(f"batch {batch}: median absolute error {100 * median:.1f}%, largest {100 * max(errors):.1f}% "
              f"(the table's line, fitted when it was built)")
        # Recalibrated beside the plans: the line fitted again to the width choices timed in the same interleaved
        # loop (what `python -m dsnet.latency` run again on the finished table does), the random plans held out.
        count = len(model.widths)  # the plans start with the width choices
        scale, overhead = fit_line([table.parts_seconds(plan) for _, plan in plans[:count]], measured[:count])
        for row, (_, plan), real in zip(rows[count:], plans[count:], measured[count:]):
            row["error_recalibrated"] = (scale * table.parts_seconds(plan) + overhead) / real - 1
        held_out = [abs(r["error_recalibrated"]) for r in rows[count:]]
        errors_recalibrated += held_out
        drift = statistics.median(real / c["measured"] for real, c in zip(measured[:count], table.data["calibration"]))
        print(f"batch {batch}: the width choices ran ×{drift:.3f} the time the table measured for them; recalibrated "
              f"beside the plans, the {len(held_out)} random plans' median absolute error is "
              f"{100 * statistics.median(held_out):.1f}%, largest {100 * max(held_out):.1f}%")
        report["results"].append({"batch_size": batch, "scale": table.scale, "overhead_ms": table.overhead * 1e3,
                                  "median_abs_error": median, "drift": drift, "recalibrated_scale": scale,
                                  "recalibrated_overhead_ms": overhead * 1e3,
                                  "random_plans_error_recalibrated": statistics.median(held_out), "rows": rows})
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=1) + "\n")
    print(f"median absolute error over {len(errors_all)} predictions: {100 * statistics.median(errors_all):.1f}% "
          f"with the table as built; over the {len(errors_recalibrated)} random plans with the table recalibrated "
          f"beside them: {100 * statistics.median(errors_recalibrated):.1f}%")


if __name__ == "__main__":
    main()
