"""Does one supernet match separately trained static networks? Top-1 per width, side by side.

Trains the supernet as the recipe says, then, with the same recipe (epochs, data, augmentation, EMA), one static
network at each of the smallest, a middle and the largest width (a supernet with that single width: plain
cross-entropy with label smoothing). Prints the final-epoch validation top-1 of each (EMA and live weights) and the
differences. Any train.py flag after the options below is passed to every run; `--static-flags` adds flags to the
static runs alone. The CIFAR-10 recipe clips the sandwich's gradients (it sums several losses
per step); give the static networks a single network's settings:

    python bench/supernet_vs_static.py --static-flags "--lr-base 0.4 --clip-grad 0" -c configs/cifar10.yaml \
        --data imagefolder --data-dir /tmp/cifar10-mini
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def final_row(run: Path) -> dict[str, float]:
    with open(run / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for k, v in rows[-1].items() if v != ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench-output", default="runs/supernet-vs-static", help="folder for the four runs")
    parser.add_argument("--static-widths", type=float, nargs=3, default=None,
                        help="smallest, middle and largest width to compare (default: the recipe's val widths)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings to run at once (a GPU has room for all four)")
    parser.add_argument("--json", help="also write the table as JSON here")
    parser.add_argument("--static-flags", default="", help="train.py flags for the static runs only, in one string "
                        "(they override the shared ones)")
    args, flags = parser.parse_known_args()
    out = Path(args.bench_output)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from dsnet.config import model_config, parse_config
    from dsnet.files import write_text_atomic
    from dsnet.stages import resolve_val_widths, width_label

    config, _ = parse_config(flags)
    widths = args.static_widths or resolve_val_widths(config, tuple(model_config(config, 1)["widths"]))
    val_flags = ["--val-widths", *map(str, widths)]
    runs = {"supernet": [*flags, *val_flags]}
    for w in widths:
        runs[f"static-{width_label(w)}"] = [*flags, "--widths", str(w), "--val-widths", str(w),
                                            *shlex.split(args.static_flags)]
    pending = list(runs.items())
    running: list[subprocess.Popen] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            name, run_flags = pending.pop(0)
            log = open(out / f"{name}.log", "w")
            print(f"training {name}", flush=True)
            running.append(subprocess.Popen([sys.executable, str(REPO / "train.py"), *run_flags, "--output",
                                             str(out / name), "--overwrite"], stdout=log, stderr=subprocess.STDOUT))
        done = running.pop(0)
        if done.wait() != 0:
            sys.exit(f"error: a training run failed (exit {done.returncode}); see the logs in {out}")
    supernet = final_row(out / "supernet")
    table = []
    for w in widths:
        label = width_label(w)
        static = final_row(out / f"static-{label}")
        table.append({"width": w,
                      "supernet_ema": supernet[f"ema_val_top1@{label}"], "static_ema": static[f"ema_val_top1@{label}"],
                      "supernet_live": supernet[f"val_top1@{label}"], "static_live": static[f"val_top1@{label}"]})
    print("\nfinal-epoch validation top-1 (%)")
    print(f"{'width':>6} {'supernet EMA':>13} {'static EMA':>11} {'diff':>6}   {'supernet live':>13} "
          f"{'static live':>11} {'diff':>6}")
    for r in table:
        print(f"{r['width']:>6.2f} {r['supernet_ema']:>13.2f} {r['static_ema']:>11.2f} "
              f"{r['supernet_ema'] - r['static_ema']:>+6.2f}   {r['supernet_live']:>13.2f} "
              f"{r['static_live']:>11.2f} {r['supernet_live'] - r['static_live']:>+6.2f}")
    if args.json:
        write_text_atomic(args.json, json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
