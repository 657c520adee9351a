"""The curve users look at: gated networks at several MAdds targets against the static widths of the same supernet.

From one stage-I checkpoint, trains one gate per `--targets` value (`train.py --stage gate --target-madds T`, with
any train.py flags given after the options below), evaluates each gated network and the width sweep of the same
supernet on the same validation images, and prints, for each gate: its mean MAdds against its target, the share of
images on each route, its top-1, the static curve's top-1 interpolated at the same MAdds, and their difference with
its standard error. The standard error treats the two accuracies as independent, which overstates it: they are
measured on the same images.

    python bench/dynamic_curve.py --init runs/supernet-cifar10/best.pth --targets 0.4 0.55 0.7 0.85 \
        --out runs/dynamic-curve --json curve.json --plot curve.png -c configs/gate-cifar10.yaml \
        --data imagefolder --data-dir DIR
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(command: list[str], log: Path) -> None:
    with open(log, "w") as f:
        code = subprocess.call(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if code:
        sys.exit(f"{' '.join(command[:3])} … failed with status {code}; see {log}")


def interpolate(madds: float, widths: list[dict]) -> float | None:
    """The static curve's top-1 at `madds`: linear between the two widths that bracket it (None outside)."""
    widths = sorted(widths, key=lambda r: r["madds"])
    for low, high in zip(widths, widths[1:]):
        if low["madds"] <= madds <= high["madds"]:
            share = (madds - low["madds"]) / (high["madds"] - low["madds"])
            return low["top1"] * (1 - share) + high["top1"] * share
    return None


def standard_error(top1: float, n: int) -> float:
    p = top1 / 100
    return 100 * math.sqrt(p * (1 - p) / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", required=True, help="the stage-I checkpoint every gate starts from")
    parser.add_argument("--targets", type=float, nargs="+", required=True,
                        help="MAdds targets: counts, or fractions (≤ 1) of the widest route's MAdds")
    parser.add_argument("--out", default="runs/dynamic-curve", help="folder for the gate runs and reports")
    parser.add_argument("--data", help="eval.py --data (default: the checkpoint's)")
    parser.add_argument("--data-dir", help="eval.py --data-dir (default: the checkpoint's)")
    parser.add_argument("--json", help="write the table and every row as JSON here")
    parser.add_argument("--plot", help="write top-1 against MAdds, gates and static widths, as a PNG here")
    args, flags = parser.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from dsnet.files import write_text_atomic
    from dsnet.plot import plot_report

    data = [*(["--data", args.data] if args.data else []), *(["--data-dir", args.data_dir] if args.data_dir else [])]
    evaluate = [sys.executable, "eval.py", *data, "--no-latency", "--no-progress"]
    sweep_json = out / "sweep.json"
    run([*evaluate, "--mode", "sweep", "--checkpoint", args.init, "--json", str(sweep_json)], out / "sweep.log")
    sweep = json.loads(sweep_json.read_text())
    widths = [r for r in sweep["rows"] if r["kind"] == "width"]
    n = sweep["num_samples"]

    gates = []
    for target in args.targets:
        name = f"gate-{target:g}"
        run([sys.executable, "train.py", "--stage", "gate", "--init", args.init, "--target-madds", f"{target:g}",
             "--output", str(out / name), "--overwrite", *data, *flags], out / f"{name}.log")
        report_json = out / f"{name}.json"
        run([*evaluate, "--mode", "dynamic", "--no-static-curve", "--checkpoint", str(out / name / "best.pth"),
             "--json", str(report_json)], out / f"{name}-eval.log")
        row = json.loads(report_json.read_text())["rows"][0]
        widest = max(r["madds"] for r in row["routes"])
        goal = target * widest if target <= 1 else target
        static = interpolate(row["madds"], widths)
        gates.append({
            "target": target, "target_madds": goal, "madds": row["madds"], "reached": row["madds"] / goal,
            "top1": row["top1"], "static_top1": static,
            "difference": None if static is None else row["top1"] - static,
            "se": math.hypot(standard_error(row["top1"], n), standard_error(static, n)) if static is not None
            else None,
            "route_shares": {f"{r['width']:g}": r["images"] / n for r in row["routes"]},
            "row": {**row, "label": f"target {target:g}"},
        })

    print(f"{n} {sweep['dataset']} val images; static widths {min(r['madds'] for r in widths) / 1e6:.2f}M to "
          f"{max(r['madds'] for r in widths) / 1e6:.2f}M MAdds, top-1 {min(r['top1'] for r in widths):.2f} to "
          f"{max(r['top1'] for r in widths):.2f}")
    print("| target | MAdds (reached / target) | images per route | top-1 | static curve | difference ± SE |")
    print("|---|---|---|---|---|---|")
    for g in gates:
        shares = ", ".join(f"{w}: {100 * s:.0f}%" for w, s in g["route_shares"].items())
        static = "outside" if g["static_top1"] is None else f"{g['static_top1']:.2f}"
        diff = "" if g["difference"] is None else f"{g['difference']:+.2f} ± {g['se']:.2f}"
        print(f"| {g['target']:g} ({g['target_madds'] / 1e6:.2f}M) | {g['madds'] / 1e6:.2f}M ({g['reached']:.3f}) | "
              f"{shares} | {g['top1']:.2f} | {static} | {diff} |")
    if args.json:
        write_text_atomic(args.json, json.dumps({"init": args.init, "flags": flags, "num_samples": n,
                                                 "widths": widths, "gates": gates}, indent=1) + "\n")
    if args.plot:
        plot_report({**sweep, "rows": [*widths, *(g["row"] for g in gates)]}, args.plot)


if __name__ == "__main__":
    main()
